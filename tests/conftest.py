"""Shared test helpers: a tiny random CLIP in OpenAI's layout, and a batch of images for it."""
import pytest
import torch

import clip


def make_tiny_clip(**overrides):
    """A tiny random CLIP (seeded): ViT 32x32 px, patch 8, text width 64, embed dim 32.
    Keyword arguments override clip.CLIP's (e.g. vision_width=128 to make D != Dv)."""
    torch.manual_seed(0)
    config = dict(embed_dim=32, image_resolution=32, vision_layers=2, vision_width=64,
                  vision_patch_size=8, context_length=77, vocab_size=49408,
                  transformer_width=64, transformer_heads=1, transformer_layers=2)
    return clip.CLIP(**{**config, **overrides}).eval()


@pytest.fixture
def images():
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
