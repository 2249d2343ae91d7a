"""finetune.py and linearprobe.py on tiny random CLIPs and toy features: CPU only, seconds."""
import math

import pytest
import torch
import torch.nn.functional as F

import clip
import finetune
import linearprobe
from conftest import make_tiny_clip

NAMES = ["cat", "sea_lion", "red fox"]


def tiny_clip(seed=0, resnet=False):
    if resnet:  # ModifiedResNet tower: one bottleneck per stage, BatchNorm everywhere
        return make_tiny_clip(seed, image_resolution=64, vision_layers=(1, 1, 1, 1),
                              vision_width=16, vision_patch_size=None)
    return make_tiny_clip(seed)


def sgd_step(model, n_px=32, steps=1):
    """What train.py does: model.train() (BatchNorm stays in eval mode), SGD steps."""
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=5e-4)
    for _ in range(steps):
        images = torch.randn(4, 3, n_px, n_px)  # (B, 3, H, W)
        loss = F.cross_entropy(model(images), torch.tensor([0, 1, 2, 0]))
        opt.zero_grad()
        loss.backward()
        opt.step()


def changed_keys(clip_model, before):
    return {k for k, v in clip_model.state_dict().items() if not torch.equal(v, before[k])}


@pytest.mark.parametrize("part, expected", [
    ("image", lambda k: k.startswith("visual.")),
    ("last:1", lambda k: k.startswith(("visual.transformer.resblocks.1.", "visual.ln_post.",
                                       "visual.proj"))),
    ("all", lambda k: k != "logit_scale"),
])
def test_finetuning_changes_the_chosen_parameters_and_nothing_else(part, expected):
    clip_model = tiny_clip(seed=1)
    before = {k: v.clone() for k, v in clip_model.state_dict().items()}
    model = finetune.FineTune(clip_model, NAMES, finetune_part=part)
    trainable = {name for name, p in clip_model.named_parameters() if p.requires_grad}
    assert trainable == {k for k in before if expected(k)}
    saved = model.trained_part.state_dict()
    assert set(saved) == trainable  # CLIP's own names, exactly the trained tensors
    sgd_step(model)
    changed = changed_keys(clip_model, before)
    assert changed == trainable  # weight decay moves even the rare zero-gradient tensor
    assert "logit_scale" not in changed
    if part != "all":  # the text tower is bit-identical
        assert not any(k.startswith(tuple(finetune.TEXT_TOWER)) for k in changed)


def test_resnet_batchnorm_keeps_pretrained_statistics():
    clip_model = tiny_clip(resnet=True)
    before = {k: v.clone() for k, v in clip_model.state_dict().items()}
    model = finetune.FineTune(clip_model, NAMES, finetune_part="last:1")
    assert set(model.trained_part.state_dict()) == {
        k for k in before if k.startswith(("visual.layer4.0.", "visual.attnpool."))}
    model.train()
    assert not any(m.training for m in clip_model.modules()
                   if isinstance(m, torch.nn.BatchNorm2d))
    sgd_step(model, n_px=64)
    changed = changed_keys(clip_model, before)
    assert "visual.layer4.0.bn1.weight" in changed  # the affine BatchNorm weights train
    assert not any("running_" in k or "num_batches" in k for k in changed)
    assert all(k.startswith(("visual.layer4.0.", "visual.attnpool.")) for k in changed)


def test_starts_at_zero_shot_and_text_gradients_only_with_all():
    clip_model = tiny_clip()
    images = torch.randn(2, 3, 32, 32)
    tokens = clip.tokenize([f"a photo of a {c.replace('_', ' ')}." for c in NAMES])
    with torch.no_grad():
        f = F.normalize(clip_model.encode_image(images), dim=-1)
        g = F.normalize(clip_model.encode_text(tokens), dim=-1)
        zero_shot = clip_model.logit_scale.exp() * f @ g.t()
    image_only = finetune.FineTune(clip_model, NAMES, finetune_part="image")
    torch.testing.assert_close(image_only(images).detach(), zero_shot)
    assert not image_only.text_features().requires_grad  # frozen text tower: no graph
    assert finetune.FineTune(clip_model, NAMES, finetune_part="all").text_features().requires_grad


def test_saved_part_loads_into_a_model_for_other_classes():
    trained_clip = tiny_clip(seed=2)
    trained = finetune.FineTune(trained_clip, NAMES, finetune_part="last:1")
    sgd_step(trained, steps=2)
    state = trained.trained_part.state_dict()
    fresh_clip = tiny_clip(seed=2)  # the same pretrained weights, not fine-tuned
    other = finetune.FineTune(fresh_clip, ["red fox", "airplane"], finetune_part="last:1")
    other.trained_part.load_state_dict(state)  # strict
    for k, v in trained_clip.state_dict().items():
        assert torch.equal(fresh_clip.state_dict()[k], v), k
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():  # "red fox" gets the same logit whatever the other classes are
        torch.testing.assert_close(other(images)[:, 0], trained(images)[:, 2])


@pytest.mark.parametrize("part", ["last:0", "last:3", "last:x", "text", ""])
def test_bad_finetune_part_says_what_is_allowed(part):
    with pytest.raises(ValueError, match=r"'all', 'image' or 'last:N' with N from 1 to 2"):
        finetune.FineTune(tiny_clip(), NAMES, finetune_part=part)


# ---------------------------------------------------------------------------------------------
# Linear probe

@pytest.fixture(autouse=False)
def one_thread():
    """The toy fits are tiny: with 2 threads on a busy CPU, L-BFGS's many small ops spend more
    time waiting for threads than computing (100x slower measured)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def clusters(n_per_class, n_cls=4, dim=32, noise=0.05, seed=0):
    """L2-normalised features around n_cls well-separated unit means: (n, dim), (n,)."""
    g = torch.Generator().manual_seed(seed)
    means = F.normalize(torch.randn(n_cls, dim, generator=torch.Generator().manual_seed(99)),
                        dim=-1)  # (n_cls, dim)
    y = torch.arange(n_cls).repeat(n_per_class)  # (n,)
    return F.normalize(means[y] + noise * torch.randn(len(y), dim, generator=g), dim=-1), y


@pytest.mark.usefixtures("one_thread")
def test_linear_probe_fits_a_separable_toy_problem_and_picks_c_from_the_grid():
    train_x, train_y = clusters(4, seed=1)
    val_x, val_y = clusters(2, seed=2)
    test_x, test_y = clusters(25, seed=3)
    grid = linearprobe.DEFAULTS["c_grid"]
    weight, bias, C = linearprobe.fit(train_x, train_y, val_x, val_y, 4, grid, search_steps=0,
                                      max_iter=50)
    assert weight.shape == (4, 32) and bias.shape == (4,)
    assert C in grid
    assert linearprobe.accuracy(weight, bias, train_x, train_y) == 1.0
    assert linearprobe.accuracy(weight, bias, test_x, test_y) == 1.0


@pytest.mark.usefixtures("one_thread")
def test_bisection_follows_the_official_search(monkeypatch):
    # Validation accuracy peaks at C = 10^0.3, between the grid values 1 and 100.
    monkeypatch.setattr(linearprobe, "fit_logistic",
                        lambda x, y, n_cls, C, max_iter: (torch.tensor(C), None))
    monkeypatch.setattr(linearprobe, "accuracy",
                        lambda w, b, x, y: torch.tensor(-abs(math.log10(w.item()) - 0.3)))
    x, y = torch.zeros(2, 3), torch.zeros(2)
    _, _, C = linearprobe.fit(x, y, x, y, 2, search_steps=0)
    assert C == 1.0  # the best grid value
    _, _, C = linearprobe.fit(x, y, x, y, 2, search_steps=8)
    assert abs(math.log10(C) - 0.3) < 0.01  # 10^0.296875 after 8 halvings


@pytest.mark.usefixtures("one_thread")
def test_linear_probe_model_fits_from_loaders_and_scores_images():
    clip_model = tiny_clip()
    names = ["circle", "square", "star"]
    g = torch.Generator().manual_seed(0)
    protos = 2 * torch.randn(3, 3, 32, 32, generator=g)  # one "look" per class

    def loader(n_per_class):  # batches of (images (B, 3, H, W), labels (B,))
        y = torch.arange(3).repeat(n_per_class)
        images = protos[y] + 0.1 * torch.randn(len(y), 3, 32, 32, generator=g)
        return [(images[i:i + 4], y[i:i + 4]) for i in range(0, len(y), 4)]

    probe = linearprobe.LinearProbe(clip_model, names, c_grid=(1e4, 1.0, 1e-4), search_steps=1,
                                    max_iter=50)
    assert not any(p.requires_grad for p in probe.parameters())  # no SGD loop for it
    C, val_acc = probe.fit(loader(4), loader(2))
    assert C > 0 and val_acc == 100.0
    test = loader(10)
    with torch.no_grad():
        pred = torch.cat([probe(images).argmax(dim=-1) for images, _ in test])
    assert torch.equal(pred, torch.cat([y for _, y in test]))
    assert set(probe.head.state_dict()) == {"weight", "bias"}


@pytest.mark.usefixtures("one_thread")
def test_linear_probe_says_it_is_per_class():
    """train.py refuses it wherever it would meet other classes (tests/test_transfer.py)."""
    probe = linearprobe.LinearProbe(tiny_clip(), ["a", "b", "c", "d"])
    assert probe.per_class is True
    assert linearprobe.DEFAULTS["protocol"] == "fewshot"
    with pytest.raises(ValueError, match="needs training and validation images"):
        linearprobe.fit(*clusters(2), torch.zeros(0, 32), torch.zeros(0), 4)
