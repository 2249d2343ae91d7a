"""What reaches a run: the default commands' configuration, the models it builds, and the
optimiser settings the loop actually applies, epoch by epoch (toy world and tiny CLIP, CPU)."""
import math

import pytest
import torch

import clip
import train
from conftest import resolve
from toy import world

BASE = world.TASK["classes"][:math.ceil(len(world.TASK["classes"]) / 2)]


def config(*argv):
    return resolve(*argv)


# The toy run's settings as the README documents them: the papers' recipes except MaPLe depth 3
# and lr 0.002, fine-tuning 50 epochs; CoOp under base2new uses the CoCoOp paper's CoOp setting
# (200 epochs, 4 context tokens from "a photo of a").
TOY = {
    "coop": dict(lr=0.002, epochs=200, batch_size=32, n_ctx=4, ctx_init="a photo of a",
                 csc=False, class_token_position="end"),
    "cocoop": dict(lr=0.002, epochs=10, batch_size=1, n_ctx=4, ctx_init="a photo of a"),
    "maple": dict(lr=0.002, epochs=5, batch_size=4, n_ctx=2, ctx_init="a photo of a",
                  prompt_depth=3),
    "finetune": dict(lr=1e-4, epochs=50, batch_size=32, finetune_part="all"),
    # MaPLe's ablations: the official configs, depths scaled to the toy like MaPLe's
    "vpt": dict(lr=0.0025, epochs=5, batch_size=4, n_ctx_vision=8, vision_depth=3,
                text_depth=0),
    "ivlp_text": dict(lr=0.0025, epochs=5, batch_size=4, n_ctx_text=4, text_depth=3,
                      vision_depth=0),
    "ivlp": dict(lr=0.0035, epochs=5, batch_size=4, n_ctx_text=2, n_ctx_vision=2, text_depth=3,
                 vision_depth=3),
}


@pytest.mark.parametrize("method", list(TOY))
def test_default_toy_command_configuration(method):
    cfg = config("--method", method)
    assert (cfg["dataset"], cfg["backbone"], cfg["protocol"], cfg["shots"], cfg["seed"]) == \
        ("toy", "toy", "base2new", 16, 1)
    assert {k: cfg[k] for k in TOY[method]} == TOY[method]


def test_default_command_is_coop_and_linear_probe_is_fewshot():
    assert config()["method"] == "coop"
    assert config("--method", "linearprobe")["protocol"] == "fewshot"


@pytest.mark.parametrize("argv, epochs, n_ctx", [
    (["--dataset", "dtd", "--protocol", "fewshot", "--shots", "1"], 50, 16),
    (["--dataset", "dtd", "--protocol", "fewshot", "--shots", "2"], 100, 16),
    (["--dataset", "dtd", "--protocol", "fewshot", "--shots", "4"], 100, 16),
    (["--dataset", "dtd", "--protocol", "fewshot", "--shots", "8"], 200, 16),
    (["--dataset", "dtd", "--protocol", "fewshot"], 200, 16),
    (["--dataset", "imagenet", "--protocol", "fewshot", "--shots", "16"], 50, 16),
    (["--dataset", "dtd"], 200, 4),  # base2new: the CoCoOp paper's CoOp rows
    (["--dataset", "dtd", "--epochs", "7"], 7, 4),  # the command line wins
])
def test_coop_recipe_by_protocol_shots_and_dataset(argv, epochs, n_ctx):
    cfg = config("--method", "coop", *argv)
    assert (cfg["epochs"], cfg["n_ctx"], cfg["backbone"], cfg["lr"], cfg["batch_size"]) == \
        (epochs, n_ctx, "ViT-B/16", 0.002, 32)


@pytest.mark.parametrize("method, expected", [
    ("cocoop", dict(epochs=10, batch_size=1, lr=0.002, n_ctx=4, backbone="ViT-B/16")),
    ("maple", dict(epochs=5, batch_size=4, lr=0.0035, n_ctx=2, prompt_depth=9,
                   backbone="ViT-B/16")),
])
def test_papers_recipes_on_a_benchmark(method, expected):
    cfg = config("--method", method, "--dataset", "eurosat")
    assert {k: cfg[k] for k in expected} == expected


@pytest.fixture(scope="module")
def toy_clip():
    return clip.load("toy", "cpu")[0]


def test_default_models_are_built_with_the_recipes(toy_clip):
    ds = train.data.Dataset("toy", BASE, [], [], [], "a photo of a {}.")
    words = toy_clip.token_embedding(clip.tokenize("a photo of a")[0, 1:5])  # (4, D)
    coop = train.build_model(config("--method", "coop"), toy_clip, ds)
    assert torch.equal(coop.prompt_learner.ctx.detach().float(), words.detach())
    cocoop = train.build_model(config("--method", "cocoop"), toy_clip, ds)
    assert torch.equal(cocoop.prompt_learner.ctx.detach().float(), words.detach())
    maple = train.build_model(config("--method", "maple"), toy_clip, ds)
    assert len(maple.prompt_learner.compound_prompts_text) == 2  # depth 3
    assert torch.equal(maple.prompt_learner.ctx.detach(), words[:2].detach())
    n = sum(p.numel() for p in toy_clip.parameters())
    finetune = train.build_model(config("--method", "finetune"), toy_clip, ds)
    assert sum(p.numel() for p in finetune.parameters() if p.requires_grad) == n - 1


def spy_sgd(monkeypatch):
    """Record (lr, momentum, weight decay) at every optimiser step."""
    steps = []
    step = torch.optim.SGD.step

    def spy(self, *args, **kwargs):
        group = self.param_groups[0]
        steps.append((group["lr"], group["momentum"], group["weight_decay"]))
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.SGD, "step", spy)
    return steps


@pytest.mark.parametrize("method", ["coop", "cocoop", "maple", "finetune", "ivlp"])
def test_toy_run_applies_its_schedule_and_sgd_settings(method, toy_root, tmp_path, monkeypatch):
    steps = spy_sgd(monkeypatch)
    out = tmp_path / method
    train.main(["--method", method, "--root", toy_root, "--out", str(out),
                "--stop-after-epoch", "3"])
    r = TOY[method]
    per_epoch = (len(BASE) * 16) // r["batch_size"]  # the batch size: full batches only
    assert len(steps) == 3 * per_epoch
    # warm-up at 1e-5, then the cosine over `epochs` epochs starting at the full lr (Dassl)
    want = [1e-5, r["lr"], 0.5 * r["lr"] * (1 + math.cos(math.pi / r["epochs"]))]
    got = [s[0] for s in steps]
    for e in range(3):
        assert got[e * per_epoch:(e + 1) * per_epoch] == pytest.approx([want[e]] * per_epoch)
    assert {s[1:] for s in steps} == {(0.9, 5e-4)}
