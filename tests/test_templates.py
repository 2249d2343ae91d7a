"""tools/templates.py: zero-shot accuracy per template, on a tiny folder dataset with a tiny
random checkpoint, and on the toy world against train.py --method zeroshot (CPU, seconds)."""
import os
import subprocess
import sys

import pytest
import torch

import train
from runs import UsageError
from conftest import folder_dataset, make_tiny_clip
from tools import templates

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("templates")
    ckpt = str(tmp / "tiny.pt")
    torch.save(make_tiny_clip().state_dict(), ckpt)
    return dict(tmp=tmp, ckpt=ckpt,
                data=folder_dataset(tmp / "pets", ["cat", "dog", "red fox", "sea_lion"]))


def run(world, *extra):
    return templates.main(["--dataset", "folder", "--root", world["data"], "--backbone",
                           world["ckpt"], "--device", "cpu", *extra])


def test_one_accuracy_per_template_and_the_spread(world, capsys):
    path = world["tmp"] / "mine.txt"
    path.write_text("# mine\na photo of a {}.\n\nart of the {}.\n  a {} in a video game.  \n")
    r = run(world, "--templates", str(path))
    acc = r["accuracy"]
    assert list(acc) == ["a photo of a {}.", "art of the {}.", "a {} in a video game."]
    assert all(0 <= a <= 100 for a in acc.values())
    assert r["spread"] == max(acc.values()) - min(acc.values())
    assert acc[r["best"]] == max(acc.values()) and acc[r["worst"]] == min(acc.values())
    out = capsys.readouterr().out
    assert "4 classes, 8 test images" in out  # 2 test images per class (folder split 50/20/30)
    for t, a in acc.items():
        assert f"{a:9.2f}  {t}" in out
    assert f"spread {r['spread']:.2f} points" in out


def test_default_templates_are_the_notes_five(world):
    assert list(run(world)["accuracy"]) == [
        "a photo of a {}.", "a picture of a {}.", "a close-up photo of a {}.",
        "this is a photo of the {}.", "a satellite photo of a {}."]


def test_bad_template_files(world):
    path = world["tmp"] / "bad.txt"
    path.write_text("a photo of a {}.\na photo of a cat.\n")
    with pytest.raises(UsageError, match=r"line 2: template 'a photo of a cat.' must hold exactly "
                                         r"one \{\}"):
        run(world, "--templates", str(path))
    path.write_text("# only a comment\n\n")
    with pytest.raises(UsageError, match="no template in the file"):
        run(world, "--templates", str(path))
    with pytest.raises(UsageError, match="missing.txt: cannot read it as text"):
        run(world, "--templates", str(world["tmp"] / "missing.txt"))
    path.write_bytes(b"\xff\xfe a {} \x00")
    with pytest.raises(UsageError, match="cannot read it as text"):
        run(world, "--templates", str(path))
    path.write_text("a {} in {place}.\n")
    with pytest.raises(UsageError, match="line 1: template .* no other braces"):
        run(world, "--templates", str(path))


def test_command_line_error_without_traceback(world):
    cmd = [sys.executable, "tools/templates.py", "--dataset", "folder", "--root", world["data"],
           "--backbone", world["ckpt"], "--device", "cpu", "--templates",
           str(world["tmp"] / "missing.txt")]
    run_ = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run_.returncode == 2 and run_.stderr.startswith("error: ")
    assert "Traceback" not in run_.stderr


def test_toy_numbers_are_train_py_zeroshot(toy_root, tmp_path):
    """The toy world and its shipped CLIP: the table's accuracy for a template is what
    train.py --method zeroshot --protocol fewshot --template T reports for all classes."""
    r = templates.main(["--root", toy_root, "--device", "cpu"])
    t = "a satellite photo of a {}."
    zs = train.main(["--method", "zeroshot", "--protocol", "fewshot", "--template", t, "--root",
                     toy_root, "--device", "cpu", "--out", str(tmp_path / "zs")])
    assert r["accuracy"][t] == zs["accuracy"]["all"]
