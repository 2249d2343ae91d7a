"""Right under every option: per-class learned tensors never meet other classes, the linear
probe never chooses C on test images, the official few-shot caches are used when present (and
read safely), and --protocol crossdataset carries each method's transfer recipe."""
import json
import os
import pickle
import sys
import types

import pytest
import torch

import data
import dassl_cache
import runs
import train
from conftest import folder_dataset, make_tiny_clip, resolve


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("transfer")
    torch.save(make_tiny_clip().state_dict(), tmp / "tiny.pt")
    return dict(tmp=tmp, ckpt=str(tmp / "tiny.pt"),
                pets=folder_dataset(tmp / "pets", ["cat", "dog", "red fox", "sea_lion"]),
                fruit=folder_dataset(tmp / "fruit", ["apple", "banana", "cherry", "date"], seed=1),
                few=folder_dataset(tmp / "few", ["apple", "banana", "cherry"], seed=2))


def args(world, out, *extra, root="pets"):
    return ["--dataset", "folder", "--root", world[root], "--backbone", world["ckpt"],
            "--shots", "2", "--batch-size", "2", "--device", "cpu",
            "--out", str(world["tmp"] / out), *extra]


# ---- per-class learned tensors: CoOp's class-specific context, the linear probe's head

@pytest.mark.parametrize("method, extra, message", [
    ("coop", ["--csc", "--ctx-init", ""], "--method coop --csc learns one tensor per"),
    ("linearprobe", [], "--method linearprobe learns one tensor per"),
])
def test_per_class_tensors_refused_under_base2new_before_training(world, method, extra, message):
    with pytest.raises(runs.UsageError, match=rf"{message} training class, which fits only those "
                                              "classes: use --protocol fewshot"):
        train.main(args(world, f"b2n_{method}", "--method", method, "--protocol", "base2new",
                        *extra))
    assert not os.path.exists(world["tmp"] / f"b2n_{method}" / "checkpoint.pt")


@pytest.mark.parametrize("method, extra", [("coop", ["--csc", "--ctx-init", "", "--epochs", "1"]),
                                           ("linearprobe", [])])
def test_per_class_tensors_only_evaluate_their_own_classes(world, method, extra):
    src = world["tmp"] / f"src_{method}"
    trained = train.main(args(world, src.name, "--method", method, "--protocol", "fewshot",
                              *extra))
    same = train.main(["--eval-only", "--load", str(src), "--dataset", "folder", "--root",
                       world["pets"], "--device", "cpu", "--out", str(src / "again")])
    assert same["accuracy"] == trained["accuracy"]  # its own classes: fine
    for other in ("fruit", "few"):  # 4 other classes (same count), 3 other classes
        with pytest.raises(runs.UsageError, match=r"It learned 4 classes \(cat, dog, red fox, "
                                                  r"\.\.\.\), not the \d of --dataset folder"):
            train.main(["--eval-only", "--load", str(src), "--dataset", "folder", "--root",
                        world[other], "--device", "cpu", "--out", str(src / other)])


def test_unified_context_still_transfers(world):
    src = world["tmp"] / "unified"
    train.main(args(world, src.name, "--method", "coop", "--protocol", "fewshot",
                    "--epochs", "1"))
    res = train.main(["--eval-only", "--load", str(src), "--dataset", "folder", "--root",
                      world["fruit"], "--device", "cpu"])
    assert set(res["accuracy"]) == {"all"}


# ---- the linear probe's validation shots

def imagenet(root, n_train=6):
    d = root / "imagenet"
    for w in ("n01", "n02", "n03"):
        for split, n in (("train", n_train), ("val", 3)):
            folder_dataset(d / "images" / split / "tmp", [w], per_class=n)
            os.rename(d / "images" / split / "tmp" / w, d / "images" / split / w)
            os.rmdir(d / "images" / split / "tmp")
    (d / "classnames.txt").write_text("n01 tench\nn02 goldfish\nn03 great white shark\n")
    return d


def test_linear_probe_never_chooses_c_on_test_images(world, tmp_path, monkeypatch):
    imagenet(tmp_path)
    seen = {}
    fit = train.linearprobe.LinearProbe.fit

    def spy(self, train_loader, val_loader):
        seen["train"], seen["val"] = train_loader.dataset.items, val_loader.dataset.items
        return fit(self, train_loader, val_loader)

    monkeypatch.setattr(train.linearprobe.LinearProbe, "fit", spy)
    res = train.main(["--method", "linearprobe", "--dataset", "imagenet", "--root",
                      str(tmp_path), "--backbone", world["ckpt"], "--shots", "2", "--device",
                      "cpu", "--out", str(tmp_path / "lp")])
    test = set(data.load("imagenet", tmp_path, 2, 1).test)
    assert len(seen["val"]) == 3 * 2  # min(shots, 4) per class, as lpclip's val shots
    assert not set(seen["val"]) & test and not set(seen["val"]) & set(seen["train"])
    assert set(res["accuracy"]) == {"all"}


# ---- the official few-shot caches

@pytest.fixture
def dassl(monkeypatch):
    """Dassl's Datum under its own module name, to write caches as the official code does."""
    class Datum:
        def __init__(self, impath, label, classname):
            self._impath, self._label, self._domain, self._classname = impath, label, 0, classname

    for name in ("dassl", "dassl.data", "dassl.data.datasets"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    module = types.ModuleType("dassl.data.datasets.base_dataset")
    Datum.__module__, Datum.__qualname__, module.Datum = module.__name__, "Datum", Datum
    monkeypatch.setitem(sys.modules, module.__name__, module)
    return Datum


def pets_split(root):
    """An OxfordPets folder (split JSON, 3 classes x 6/3/2 images)."""
    d = root / "oxford_pets"
    split = {"train": [], "val": [], "test": []}
    for label, cls in enumerate(["abyssinian", "pug", "sphynx"]):
        for key, n in (("train", 6), ("val", 3), ("test", 2)):
            folder_dataset(d / "tmp", [f"{cls}_{key}"], per_class=n)
            for i in range(n):
                os.makedirs(d / "images", exist_ok=True)
                os.rename(d / "tmp" / f"{cls}_{key}" / f"{i}.png",
                          d / "images" / f"{cls}_{key}_{i}.png")
                split[key].append([f"{cls}_{key}_{i}.png", label, cls])
    (d / "split_zhou_OxfordPets.json").write_text(json.dumps(split))
    return d


def test_official_fewshot_cache_is_used_from_a_moved_root(tmp_path, dassl):
    d = pets_split(tmp_path)
    elsewhere = "/home/someone/datasets/oxford_pets/images"  # where the cache was written
    picks = {"train": [("pug_train_5.png", 1), ("abyssinian_train_0.png", 0),
                       ("sphynx_train_3.png", 2), ("pug_train_1.png", 1)],
             "val": [("sphynx_val_2.png", 2)]}
    os.makedirs(d / "split_fewshot")
    with open(d / "split_fewshot" / "shot_2-seed_7.pkl", "wb") as f:
        pickle.dump({k: [dassl(f"{elsewhere}/{p}", y, "x") for p, y in v]
                     for k, v in picks.items()}, f, protocol=pickle.HIGHEST_PROTOCOL)
    ds = data.load("oxford_pets", tmp_path, shots=2, seed=7)
    want = {k: [(str(d / "images" / p), y) for p, y in v] for k, v in picks.items()}
    assert ds.train == want["train"] and ds.val == want["val"]  # the cache's, in its order
    assert "official few-shot cache" in ds.source and "shot_2-seed_7.pkl" in ds.source
    other = data.load("oxford_pets", tmp_path, shots=2, seed=8)  # no cache: our sampler
    assert "our sampler" in other.source and len(other.train) == 6


def test_cache_that_would_run_code_is_refused(tmp_path, dassl):
    d = pets_split(tmp_path)
    os.makedirs(d / "split_fewshot")

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo hacked > " + str(tmp_path / "hacked"),))

    with open(d / "split_fewshot" / "shot_2-seed_1.pkl", "wb") as f:
        pickle.dump({"train": [Evil()], "val": []}, f)
    with pytest.raises(dassl_cache.CacheError, match=r"holds a posix.system|holds a os.system|"
                                                    r"would run code"):
        data.load("oxford_pets", tmp_path, shots=2, seed=1)
    assert not (tmp_path / "hacked").exists()


def test_cache_from_another_split_is_refused(tmp_path, dassl):
    d = pets_split(tmp_path)
    os.makedirs(d / "split_fewshot")
    with open(d / "split_fewshot" / "shot_2-seed_1.pkl", "wb") as f:
        pickle.dump({"train": [dassl("/x/oxford_pets/images/pug_test_0.png", 1, "pug")],
                     "val": []}, f, protocol=pickle.HIGHEST_PROTOCOL)
    with pytest.raises(dassl_cache.CacheError, match="made from another split"):
        data.load("oxford_pets", tmp_path, shots=2, seed=1)


def test_imagenet_preprocessed_lists_give_the_official_order(tmp_path, dassl):
    d = imagenet(tmp_path)
    ours = data.load("imagenet", tmp_path, shots=2, seed=1)
    # the official lists follow listdir order: here reversed within each class
    train = sorted(ours.train + [x for x in data.load("imagenet", tmp_path, -1, 1).train
                                 if x not in ours.train], key=lambda x: (x[1], x[0]))
    lists = {"train": [dassl(p.replace(str(tmp_path), "/old/root"), y, "c")
                       for y in range(3) for p, _ in reversed([t for t in train if t[1] == y])],
             "test": [dassl(p.replace(str(tmp_path), "/old/root"), y, "c") for p, y in ours.test]}
    with open(d / "preprocessed.pkl", "wb") as f:
        pickle.dump(lists, f, protocol=pickle.HIGHEST_PROTOCOL)
    official = data.load("imagenet", tmp_path, shots=2, seed=1)
    assert official.test == ours.test and official.classnames == ours.classnames
    assert sorted(official.train) != sorted(ours.train)  # the same sampler, another order
    assert not set(official.val) & set(official.train)


# ---- --protocol crossdataset: each method's transfer recipe

def config(*argv):
    return resolve(*argv)


def test_crossdataset_recipes_come_from_the_method_files():
    maple = config("--method", "maple", "--dataset", "imagenet", "--protocol", "crossdataset")
    assert (maple["prompt_depth"], maple["lr"], maple["epochs"]) == (3, 0.0026, 2)
    coop = config("--method", "coop", "--dataset", "imagenet", "--protocol", "crossdataset")
    assert (coop["n_ctx"], coop["ctx_init"], coop["epochs"]) == (4, "a photo of a", 50)
    cocoop = config("--method", "cocoop", "--dataset", "imagenet", "--protocol", "crossdataset")
    assert (cocoop["epochs"], cocoop["batch_size"], cocoop["lr"]) == (10, 1, 0.002)
    assert maple["out"].endswith("ViT-B-16_16shots_crossdataset/seed1")


def test_crossdataset_then_eval_on_another_dataset(world):
    src = world["tmp"] / "xd"
    res = train.main(args(world, src.name, "--method", "coop", "--protocol", "crossdataset",
                          "--epochs", "1"))
    assert set(res["accuracy"]) == {"all"} and res["protocol"] == "crossdataset"
    assert res["config"]["n_ctx"] == 4  # the recipe reached the run
    target = train.main(["--eval-only", "--load", str(src), "--dataset", "folder", "--root",
                         world["fruit"], "--device", "cpu"])
    assert set(target["accuracy"]) == {"all"}
    assert os.path.isfile(src / "eval_folder_crossdataset" / "results.json")
    assert json.loads((src / "results.json").read_text())["fewshot_source"].startswith("our")
