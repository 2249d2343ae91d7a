"""kgcoop.py on tiny random CLIPs (CPU, seconds): the knowledge-guided term is its formula, with
weight 0 it is CoOp exactly, the official settings and templates, copy-paste, and --resume."""
import re

import pytest
import torch
import torch.nn.functional as F

import clip
import coop
import kgcoop
import train
from conftest import (check_step_changes_only_prompts, labelled_batch, make_tiny_clip, resolve,
                      tiny_world)

NAMES = ["cat", "sea_lion", "golden retriever", "red fox", "airplane"]


@pytest.fixture(scope="module")
def clip_model():
    return make_tiny_clip()


@pytest.fixture(scope="module")
def batch():
    return labelled_batch(len(NAMES))


def moved(model, seed=2):
    """Give the context a random value, so the learned and the hand-written prompts differ."""
    with torch.no_grad():
        ctx = model.prompt_learner.ctx
        ctx.copy_(torch.randn(ctx.shape, generator=torch.Generator().manual_seed(seed)) * 0.1)
    return model


def hand_written(clip_model, template):
    """w_i^clip, from the frozen CLIP and the template, computed here independently."""
    tokens = clip.tokenize([template.format(c.replace("_", " ")) for c in NAMES])
    with torch.no_grad():
        return F.normalize(clip_model.encode_text(tokens), dim=-1)  # (n_cls, E)


def test_kg_term_is_its_formula(clip_model, batch):
    template = "a blurry photo of a {}."
    model = moved(kgcoop.KgCoOp(clip_model, NAMES, w=8.0, template=template)).train()
    model(batch[0])
    term = model.loss_terms()["kg"]
    prompts = model.prompt_learner()  # (n_cls, L, D)
    w = F.normalize(clip_model.encode_text_embeddings(
        prompts, model.prompt_learner.tokenized_prompts), dim=-1)  # (n_cls, E)
    w_clip = hand_written(clip_model, template)
    expected = 8.0 * (1 - (w * w_clip).sum(-1).mean())  # λ (1 - 1/N_c Σ_i cos(w_i, w_i^clip))
    torch.testing.assert_close(term, expected)
    # the paper's L_kg = 1/N_c Σ_i ||w_i - w_i^clip||², on unit vectors twice the code's term
    torch.testing.assert_close(term, 8.0 / 2 * ((w - w_clip) ** 2).sum(-1).mean())
    assert term.item() > 1e-3  # not trivially zero
    term.backward()
    assert model.prompt_learner.ctx.grad.abs().sum() > 0  # the term trains the context


def test_weight_zero_is_coop_exactly(clip_model, batch):
    """Same context -> the same logits; with w = 0 the same SGD steps, bit for bit."""
    images, labels = batch
    models = [moved(kgcoop.KgCoOp(clip_model, NAMES, w=0.0)),
              moved(coop.CoOp(clip_model, NAMES, n_ctx=4, ctx_init="a photo of a"))]
    opts = [torch.optim.SGD([m.prompt_learner.ctx], lr=0.5, momentum=0.9, weight_decay=5e-4)
            for m in models]
    for _ in range(3):
        logits = []
        for m, opt in zip(models, opts):
            m.train()
            out = m(images)
            loss = F.cross_entropy(out, labels) + sum(getattr(m, "loss_terms", dict)().values())
            opt.zero_grad()
            loss.backward()
            opt.step()
            logits.append(out.detach())
        assert torch.equal(*logits)
    kg_ctx, coop_ctx = (m.prompt_learner.ctx for m in models)
    assert torch.equal(kg_ctx, coop_ctx)
    assert not torch.equal(kg_ctx, moved(kgcoop.KgCoOp(clip_model, NAMES)).prompt_learner.ctx)


def test_the_weight_pulls_towards_the_hand_written_prompt(clip_model, batch):
    """The same steps with w = 8 end nearer the hand-written features than with w = 0."""
    images, labels = batch
    distance = {}
    for w in (0.0, 8.0):
        model = moved(kgcoop.KgCoOp(clip_model, NAMES, w=w, template="a photo of a {}."))
        opt = torch.optim.SGD([model.prompt_learner.ctx], lr=0.5)
        for _ in range(5):
            model.train()
            loss = F.cross_entropy(model(images), labels) + model.loss_terms()["kg"]
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            distance[w] = kgcoop.KgCoOp.kg_loss(model, model.text_features()).item()
    assert distance[8.0] < distance[0.0]


def test_only_the_context_is_learned_and_saved(clip_model, batch):
    model = moved(kgcoop.KgCoOp(clip_model, NAMES)).train()
    check_step_changes_only_prompts(model, *batch)
    learned = [k for k in model.state_dict() if not k.startswith("clip_model.")]
    assert learned == ["prompt_learner.ctx"]  # w_i^clip depends on the classes: not saved
    assert kgcoop.KgCoOp.per_class is False


def test_hand_written_features_use_the_official_templates(clip_model):
    model = kgcoop.KgCoOp(clip_model, NAMES, template=None)
    torch.testing.assert_close(model.clip_text_features, hand_written(clip_model, kgcoop.PHOTO))
    # DTD: train.py passes CoOp's "{} texture."; KgCoOp's own template is used instead
    dtd = kgcoop.KgCoOp(clip_model, NAMES, template="{} texture.")
    torch.testing.assert_close(dtd.clip_text_features,
                               hand_written(clip_model, "a photo of a {}, a type of texture."))
    pets = kgcoop.KgCoOp(clip_model, NAMES, template="a photo of a {}, a type of pet.")
    torch.testing.assert_close(pets.clip_text_features,
                               hand_written(clip_model, "a photo of a {}, a type of pet."))


def test_no_term_outside_training(clip_model, batch):
    model = moved(kgcoop.KgCoOp(clip_model, NAMES)).eval()
    with torch.no_grad():
        model(batch[0])
    assert model.loss_terms() == {}


@pytest.mark.parametrize("kwargs, message", [
    (dict(w=-1.0), "w (the weight"), (dict(template="a photo"), "must hold exactly one {}"),
    (dict(ctx_init="", n_ctx=73), "context length is 77"),  # fits, but not with the names
    (dict(ctx_init="", n_ctx=75), "do not fit the text encoder's 77 positions")])
def test_bad_input_gives_clear_errors(clip_model, kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("{}", r"\{\}")):
        kgcoop.KgCoOp(clip_model, NAMES, **kwargs)


def config(*argv):
    return resolve(*argv)


def test_registered_with_the_official_settings():
    cfg = config("--method", "kgcoop", "--dataset", "dtd")  # base2new
    assert {k: cfg[k] for k in ("n_ctx", "ctx_init", "w", "lr", "epochs", "batch_size",
                                "shots", "backbone", "template")} == dict(
        n_ctx=4, ctx_init="a photo of a", w=8.0, lr=0.002, epochs=100, batch_size=128, shots=16,
        backbone="ViT-B/16", template=None)
    assert config("--method", "kgcoop", "--dataset", "dtd", "--protocol", "fewshot")["shots"] == 4
    toy = config("--method", "kgcoop")  # the toy run: the official recipe, the toy CLIP
    assert (toy["backbone"], toy["epochs"], toy["batch_size"], toy["w"]) == ("toy", 100, 128, 8.0)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return tiny_world(tmp_path_factory.mktemp("kgcoop"))


def test_resume_continues_the_interrupted_run(world, monkeypatch):
    def run(out, *extra):
        return train.main(["--method", "kgcoop", "--dataset", "folder", "--root", world["data"],
                           "--backbone", world["ckpt"], "--shots", "2", "--batch-size", "2",
                           "--device", "cpu", "--epochs", "3", "--lr", "0.05", "--protocol",
                           "fewshot", "--template", "a blurry photo of a {}.",
                           "--out", str(world["tmp"] / out), *extra])
    whole = run("whole")
    assert run("cut", "--stop-after-epoch", "2") is None
    resumed = run("cut", "--resume")
    assert resumed["accuracy"] == whole["accuracy"]
    final, whole_final = (torch.load(world["tmp"] / d / "learned.pt", weights_only=True)
                          ["learned"] for d in ("cut", "whole"))
    assert list(final) == ["prompt_learner.ctx"]
    assert torch.equal(final["prompt_learner.ctx"], whole_final["prompt_learner.ctx"])
    log = (world["tmp"] / "whole" / "log.txt").read_text()
    assert re.search(r"batch \[4/4\] loss \d+\.\d{4} kg \d+\.\d{4} acc", log)  # printed
    monkeypatch.setitem(kgcoop.DEFAULTS, "w", 0.0)  # train.py adds the term: w changes the run
    run("w0")
    w0 = torch.load(world["tmp"] / "w0" / "learned.pt", weights_only=True)["learned"]
    assert not torch.allclose(w0["prompt_learner.ctx"], whole_final["prompt_learner.ctx"])
