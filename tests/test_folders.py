"""Folder datasets (--dataset folder --root DIR) and folder listing: odd folder contents are
skipped with a warning that names them, ambiguous classes and protocols are refused with the
numbers, and a wrong --root says what --root must be."""
import json
import os

import numpy as np
import pytest
from PIL import Image

import data
from conftest import folder_dataset
from tools import predict


@pytest.mark.parametrize("a, b, read_as", [("Circle", "circle", "circle"),
                                           ("red_fox", "red fox", "red fox"),
                                           ("sea  lion", "Sea_Lion", "sea lion")])
def test_class_names_clip_reads_alike_are_refused_naming_both(tmp_path, a, b, read_as):
    root = folder_dataset(tmp_path, ["cat", a, b])
    with pytest.raises(data.DataError, match=rf"'{b}' and '{a}'|'{a}' and '{b}'") as info:
        data.load("folder", root)
    assert f"both read as '{read_as}'" in str(info.value)
    assert not os.path.exists(os.path.join(root, "split_folder.json"))  # refused before writing


def test_a_saved_split_with_names_clip_reads_alike_is_refused(tmp_path):
    root = folder_dataset(tmp_path, ["cat", "dog"])
    data.load("folder", root)  # writes split_folder.json
    path = os.path.join(root, "split_folder.json")
    split = json.load(open(path))
    split["test"] = [[p, y, "Cat" if c == "dog" else c] for p, y, c in split["test"]]
    json.dump(split, open(path, "w"))  # the dog label now reads "Cat": as an old split could
    with pytest.raises(data.DataError, match="'cat' and 'Cat'.*delete .*split_folder.json"):
        data.load("folder", root)


def test_hidden_folders_are_skipped_by_name(tmp_path):
    root = folder_dataset(tmp_path, ["cat", "dog", ".NET"])
    (tmp_path / "cat" / ".DS_Store").write_bytes(b"\0")
    with pytest.warns(UserWarning, match=r"skipping hidden folders \.NET"):
        ds = data.load("folder", root)
    assert ds.classnames == ["cat", "dog"] and len(ds.train + ds.val + ds.test) == 12


@pytest.mark.parametrize("n, base, new", [(1, 1, 0), (2, 1, 1), (3, 2, 1)])
def test_base2new_half_under_two_classes_is_refused_with_the_counts(tmp_path, n, base, new):
    ds = data.load("folder", folder_dataset(tmp_path, ["a", "b", "c"][:n]))
    with pytest.raises(data.DataError, match=rf"base2new splits {n} class(es)? into {base} "
                                             rf"base and {new} new; each half needs at least 2: "
                                             "use --protocol fewshot or add classes"):
        data.halves(ds, "base2new")
    assert list(data.halves(ds, "fewshot")) == ["all"]


def test_base2new_with_four_classes_has_two_per_half(tmp_path):
    ds = data.load("folder", folder_dataset(tmp_path, ["a", "b", "c", "d"]))
    halves = data.halves(ds, "base2new")
    assert [h.classnames for h in halves.values()] == [["a", "b"], ["c", "d"]]


def test_a_wrong_root_says_what_is_wrong(tmp_path, toy_root):
    os.symlink(tmp_path / "gone", tmp_path / "dangling")
    (tmp_path / "file").write_text("x")
    for root, what in (("dangling", "is a symbolic link to a missing path"),
                       ("missing", "not found"), ("file", "is not a folder")):
        with pytest.raises(data.DataError, match=f"{root} {what}.*--root names this image "
                                                 "folder itself"):
            data.load("folder", tmp_path / root)
    # the observed case: --dataset folder without --root reads ./data, which holds data/toy/
    with pytest.raises(data.DataError, match=r"toy holds no images, only subfolders: --root "
                                             "must name the image folder itself"):
        data.load("folder", toy_root)
    flat = tmp_path / "flat"
    flat.mkdir()
    Image.new("RGB", (4, 4)).save(flat / "a.png")
    with pytest.raises(data.DataError, match="holds images but has no class subfolders"):
        data.load("folder", flat)


def test_link_loops_and_odd_entries_are_skipped_with_a_warning(tmp_path):
    root = folder_dataset(tmp_path, ["cat", "dog"])
    cat = tmp_path / "cat"
    os.symlink("loop.jpg", cat / "loop.jpg")  # ELOOP on stat: the observed OSError 40
    os.symlink("missing.png", cat / "dangling.png")
    os.symlink("..", cat / "up")  # a folder link back up: not followed into (one level)
    os.mkdir(cat / "dir.jpg")  # a folder named like an image
    os.symlink(".", tmp_path / "again")  # a class folder that is the root itself
    os.symlink("cat", tmp_path / "kitty")  # a second name for the cat folder
    os.symlink("self", tmp_path / "self")
    with pytest.warns(UserWarning) as record:
        ds = data.load("folder", root)
    text = "\n".join(str(w.message) for w in record)
    for name in ("loop.jpg (Too many levels of symbolic links)", "dangling.png (a symbolic link",
                 "again (a link to", "kitty (a link to", "self (Too many levels"):
        assert name in text
    assert ds.classnames == ["cat", "dog"]
    assert sorted(os.path.basename(p) for p, y in ds.train + ds.val + ds.test if y == 0) == \
        [f"{i}.png" for i in range(6)]


def test_an_unreadable_class_folder_is_skipped_with_a_warning(tmp_path, monkeypatch):
    """Tests run as root, where chmod 000 blocks nothing: os.scandir is made to refuse one
    folder as it would refuse another user's."""
    root = folder_dataset(tmp_path, ["cat", "dog", "fox"])
    real_scandir = os.scandir

    def scandir(path):
        if os.path.basename(path) == "dog":
            raise PermissionError(13, "Permission denied", path)
        return real_scandir(path)
    monkeypatch.setattr(os, "scandir", scandir)
    with pytest.warns(UserWarning, match=r"skipping class folder dog: cannot list the folder "
                                         r".*dog \(Permission denied\)"):
        ds = data.load("folder", root)
    assert ds.classnames == ["cat", "fox"] and {y for _, y in ds.test} == {0, 1}
    with pytest.raises(data.DataError, match=r"cannot list the folder .* \(Permission denied\)"):
        data.load("folder", tmp_path / "dog")


def test_image_named_files_that_are_not_images_are_skipped_when_read(tmp_path):
    root = folder_dataset(tmp_path, ["cat", "dog"])
    (tmp_path / "cat" / "0.png").write_bytes(b"")  # zero bytes
    (tmp_path / "dog" / "0.png").write_text("<html>not an image</html>")
    ds = data.load("folder", root, shots=-1)
    items = ds.train + ds.val + ds.test
    loader = data.make_loader(items, 16, 4, False)
    with pytest.warns(UserWarning, match="skipping unreadable image"):
        n = sum(len(y) for _, y in loader)
    assert n == len(items) - 2 and {os.path.basename(p) for p in loader.skipped} == {"0.png"}


def test_predict_searches_folders_through_link_loops_once(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    for name in ("a/x.jpg", "a/b/y.png", "a/b/.hidden.png"):
        Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / name)
    os.symlink("..", tmp_path / "a" / "b" / "up")  # a loop: b/up/b/up/...
    os.symlink("loop.jpg", tmp_path / "a" / "loop.jpg")
    with pytest.warns(UserWarning, match="not readable files: .*loop.jpg"):
        found = data.find_images(str(tmp_path / "a"))
    assert found == [str(tmp_path / "a" / "b" / "y.png"), str(tmp_path / "a" / "x.jpg")]
    paths = predict.expand_images([str(tmp_path / "a" / "**" / "*.png"), str(tmp_path / "a")])
    assert sorted(os.path.basename(p) for p in paths) == ["x.jpg", "y.png"]  # each file once
