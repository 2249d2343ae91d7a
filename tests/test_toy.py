"""The embedded toy world (toy/world.py) and its CLIP pretraining script (toy/pretrain.py)."""
import json
import math
import os
import sys

import numpy as np
import torch

import clip
from toy import pretrain, world


def test_rendering_is_deterministic_by_seed():
    a_img, a_cap = world.sample_pretraining_batch(np.random.default_rng(3), 16)
    b_img, b_cap = world.sample_pretraining_batch(np.random.default_rng(3), 16)
    c_img, c_cap = world.sample_pretraining_batch(np.random.default_rng(4), 16)
    assert a_img.shape == (16, world.RES, world.RES, 3) and a_img.dtype == np.uint8
    assert np.array_equal(a_img, b_img) and a_cap == b_cap
    assert not np.array_equal(a_img, c_img) and a_cap != c_cap


def test_captions_name_the_rendered_attributes():
    rng = np.random.default_rng(0)
    a = world.sample_attributes(rng, 400)
    styled = {"outline": 0, "striped": 0}
    for i in range(400):
        shape, colour = world.SHAPES[a["shape"][i]], list(world.COLOURS)[a["colour"][i]]
        style, scene = world.STYLES[a["style"][i]], world.SCENES[a["scene"][i]]
        cap = world.caption(shape, colour, list(world.SIZES)[a["size"][i]], style, scene, rng)
        words = cap.rstrip(".").split()
        assert shape in words and cap.endswith(".")
        assert not set(words) & (set(world.SHAPES) - {shape}), cap  # no other shape named
        assert not set(words) & (set(world.COLOURS) - {colour}), cap  # nor another colour
        other_scenes = [p for s, ps in world._SCENE_WORDS.items() if s != scene for p in ps]
        assert not any(cap.endswith(p + ".") for p in other_scenes), cap
        if style in styled:
            styled[style] += {"outline": "outline" in cap or "drawing" in cap or "sketch" in cap,
                              "striped": "stripe" in cap}[style]
    n = np.bincount(a["style"], minlength=3)
    assert styled["outline"] > 0.75 * n[1] and styled["striped"] > 0.75 * n[2]


def test_rendered_object_has_its_colour():
    rng = np.random.default_rng(1)
    n = 64
    shapes = rng.choice([world.SHAPES.index(s) for s in ("circle", "square", "heart")], n)
    a = world.sample_attributes(rng, n, shapes=shapes, styles=0)
    a["size"][:] = list(world.SIZES).index("large")
    a["cx"][:] = a["cy"][:] = world.RES / 2
    images = world.render(a, rng).astype(float)
    centre = images[:, 14:18, 14:18].mean(axis=(1, 2))  # (n, 3) inside every object
    colours = np.array(list(world.COLOURS.values()), float)[a["colour"]]
    assert np.abs(centre - colours).max() < 45  # lighting jitter and noise only
    corner = images[:, :2, :2].mean(axis=(1, 2))  # the background scene shows in the corner
    assert np.abs(corner - colours).mean() > 40


def test_ensure_dataset_writes_coop_split_and_reuses_it(tmp_path):
    out = world.ensure_dataset(str(tmp_path))
    assert out == os.path.join(str(tmp_path), "toy")
    with open(os.path.join(out, "split_zhou_Toy.json")) as f:
        split = json.load(f)
    classes = world.TASK["classes"]
    for name in ("train", "val", "test"):
        items = split[name]
        assert len(items) == len(classes) * world.TASK["n_" + name]
        labels = [y for _, y, _ in items]
        assert np.bincount(labels).tolist() == [world.TASK["n_" + name]] * len(classes)
        assert all(c == classes[y] for _, y, c in items)
        assert all(os.path.isfile(os.path.join(out, "images", rel)) for rel, _, _ in items)
    # the standard base/new split (the first ceil(n/2) sorted labels) gives the designed base
    # classes, the ones with a spurious scene
    assert classes[:math.ceil(len(classes) / 2)] == list(world.spurious_scenes())
    stamp = os.path.join(out, "VERSION")
    before = os.path.getmtime(stamp)
    assert world.ensure_dataset(str(tmp_path)) == out
    assert os.path.getmtime(stamp) == before  # reused, not rendered again
    with open(stamp, "w") as f:
        f.write("an older world")
    world.ensure_dataset(str(tmp_path))  # stale: rendered again
    assert open(stamp).read().startswith("toy-world ")


def test_spurious_scene_correlation_only_in_base_train():
    classes = world.TASK["classes"]
    spurious = world.spurious_scenes()
    _, labels, scenes = world.task_split("train")
    for name, scene in spurious.items():
        on_it = scenes[labels == classes.index(name)] == world.SCENES.index(scene)
        assert on_it.mean() > 0.8, name
    for split in ("train", "val", "test"):
        _, labels, scenes = world.task_split(split)
        for c, name in enumerate(classes):
            if split == "train" and name in spurious:
                continue
            share = np.bincount(scenes[labels == c], minlength=len(world.SCENES)).max()
            assert share / (labels == c).sum() < 0.45, (split, name)  # no scene dominates


def test_pretrain_two_steps_saves_a_loadable_checkpoint(tmp_path, monkeypatch, capsys):
    out = str(tmp_path / "tiny.pt")
    monkeypatch.setattr(sys, "argv", [
        "pretrain", "--steps", "2", "--batch-size", "8", "--workers", "0", "--out", out,
        "--model", "vision_layers=1", "vision_width=64", "vision_patch_size=8",
        "transformer_layers=1", "embed_dim=64"])
    pretrain.main()
    log = capsys.readouterr().out
    assert "step      1  loss" in log and "zero-shot on the Toy test split" in log
    sd = torch.load(out, weights_only=True)
    assert all(v.dtype == torch.float16 for v in sd.values())
    model, _ = clip.load(out)  # strict, OpenAI layout
    assert model.visual.input_resolution == world.RES
    assert model.token_embedding.weight.shape == (49408, 64)
    assert model.logit_scale.item() <= math.log(100) + 1e-3


def test_default_config_fits_the_size_budget():
    with torch.device("meta"):  # shapes only, no memory
        n = sum(p.numel() for p in clip.CLIP(**pretrain.CONFIG).parameters())
    assert 2 * n / 2 ** 20 <= 16  # MiB in fp16
    cfg = pretrain.CONFIG
    assert cfg["vision_width"] % 64 == 0 and cfg["transformer_width"] % 64 == 0
