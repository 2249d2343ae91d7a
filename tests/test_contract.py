"""Every registered method obeys the model contract written beside train.METHODS, and train.py's
evaluation computes image-independent class features once (toy CLIP, toy recipes, CPU)."""
import inspect

import pytest
import torch

import clip
import config
import data
import train
import zeroshot
from conftest import resolve

NAMES = ["circle", "square", "star", "heart", "moon", "arrow"]


@pytest.fixture(scope="module")
def toy_clip():
    return clip.load("toy", "cpu")[0]


def toy_model(method, toy_clip, names=NAMES):
    """The model of `python train.py --method METHOD` (toy recipe) for `names`."""
    cfg = config.resolve(train.parser.parse_args(["--method", method, "--device", "cpu"]),
                         train.METHODS)
    ds = data.Dataset("toy", names, [], [], [], clip.PHOTO)
    return train.build_model(cfg, toy_clip, ds)


@pytest.mark.parametrize("method", list(train.METHODS))
def test_every_method_obeys_the_model_contract(method, toy_clip):
    recipe = train.METHODS[method]
    params = inspect.signature(recipe.model).parameters
    assert list(params)[:2] == ["clip_model", "classnames"]
    options = [k for k in recipe.defaults if k not in config.RUN]
    assert set(options) <= set(params), "every recipe option is a constructor argument"
    model = toy_model(method, toy_clip)
    assert model.clip_model is toy_clip
    assert isinstance(model.per_class, bool)
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    if hasattr(model, "fit"):  # the probe: a fitted head before it can score
        assert len(inspect.signature(model.fit).parameters) == 2
        model.head.weight.data.normal_()
    model.eval()
    with torch.no_grad():
        logits = model(images)
    assert logits.shape == (3, len(NAMES)) and logits.dtype == torch.float32
    if hasattr(model, "text_features"):
        with torch.no_grad():
            features = model.text_features()
            assert features.shape == (len(NAMES), toy_clip.visual.output_dim)
            torch.testing.assert_close(model(images, features), logits)
    # What it learned is its state minus the frozen CLIP, and fits a model for other classes
    # unless it is per class.
    learned = train.runs.learned_state(model)
    assert learned and not any(k.startswith("clip_model.") for k in learned) \
        or method == "zeroshot"
    if not model.per_class:
        other = toy_model(method, toy_clip, ["circle", "moon", "bolt"])
        train.runs.load_learned(other, learned, "test")
    if hasattr(model, "loss_terms"):
        model.train()
        model(images)
        terms = model.loss_terms()
        assert all(t.dim() == 0 and t.requires_grad for t in terms.values())


@pytest.mark.parametrize("method", ["coop", "maple", "ivlp", "ivlp_text", "finetune", "zeroshot"])
def test_forward_uses_the_text_features_it_is_given(method, toy_clip):
    """evaluate() computes text_features() once and hands them to every batch: a forward that
    ignored them would recompute (and evaluate what it recomputed)."""
    model = toy_model(method, toy_clip).eval()
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        E = toy_clip.visual.output_dim
        given = torch.nn.functional.normalize(torch.randn(len(NAMES), E), dim=-1)  # (n_cls, E)
        assert not torch.allclose(model(images, given), model(images))


@pytest.mark.parametrize("method, per_batch", [("coop", False), ("maple", False),
                                               ("ivlp", False), ("cocoop", True)])
def test_evaluation_runs_the_text_tower_once_or_once_per_batch(method, per_batch, toy_clip,
                                                               monkeypatch):
    """Static prompts: one text pass per evaluation. CoCoOp's prompts depend on the image: one
    batched pass per test batch (all its images and classes together), not one per image."""
    model = toy_model(method, toy_clip)
    calls = []
    block = toy_clip.transformer.resblocks[0]
    block.register_forward_pre_hook(lambda m, args: calls.append(args[0].shape[0]))
    batches = [(torch.randn(2, 3, 32, 32), torch.tensor([0, 1])) for _ in range(3)]
    cfg = dict(device="cpu", world_size=1)
    accuracy = train.evaluate(model, batches, cfg, torch.autocast("cpu", enabled=False))
    block._forward_pre_hooks.clear()
    assert 0 <= accuracy <= 100
    if per_batch:
        assert calls == [2 * len(NAMES)] * 3  # B * n_cls prompts in one pass per batch
    else:
        assert calls == [len(NAMES)]  # n_cls prompts, once


@pytest.mark.parametrize("argv, prompts", [
    (["--template", "an outline of a {}."], ["an outline of a circle ."]),
    (["--ensemble"], [t.format("circle").replace(".", " .") for t in
                      zeroshot.ENSEMBLE_TEMPLATES + [clip.PHOTO]]),
    (["--ensemble", "--template", "a {} shape."], ["a circle shape ."]),
])
@pytest.mark.parametrize("method", ["zeroshot", "finetune"])
def test_template_and_ensemble_reach_the_model(method, argv, prompts, toy_clip):
    """The command line's templates are the ones the built model tokenises."""
    if method == "finetune" and "--ensemble" in argv:
        return  # fine-tuning has one template; --ensemble is zero-shot's (refused: test_train)
    cfg = resolve("--method", method, "--device", "cpu", *argv)
    model = train.build_model(cfg, toy_clip, data.Dataset("toy", NAMES, [], [], [], clip.PHOTO))
    tokens = model.tokens if model.tokens.dim() == 3 else model.tokens[None]  # (T, n_cls, L)
    got = [clip.decode(t[0]) for t in tokens]  # each template's prompt for the first class
    assert got[-len(prompts):] == prompts and len(got) == (8 if "--ensemble" in argv else 1)
