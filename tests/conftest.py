"""Shared test helpers: a tiny random CLIP in OpenAI's layout, images for it, image folders."""
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import clip


def resolve(*argv):
    """train.py's resolved configuration for a command line (config.resolve)."""
    import config  # noqa: PLC0415 - here, so a test file that needs no train.py loads none of it
    import train  # noqa: PLC0415
    return config.resolve(train.parser.parse_args(list(argv)), train.METHODS)


def make_tiny_clip(seed=0, **overrides):
    """A tiny random CLIP (seeded): ViT 32x32 px, patch 8, text width 64, embed dim 32.
    Keyword arguments override clip.CLIP's (e.g. vision_width=128 to make D != Dv)."""
    torch.manual_seed(seed)
    config = dict(embed_dim=32, image_resolution=32, vision_layers=2, vision_width=64,
                  vision_patch_size=8, context_length=77, vocab_size=49408,
                  transformer_width=64, transformer_heads=1, transformer_layers=2)
    return clip.CLIP(**{**config, **overrides}).eval()


def labelled_batch(n_cls, seed=1):
    """Three random 32x32 images and their labels among n_cls classes (seeded)."""
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(3, 3, 32, 32, generator=gen)  # (B, 3, H, W)
    return images, torch.randint(n_cls, (3,), generator=gen)  # labels (B,)


@pytest.fixture
def images():
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def check_step_changes_only_prompts(model, images, labels):
    """One SGD step of a prompt-learning model: every prompt parameter gets a gradient and
    moves; every CLIP tensor (weights and buffers, e.g. BatchNorm statistics) stays equal."""
    before_clip = {k: v.clone() for k, v in model.clip_model.state_dict().items()}
    before_pl = {k: v.clone() for k, v in model.prompt_learner.state_dict().items()}
    params = [p for p in model.parameters() if p.requires_grad]
    assert {id(p) for p in params} == {id(p) for p in model.prompt_learner.parameters()}
    opt = torch.optim.SGD(params, lr=0.5, momentum=0.9)  # no weight decay: moves = gradients
    F.cross_entropy(model(images), labels).backward()
    for name, p in model.prompt_learner.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    opt.step()
    for k, v in model.clip_model.state_dict().items():
        assert torch.equal(v, before_clip[k]), k
    for k, v in model.prompt_learner.state_dict().items():
        assert not torch.equal(v, before_pl[k]), k


@pytest.fixture(scope="session")
def toy_root(tmp_path_factory):
    """A data root holding the rendered toy task (toy/world.py), shared by the whole session."""
    from toy import world
    root = tmp_path_factory.mktemp("toy_data")
    world.ensure_dataset(str(root))
    return str(root)


def record_blocks(clip_model, pre=True):
    """Hooks on every block of both towers: their inputs (pre=True) or outputs."""
    seen = {"text": [], "vision": []}
    handles = []
    for tower, blocks in (("text", clip_model.transformer.resblocks),
                          ("vision", clip_model.visual.transformer.resblocks)):
        for block in blocks:
            if pre:
                fn = (lambda t: lambda m, args: seen[t].append(args[0].detach().clone()))(tower)
                handles.append(block.register_forward_pre_hook(fn))
            else:
                fn = (lambda t: lambda m, a, out: seen[t].append(out.detach().clone()))(tower)
                handles.append(block.register_forward_hook(fn))
    return seen, handles


def run_recorded(model, clip_model, images):
    """One no-grad forward of a MaPLe-structured model with every block's inputs and outputs
    recorded -> (inputs, outputs, the vision prompts, the image's patch embedding x0)."""
    seen, handles = record_blocks(clip_model, pre=True)
    outs, out_handles = record_blocks(clip_model, pre=False)
    with torch.no_grad():
        model(images)
        vis = model.prompt_learner.vision_prompts()  # [P~_0, .., P~_{J-1}]
        x0 = clip_model.visual.embed(images)
    for h in handles + out_handles:
        h.remove()
    return seen, outs, vis, x0

def folder_dataset(root, classes, per_class=6, seed=0):
    """root/<class>/<i>.png: 32x32 random-colour images (a 50/20/30 split: 3/1/2 per class)."""
    rng = np.random.default_rng(seed)
    for c in classes:
        os.makedirs(os.path.join(root, c))
        for i in range(per_class):
            pixels = np.full((32, 32, 3), rng.integers(0, 256, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(os.path.join(root, c, f"{i}.png"))
    return str(root)


def tiny_world(tmp):
    """A tiny random CLIP checkpoint and a 4-class folder dataset under `tmp` (train.py's
    --backbone and --root for quick end-to-end runs)."""
    torch.save(make_tiny_clip().state_dict(), tmp / "tiny.pt")
    return dict(tmp=tmp, ckpt=str(tmp / "tiny.pt"),
                data=folder_dataset(tmp / "pets", ["cat", "dog", "red fox", "sea_lion"]))
