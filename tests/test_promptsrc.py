"""promptsrc.py on tiny random CLIPs (CPU, seconds): each L_SCL term is its formula, with the
regularisers off it is IVLP exactly, GPA is the Gaussian-weighted average of the per-epoch
prompts (also through train.py and --resume), the official settings, copy-paste."""
import math

import pytest
import torch
import torch.nn.functional as F

import clip
import ivlp
import promptsrc
import train
from conftest import (check_step_changes_only_prompts, labelled_batch, make_tiny_clip, resolve,
                      tiny_world)

NAMES = ["cat", "dog", "sea_lion", "red fox", "golden retriever"]
SMALL = dict(n_ctx_text=4, n_ctx_vision=4, text_depth=2, vision_depth=2)  # the tiny CLIP's 2+2


@pytest.fixture(scope="module")
def clip_model():
    return make_tiny_clip(vision_width=128)  # D 64 != Dv 128 on purpose


@pytest.fixture(scope="module")
def batch():
    return labelled_batch(len(NAMES))


def moved(model, seed=2):
    """Give every prompt a random value (ctx too), so the prompted model is not zero-shot CLIP."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.prompt_learner.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    return model


def test_each_term_is_its_formula(clip_model, batch):
    images = batch[0]
    model = moved(promptsrc.PromptSRC(clip_model, NAMES, **SMALL)).train()
    logits = model(images)
    terms = model.loss_terms()
    with torch.no_grad():  # everything the frozen CLIP says, recomputed here
        per_template = torch.stack([clip_model.encode_text(clip.tokenize(
            [t.format(c.replace("_", " ")) for c in NAMES])) for t in promptsrc.TEMPLATES])
        g = F.normalize(per_template.mean(0), dim=-1)  # (n_cls, E): mean, then normalised
        f = F.normalize(clip_model.encode_image(images), dim=-1)  # (B, E)
        prompts, deep, vision, deep_vision = model.prompt_learner()
        g_p = F.normalize(model.encode_text(prompts, deep), dim=-1)
        f_p = F.normalize(model.encode_image(images, vision, deep_vision), dim=-1)
        scale = clip_model.logit_scale.exp()  # 1/τ, the same for both
        y_p, y = scale * f_p @ g_p.t(), scale * f @ g.t()  # (B, n_cls)
        torch.testing.assert_close(logits, y_p)
        p, p_p = y.softmax(-1), y_p.softmax(-1)
        kl = (p * (p.log() - p_p.log())).sum() / (len(images) * len(NAMES))  # KL(y || y_p)
        expected = {"scl_image": 10 * (f_p - f).abs().mean(),
                    "scl_text": 25 * (g_p - g).abs().mean(), "scl_logits": kl}
    assert set(terms) == set(expected)
    for k in expected:
        torch.testing.assert_close(terms[k], expected[k], msg=k)
        assert terms[k].item() > 1e-4, k  # not trivially zero
    sum(terms.values()).backward()
    for name, q in model.prompt_learner.named_parameters():  # the terms train every prompt
        assert q.grad is not None and q.grad.abs().sum() > 0, name


def test_without_regularisers_it_is_ivlp_exactly(clip_model, batch):
    """Same prompts -> IVLP's logits; regularisers off -> IVLP's SGD steps, bit for bit."""
    images, labels = batch
    off = dict(text_loss_weight=0.0, image_loss_weight=0.0, logit_loss_weight=0.0, gpa=False)
    src = moved(promptsrc.PromptSRC(clip_model, NAMES, ctx_init="a photo of a", **SMALL, **off))
    ref = ivlp.IVLP(clip_model, NAMES, ctx_init="a photo of a", **SMALL)
    ref.prompt_learner.load_state_dict(src.prompt_learner.state_dict())
    models = [src, ref]
    opts = [torch.optim.SGD(m.prompt_learner.parameters(), lr=0.1, momentum=0.9,
                            weight_decay=5e-4) for m in models]
    for epoch in range(2):
        for m, opt in zip(models, opts):
            m.train()
            out = m(images)
            loss = F.cross_entropy(out, labels) + sum(getattr(m, "loss_terms", dict)().values())
            opt.zero_grad()
            loss.backward()
            opt.step()
        src.end_epoch(epoch, 2)  # gpa=False: no aggregation
        for (k, a), b in zip(src.prompt_learner.named_parameters(),
                             ref.prompt_learner.parameters()):
            assert torch.equal(a, b), k
    src.eval(), ref.eval()
    with torch.no_grad():
        assert torch.equal(src(images), ref(images))


def test_gpa_weights_are_the_official_normalised_gaussian():
    for epochs, mean, std in ((20, 15, 1), (50, 30, 30), (20, 6, 10), (5, 15, 1)):
        pdf = [math.exp(-0.5 * ((e - mean) / std) ** 2) / (std * math.sqrt(2 * math.pi))
               for e in range(1, epochs + 1)]  # trainers/promptsrc.py get_gauss at 1..E
        got = promptsrc.gpa_weights(epochs, mean, std)
        assert got == pytest.approx([v / sum(pdf) for v in pdf], rel=1e-12, abs=1e-300)
        assert sum(got) == pytest.approx(1.0)
    w = promptsrc.gpa_weights(20, 15, 1)
    assert max(w) == w[14] and w[13] == pytest.approx(w[15])  # peak at epoch 15


def test_aggregated_prompts_are_the_weighted_average_of_the_epochs(clip_model):
    model = promptsrc.PromptSRC(clip_model, NAMES, gpa_mean=2.0, gpa_std=1.5, **SMALL)
    params = list(model.prompt_learner.parameters())
    epochs, snapshots = 4, []
    gen = torch.Generator().manual_seed(0)
    for epoch in range(epochs):  # stand-ins for an epoch of training: new prompt values
        with torch.no_grad():
            for p in params:
                p.copy_(torch.randn(p.shape, generator=gen))
        snapshots.append([p.detach().clone() for p in params])
        model.end_epoch(epoch, epochs)
    w = promptsrc.gpa_weights(epochs, 2.0, 1.5)
    for i, p in enumerate(params):
        expected = sum(w[e] * snapshots[e][i] for e in range(epochs))
        torch.testing.assert_close(p.detach(), expected, rtol=1e-6, atol=1e-6)
        assert not torch.allclose(p.detach(), snapshots[-1][i])  # not the last epoch's
    assert int(model.gpa_epochs) == epochs
    with pytest.raises(RuntimeError, match="GPA holds 4 epochs"):  # called once too often
        model.end_epoch(1, epochs)


def test_frozen_features_and_what_is_learned(clip_model, batch):
    model = promptsrc.PromptSRC(clip_model, NAMES, **SMALL).train()
    check_step_changes_only_prompts(model, *batch)
    assert len(promptsrc.TEMPLATES) == 60 and promptsrc.TEMPLATES[0] == "a photo of a {}."
    state = [k for k in model.state_dict() if not k.startswith("clip_model.")]
    assert [k for k in state if not k.startswith("prompt_learner.")] == ["gpa_sum", "gpa_epochs"]
    assert model.gpa_sum.numel() == sum(p.numel() for p in model.prompt_learner.parameters())
    other = promptsrc.PromptSRC(clip_model, ["apple", "banana"], **SMALL)  # base -> new
    other.load_state_dict(model.state_dict())
    trained = model.loss_terms()  # the last training forward's (check_step's)
    assert trained.keys() == {"scl_image", "scl_text", "scl_logits"}
    model.eval()
    with torch.no_grad():  # no regulariser at evaluation: the training terms stay
        model(batch[0])
    assert all(model.loss_terms()[k] is v for k, v in trained.items())


def test_trainable_parameters_at_vit_b16_widths():
    """ctx, 8 deep text prompts, VPT and 8 deep vision prompts: 9 x 4 x (512 + 768)."""
    m = clip.CLIP(embed_dim=512, image_resolution=16, vision_layers=1, vision_width=768,
                  vision_patch_size=16, context_length=77, vocab_size=49408,
                  transformer_width=512, transformer_heads=8, transformer_layers=1)
    pl = promptsrc.VLPromptLearner(m, NAMES, **{k: promptsrc.DEFAULTS[k] for k in (
        "n_ctx_text", "n_ctx_vision", "text_depth", "vision_depth", "ctx_init")})
    assert sum(p.numel() for p in pl.parameters()) == 46_080


@pytest.mark.parametrize("kwargs, message", [
    (dict(text_depth=0), "text_depth must be an int in 1..2"),
    (dict(vision_depth=3), "vision_depth must be an int in 0..2"),
    (dict(gpa_std=0.0), "gpa_std must be"), (dict(text_loss_weight=-1), "text_loss_weight"),
    (dict(n_ctx_text=5), "n_ctx_text=5 is more than the 4 tokens")])
def test_bad_input_gives_clear_errors(clip_model, kwargs, message):
    with pytest.raises(ValueError, match=message):
        promptsrc.PromptSRC(clip_model, NAMES, **{**SMALL, **kwargs})


def test_resnet_backbone_is_refused():
    rn = clip.CLIP(embed_dim=32, image_resolution=32, vision_layers=(1, 1, 1, 1),
                   vision_width=64, vision_patch_size=None, context_length=77, vocab_size=49408,
                   transformer_width=64, transformer_heads=1, transformer_layers=2)
    with pytest.raises(ValueError, match="needs a ViT backbone"):
        promptsrc.PromptSRC(rn, NAMES, **SMALL)


def config(*argv):
    return resolve(*argv)


def test_registered_with_the_official_configs():
    keys = ("n_ctx_text", "n_ctx_vision", "text_depth", "vision_depth", "text_loss_weight",
            "image_loss_weight", "gpa_mean", "gpa_std", "lr", "epochs", "batch_size", "shots")
    cfg = {p: config("--method", "promptsrc", "--dataset", "dtd", "--protocol", p)
           for p in ("base2new", "fewshot", "crossdataset")}
    assert [cfg["base2new"][k] for k in keys] == [4, 4, 9, 9, 25, 10, 15, 1, 0.0025, 20, 4, 16]
    assert [cfg["fewshot"][k] for k in keys] == [4, 4, 9, 9, 25, 10, 30, 30, 0.0025, 50, 4, 16]
    assert [cfg["crossdataset"][k] for k in keys] == [4, 4, 3, 3, 25, 10, 6, 10, 0.0025, 20, 4,
                                                      16]
    toy = config("--method", "promptsrc")  # the toy's 4 text and 6 vision layers
    assert [toy[k] for k in keys] == [4, 4, 3, 3, 25, 10, 15, 1, 0.0025, 20, 4, 16]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return tiny_world(tmp_path_factory.mktemp("promptsrc"))


def test_resume_and_gpa_through_train(world, monkeypatch):
    """train.py calls end_epoch after every epoch: the saved prompts are the Gaussian-weighted
    average of the per-epoch prompts, and --resume (GPA state in the checkpoint) reproduces the
    uninterrupted run bit for bit."""
    for k, v in dict(text_depth=2, vision_depth=2, gpa_mean=2.0, gpa_std=1.0).items():
        monkeypatch.setitem(promptsrc.DEFAULTS, k, v)  # the tiny CLIP; GPA over all 3 epochs
    snapshots, end_epoch = [], promptsrc.PromptSRC.end_epoch

    def recording(model, epoch, epochs):
        snapshots.append({k: v.detach().clone() for k, v in
                          model.prompt_learner.named_parameters()})
        return end_epoch(model, epoch, epochs)

    def run(out, *extra):
        return train.main(["--method", "promptsrc", "--dataset", "folder", "--root",
                           world["data"], "--backbone", world["ckpt"], "--shots", "2",
                           "--batch-size", "2", "--device", "cpu", "--epochs", "3", "--lr",
                           "0.05", "--protocol", "base2new", "--out", str(world["tmp"] / out),
                           *extra])
    monkeypatch.setattr(promptsrc.PromptSRC, "end_epoch", recording)
    whole = run("whole")
    assert len(snapshots) == 3
    learned = torch.load(world["tmp"] / "whole" / "learned.pt", weights_only=True)["learned"]
    w = promptsrc.gpa_weights(3, 2.0, 1.0)
    for k in snapshots[0]:
        expected = sum(w[e] * snapshots[e][k] for e in range(3))
        torch.testing.assert_close(learned[f"prompt_learner.{k}"], expected)
        assert not torch.allclose(learned[f"prompt_learner.{k}"], snapshots[-1][k]), k
    assert run("cut", "--stop-after-epoch", "2") is None
    at_2 = torch.load(world["tmp"] / "cut" / "checkpoint.pt", weights_only=True)["learned"]
    assert int(at_2["gpa_epochs"]) == 2 and at_2["gpa_sum"].abs().sum() > 0
    resumed = run("cut", "--resume")
    assert resumed["accuracy"] == whole["accuracy"]
    final = torch.load(world["tmp"] / "cut" / "learned.pt", weights_only=True)["learned"]
    assert final.keys() == learned.keys()
    for k in final:
        assert torch.equal(final[k], learned[k]), k
    log = (world["tmp"] / "whole" / "log.txt").read_text()
    assert "scl_image" in log and "scl_text" in log and "scl_logits" in log
