"""data.py on tiny fake datasets written to tmp_path in the layouts of CoOp's DATASETS.md."""
import json
import os
import random

import numpy as np
import pytest
import torch
from PIL import Image

import data
import layouts
from data import DataError


def img(path, colour=(200, 30, 30), size=8):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", (size, size), colour).save(path)
    return str(path)


def split_dataset(root, folder, image_dir, split_file, classes, n=(6, 3, 4)):
    """A split-JSON dataset: classes = [(folder name, JSON class name)], n = (train, val, test)
    images per class; returns the split dict written."""
    split = {"train": [], "val": [], "test": []}
    for label, (cls, cname) in enumerate(classes):
        for key, count in zip(split, n):
            for i in range(count):
                rel = f"{cls}/{key}_{i}.jpg"
                img(os.path.join(root, folder, image_dir, rel))
                split[key].append([rel, label, cname])
    with open(os.path.join(root, folder, split_file), "w") as f:
        json.dump(split, f, indent=4)
    return split


PETS = [("abyssinian", "abyssinian"), ("great_pyrenees", "great_pyrenees"), ("pug", "pug")]


def pets(root, **kw):
    return split_dataset(root, "oxford_pets", "images", "split_zhou_OxfordPets.json", PETS, **kw)


# ------------------------------------------------------------------------ benchmark layouts

def test_oxford_pets_reads_coop_layout(tmp_path):
    pets(tmp_path)
    ds = data.load("oxford_pets", tmp_path)
    assert ds.classnames == ["abyssinian", "great pyrenees", "pug"]  # "_" -> " "
    assert (len(ds.train), len(ds.val), len(ds.test)) == (18, 9, 12)
    assert ds.template == "a photo of a {}, a type of pet." and not ds.test_only
    path, label = ds.train[6]
    assert path == os.path.join(tmp_path, "oxford_pets", "images", "great_pyrenees", "train_0.jpg")
    assert label == 1 and os.path.isfile(path)


def test_root_with_tilde(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    pets(tmp_path)
    assert len(data.load("oxford_pets", "~").test) == 12


def test_caltech_renames_and_ignored_folders(tmp_path):
    classes = [("BACKGROUND_Google", "BACKGROUND_Google"), ("accordion", "accordion"),
               ("airplanes", "airplanes"), ("Faces_easy", "Faces_easy"), ("Faces", "Faces")]
    split_dataset(tmp_path, "caltech-101", "101_ObjectCategories", "split_zhou_Caltech101.json",
                  classes, n=(2, 1, 1))
    ds = data.load("caltech101", tmp_path)
    assert ds.classnames == ["accordion", "airplane", "face"]
    assert sorted({y for _, y in ds.train + ds.val + ds.test}) == [0, 1, 2]  # relabelled
    assert not any("BACKGROUND" in p or "Faces_easy" in p for p, _ in ds.train + ds.test)
    assert ds.template == "a photo of a {}."


def test_eurosat_names_and_template(tmp_path):
    classes = [("AnnualCrop", "AnnualCrop"), ("SeaLake", "Sea or Lake")]  # raw and official
    split_dataset(tmp_path, "eurosat", "2750", "split_zhou_EuroSAT.json", classes, n=(1, 1, 1))
    ds = data.load("eurosat", tmp_path)
    assert ds.classnames == ["Annual Crop Land", "Sea or Lake"]
    assert ds.template == "a centered satellite photo of {}."


def test_stanford_cars_paths_relative_to_dataset_folder(tmp_path):
    split_dataset(tmp_path, "stanford_cars", "", "split_zhou_StanfordCars.json",
                  [("cars_train", "2012 Tesla Model S")], n=(1, 1, 1))
    ds = data.load("stanford_cars", tmp_path)
    assert ds.train[0][0] == os.path.join(tmp_path, "stanford_cars", "cars_train", "train_0.jpg")


def test_fgvc_aircraft_txt_layout(tmp_path):
    d = tmp_path / "fgvc_aircraft"
    variants = ["707-320", "A300B4", "Cessna 172"]
    os.makedirs(d)
    (d / "variants.txt").write_text("\n".join(variants) + "\n")
    for key in ("train", "val", "test"):
        rows = [f"{key}{i}{j} {v}" for i, v in enumerate(variants) for j in range(2)]
        (d / f"images_variant_{key}.txt").write_text("\n".join(rows) + "\n")
        for row in rows:
            img(d / "images" / (row.split(" ")[0] + ".jpg"))
    ds = data.load("fgvc_aircraft", tmp_path)
    assert ds.classnames == variants
    assert ds.template == "a photo of a {}, a type of aircraft."
    assert (str(d / "images" / "test21.jpg"), 2) in ds.test and len(ds.train) == 6


def imagenet(root, wnids, names, val_flat=False):
    d = root / "imagenet"
    for w in wnids:
        for i in range(3):
            img(d / "images" / "train" / w / f"{w}_{i}.JPEG")
        img(d / "images" / "val" / ("" if val_flat else w) / f"val_{w}.JPEG")
    (d / "classnames.txt").write_text("".join(f"{w} {n}\n" for w, n in zip(wnids, names)))


def test_imagenet_layout(tmp_path):
    wnids, names = ["n03", "n01", "n02"], ["toilet tissue", "tench", "great_white shark"]
    imagenet(tmp_path, wnids, names)
    with pytest.warns(UserWarning, match="imagenet val: 3 classes have fewer than 2 images"):
        ds = data.load("imagenet", tmp_path, shots=2, seed=1)
    assert ds.classnames == ["tench", "great white shark", "toilet tissue"]  # sorted wnids
    assert len(ds.train) == 6 and len(ds.test) == 3
    # ImageNet's val folder is its test set: the val shots come from the unpicked train images
    assert len(ds.val) == 3 and not set(ds.val) & (set(ds.train) | set(ds.test))
    assert "our sampler" in ds.source
    assert (str(tmp_path / "imagenet/images/val/n03/val_n03.JPEG"), 2) in ds.test
    assert all(os.path.basename(p).startswith(["n01", "n02", "n03"][y]) for p, y in ds.train)


def test_imagenet_flat_val_says_sort_into_folders(tmp_path):
    imagenet(tmp_path, ["n01", "n02"], ["tench", "goldfish"], val_flat=True)
    with pytest.raises(DataError, match="valprep") as e:
        data.load("imagenet", tmp_path)
    assert str(tmp_path / "imagenet" / "images" / "val") in str(e.value)


def test_imagenet_empty_val(tmp_path):
    imagenet(tmp_path, ["n01"], ["tench"])
    os.remove(tmp_path / "imagenet" / "images" / "val" / "n01" / "val_n01.JPEG")
    with pytest.raises(DataError, match="no images under"):
        data.load("imagenet", tmp_path)


def test_imagenet_missing_classnames(tmp_path):
    imagenet(tmp_path, ["n01"], ["tench"])
    os.remove(tmp_path / "imagenet" / "classnames.txt")
    with pytest.raises(DataError, match="classnames.txt") as e:
        data.load("imagenet", tmp_path)
    assert str(tmp_path / "imagenet" / "classnames.txt") in str(e.value)


def test_imagenet_a_relabels_its_200_class_subset(tmp_path):
    wnids = [f"n0{i}" for i in range(6)]
    d = tmp_path / "imagenet-adversarial"
    for w in ("n05", "n01", "n03"):  # three of the six classes present, like 200 of 1000
        img(d / "imagenet-a" / w / "a.jpg")
        img(d / "imagenet-a" / w / "b.jpg")
    (d / "imagenet-a" / "README.txt").write_text("ignored")
    (d / "classnames.txt").write_text("".join(f"{w} class {w}\n" for w in wnids))
    ds = data.load("imagenet_a", tmp_path, shots=16)
    assert ds.classnames == ["class n01", "class n03", "class n05"]
    assert sorted({y for _, y in ds.test}) == [0, 1, 2] and len(ds.test) == 6
    assert (str(d / "imagenet-a" / "n05" / "a.jpg"), 2) in ds.test
    assert ds.test_only and ds.train == [] and ds.val == []
    with pytest.raises(DataError, match="empty"):
        data.make_loader(ds.train, 8, 4, train=True)


def test_imagenetv2_numbered_folders(tmp_path):
    d = tmp_path / "imagenetv2"
    (d).mkdir()
    (d / "classnames.txt").write_text("n01 tench\nn02 goldfish\nn03 great white shark\n")
    img(d / "imagenetv2-matched-frequency-format-val" / "0" / "x.jpeg")
    img(d / "imagenetv2-matched-frequency-format-val" / "2" / "y.jpeg")
    ds = data.load("imagenetv2", tmp_path)
    assert ds.classnames == ["tench", "goldfish", "great white shark"]
    assert sorted(y for _, y in ds.test) == [0, 2] and ds.test_only
    img(d / "imagenetv2-matched-frequency-format-val" / "7" / "z.jpeg")
    with pytest.raises(DataError, match="unexpected folder"):
        data.load("imagenetv2", tmp_path)


# ------------------------------------------------------------------------ bad input

def test_missing_split_json_names_path_and_source(tmp_path):
    pets(tmp_path)
    path = tmp_path / "oxford_pets" / "split_zhou_OxfordPets.json"
    os.remove(path)
    with pytest.raises(DataError, match="DATASETS.md") as e:
        data.load("oxford_pets", tmp_path)
    assert str(path) in str(e.value) and not path.exists()  # no split was made up


def test_missing_dataset_folder(tmp_path):
    with pytest.raises(DataError, match="Expected layout") as e:
        data.load("dtd", tmp_path)
    assert str(tmp_path / "dtd") in str(e.value)


def test_missing_image_suggests_wrong_root(tmp_path):
    pets(tmp_path)
    gone = tmp_path / "oxford_pets" / "images" / "pug" / "test_1.jpg"
    os.remove(gone)
    with pytest.raises(DataError, match="root") as e:
        data.load("oxford_pets", tmp_path)
    assert str(gone) in str(e.value) and "1 of 39" in str(e.value)


def test_unknown_dataset():
    with pytest.raises(DataError, match="oxford_pets"):
        data.load("oxfordpets", "/nonexistent")


# ------------------------------------------------------------------------ few-shot, base/new

def test_fewshot_is_seeded_and_matches_dassl_sampling(tmp_path):
    pets(tmp_path, n=(10, 6, 2))
    a = data.load("oxford_pets", tmp_path, shots=4, seed=1)
    assert a.train == data.load("oxford_pets", tmp_path, shots=4, seed=1).train
    assert a.train != data.load("oxford_pets", tmp_path, shots=4, seed=2).train
    assert [sum(y == c for _, y in a.train) for c in range(3)] == [4, 4, 4]
    assert [sum(y == c for _, y in a.val) for c in range(3)] == [4, 4, 4]  # min(K, 4)
    assert len(a.test) == 6  # test is never sampled
    # Dassl: global random seeded, then random.sample per class in order, train then val
    full = data.load("oxford_pets", tmp_path)
    random.seed(1)
    ref = [x for c in range(3) for x in random.sample([t for t in full.train if t[1] == c], 4)]
    assert a.train == ref
    ref_val = [x for c in range(3) for x in random.sample([t for t in full.val if t[1] == c], 4)]
    assert a.val == ref_val


def test_fewshot_val_is_capped_and_all_means_all(tmp_path):
    pets(tmp_path, n=(10, 6, 2))
    ds = data.load("oxford_pets", tmp_path, shots=2)
    assert len(ds.train) == 6 and len(ds.val) == 6
    assert len(data.load("oxford_pets", tmp_path, shots=8).val) == 12
    assert len(data.load("oxford_pets", tmp_path, shots=0).train) == 30


def test_fewer_images_than_shots_warns_and_uses_all(tmp_path):
    pets(tmp_path, n=(3, 1, 1))
    with pytest.warns(UserWarning, match=r"fewer than 5 .*'great pyrenees' \(3\)"):
        ds = data.load("oxford_pets", tmp_path, shots=5)
    assert len(ds.train) == 9


def test_base_new_split(tmp_path):
    classes = [(f"c{i}", f"class_{i}") for i in range(5)]
    split_dataset(tmp_path, "dtd", "images", "split_zhou_DescribableTextures.json", classes,
                  n=(4, 2, 3))
    ds = data.load("dtd", tmp_path, shots=2)
    base, new = data.base_new(ds)
    assert base.classnames == ["class 0", "class 1", "class 2"]  # ceil(5/2) = 3 base classes
    assert new.classnames == ["class 3", "class 4"]
    assert (base.subset, new.subset) == ("base", "new") and ds.subset == "all"
    assert len(base.train) == 6 and len(new.train) == 4 and len(new.test) == 6
    assert len(base.val) == 6 and len(new.val) == 4
    assert sorted({y for _, y in new.train + new.val + new.test}) == [0, 1]  # relabelled
    for p, y in new.test:
        assert os.path.basename(os.path.dirname(p)) == f"c{y + 3}"
    assert base.template == ds.template == "{} texture."


# ------------------------------------------------------------------------ folder and toy

def folder(root, classes=("cat", "dog", "red_fox"), n=10):
    for c in classes:
        for i in range(n):
            img(root / c / f"{i}.png")
    (root / "notes.txt").write_text("not a class")


def test_folder_split_written_then_reused(tmp_path, capsys, monkeypatch):
    folder(tmp_path)
    ds = data.load("folder", tmp_path, shots=-1)
    assert "wrote split" in capsys.readouterr().out
    assert ds.classnames == ["cat", "dog", "red fox"] and ds.template == "a photo of a {}."
    assert (len(ds.train), len(ds.val), len(ds.test)) == (15, 6, 9)  # 50/20/30 per class
    with open(tmp_path / "split_folder.json") as f:
        saved = json.load(f)
    assert saved["train"][0][0].split("/")[0] == "cat" and saved["test"][-1][1:] == [2, "red_fox"]
    assert [(str(tmp_path / r), y) for r, y, _ in saved["val"]] == ds.val

    def no_new_split(*args):
        raise AssertionError("the saved split should be reused")

    monkeypatch.setattr(layouts, "_make_folder_split", no_new_split)
    again = data.load("folder", tmp_path, shots=-1)
    assert (again.train, again.val, again.test) == (ds.train, ds.val, ds.test)


def test_folder_unwritable_split_warns_and_continues(tmp_path, monkeypatch):
    folder(tmp_path)

    def read_only_open(path, mode="r", *args, **kwargs):  # as on a read-only disk (even as root)
        if "w" in mode:
            raise PermissionError(13, "Permission denied", str(path))
        return open(path, mode, *args, **kwargs)

    monkeypatch.setattr(layouts, "open", read_only_open, raising=False)
    with pytest.warns(UserWarning, match="could not write"):
        ds = data.load("folder", tmp_path)
    assert len(ds.train) == 15 and not (tmp_path / "split_folder.json").exists()


def test_folder_bad_layouts(tmp_path):
    with pytest.raises(DataError, match="not found"):
        data.load("folder", tmp_path / "nope")
    img(tmp_path / "flat.jpg")
    with pytest.raises(DataError, match="no class subfolders"):
        data.load("folder", tmp_path)
    (tmp_path / "empty_class").mkdir()
    with pytest.raises(DataError, match="empty_class has no images"):
        data.load("folder", tmp_path)


def test_toy_goes_through_the_split_json_reader(tmp_path, monkeypatch):
    from toy import world
    fake = tmp_path / "toy"
    split_dataset(tmp_path, "toy", "images", "split_zhou_Toy.json",
                  [("circle", "circle"), ("star", "star")], n=(5, 2, 2))
    monkeypatch.setattr(world, "ensure_dataset", lambda root: str(fake))
    monkeypatch.setattr(world, "TEMPLATE", "a toy {}.")
    ds = data.load("toy", tmp_path, shots=3)
    assert ds.classnames == ["circle", "star"] and ds.template == "a toy {}."
    assert len(ds.train) == 6 and ds.train[0][0].startswith(str(fake / "images"))


# ------------------------------------------------------------------------ transforms, loaders

def test_transforms_resolution_and_clip_normalisation(tmp_path):
    from clip import MEAN, STD
    image = Image.new("RGB", (30, 20), (255, 0, 128))
    x = data.test_transform(16)(image)
    assert x.shape == (3, 16, 16)
    expected = [(c / 255 - m) / s for c, m, s in zip((255, 0, 128), MEAN, STD)]
    assert torch.allclose(x.mean(dim=(1, 2)), torch.tensor(expected), atol=1e-2)
    assert data.train_transform(24)(image).shape == (3, 24, 24)


def items(tmp_path, n):
    return [(img(tmp_path / f"{i}.jpg", (i * 20, 0, 0)), i % 3) for i in range(n)]


def test_corrupt_image_is_skipped_and_counted(tmp_path):
    good = items(tmp_path, 3)
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    loader = data.make_loader(good + [(str(bad), 1)], 8, 2, train=False)
    with pytest.warns(UserWarning, match="bad.jpg"):
        batches = list(loader)
    assert sum(len(y) for _, y in batches) == 3 and len(loader.skipped) == 1
    list(loader)  # a second epoch does not count the same file again
    assert len(loader.skipped) == 1 and loader.skipped == {str(bad)}


def test_fewer_images_than_a_batch_still_train(tmp_path):
    loader = data.make_loader(items(tmp_path, 3), 8, 8, train=True)
    (images, labels), = list(loader)
    assert images.shape == (3, 3, 8, 8) and labels.dtype == torch.long and len(loader) == 1


def test_train_loader_drops_last_and_is_seeded(tmp_path):
    xs = items(tmp_path, 10)
    rng = np.random.default_rng(0)  # textured images: each crop and flip shows in the pixels
    for path, _ in xs:
        Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(path)

    def epoch(seed, e, draw=False):  # the images of one training epoch
        loader = data.make_loader(xs, 8, 4, True)
        loader.set_epoch(seed, e)
        if draw:  # anything else drawing from torch's generator must not change the crops
            torch.rand(100)
        return torch.cat([x for x, _ in loader])
    order = [epoch(0, 0), epoch(0, 0, draw=True), epoch(1, 0), epoch(0, 1)]
    assert len(order[0]) == 8  # two full batches of 4, the last 2 dropped
    assert torch.equal(order[0], order[1])  # the same (seed, epoch): the same order and crops
    assert not torch.equal(order[0], order[2]) and not torch.equal(order[0], order[3])
    test_labels = torch.cat([y for _, y in data.make_loader(xs, 8, 4, False)])
    assert test_labels.tolist() == [i % 3 for i in range(10)]  # eval: all, in order


def test_test_transform_keeps_the_aspect_and_crops_the_centre():
    """Aspect-preserving resize of the short side, then a centre crop (CoOp #8): on a 96x48
    image a centred 24x24 square stays square (a plain resize would squash it to 12x24) and the
    red bands at the far left and right fall outside the crop."""
    from clip import MEAN, STD
    image = Image.new("RGB", (96, 48), (0, 0, 0))
    image.paste((255, 255, 255), (36, 12, 60, 36))  # 24x24 white square in the centre
    image.paste((255, 0, 0), (0, 0, 12, 48))  # red bands at both ends
    image.paste((255, 0, 0), (84, 0, 96, 48))
    x = data.test_transform(32)(image)  # short side 48 -> 32: the square becomes 16x16
    assert x.shape == (3, 32, 32)
    white = x[1] > (0.5 - MEAN[1]) / STD[1]  # the green channel: white only, not red
    rows, cols = white.any(1).nonzero(), white.any(0).nonzero()
    assert rows.numel() == cols.numel() and abs(rows.numel() - 16) <= 1
    assert (rows.min() + rows.max()) / 2 == pytest.approx(15.5, abs=0.6)
    assert (cols.min() + cols.max()) / 2 == pytest.approx(15.5, abs=0.6)
    red = (x[0] > (0.5 - MEAN[0]) / STD[0]) & ~white
    assert not red.any()  # the crop keeps the middle 32 of 64 columns
