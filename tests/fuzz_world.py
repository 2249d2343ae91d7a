"""The files the command-line fuzz (tests/fuzz.py) points its flags at: a tiny CLIP, small
datasets, finished and interrupted runs, and every file train.py or a tool reads back, damaged
in the ways a disk, an editor or another program can damage it.

World(root) builds the shared fixtures once; `copy` gives a vector its own copy of one (a run
folder a vector may overwrite, a dataset folder it may write a split into), and the damage
tables below turn a copied file into a damaged one, drawn by the vector's random generator.
"""
import contextlib
import io
import json
import os
import pickle
import shutil
import sys
import types
import warnings

import torch

from conftest import folder_dataset, make_tiny_clip

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PETS = ["cat", "dog", "red fox", "sea_lion"]
# class folder names that are templates, format fields or non-ASCII to a tokenizer
ODD_CLASSES = ["{}", "{x} y", "猫 cat", "100%s"]
DTD_SPLIT = "split_zhou_DescribableTextures.json"


class World:
    """Shared, read-only fixtures under `root`; `toy_root` holds the rendered toy task."""

    def __init__(self, root, toy_root):
        self.root, self.toy_root = root, toy_root
        self.tiny = os.path.join(root, "tiny.pt")  # 12 layers per tower: every method's depth
        self.tiny2 = os.path.join(root, "tiny2.pt")  # another backbone (2 layers)
        self.fixtures = os.path.join(ROOT, "tests", "fixtures")
        if not os.path.isfile(os.path.join(root, "READY")):
            self._build()

    def path(self, name):
        return os.path.join(self.root, name)

    def _build(self):
        os.makedirs(self.root, exist_ok=True)
        torch.save(make_tiny_clip(vision_layers=12, transformer_layers=12).state_dict(),
                   self.tiny)
        torch.save(make_tiny_clip(seed=1).state_dict(), self.tiny2)
        folder_dataset(self.path("pets"), PETS)
        folder_dataset(self.path("fruit"), ["apple", "banana", "cherry", "date"], seed=1)
        folder_dataset(self.path("odd"), ODD_CLASSES, seed=2)
        self._dtd()
        texts = {"text.txt": "hello, this is not a model\n", "json.json": '{"learned": {}}',
                 "empty": "", "classes.txt": "cat\ndog\n# a comment\nred fox\n",
                 "words.txt": "photo outline sketch cat", "templates.txt":
                 "a photo of a {}.\n# the notes' second\na picture of a {}.\n",
                 "templates_bad.txt": "a photo of a {}.\nan {x} of a {}\n"}
        for name, text in texts.items():
            with open(self.path(name), "w", encoding="utf-8") as f:
                f.write(text)
        with open(self.path("latin1.txt"), "wb") as f:
            f.write(b"caf\xe9 cr\xe8me {}\n\xff\xfe")
        self._runs()
        open(self.path("READY"), "w").close()

    def _dtd(self):
        """dtd/ under root "dtd_root": CoOp's split-file layout, 4 classes x 6 images."""
        d = self.path(os.path.join("dtd_root", "dtd"))
        folder_dataset(os.path.join(d, "images"), ["banded", "dotted", "zigzagged", "woven"],
                       seed=3)
        split = {"train": [], "val": [], "test": []}
        for label, c in enumerate(sorted(os.listdir(os.path.join(d, "images")))):
            for i, key in enumerate(["train"] * 3 + ["val"] + ["test"] * 2):
                split[key].append([f"{c}/{i}.png", label, c])
        with open(os.path.join(d, DTD_SPLIT), "w") as f:
            json.dump(split, f)

    def _runs(self):
        """Finished, evaluated and interrupted runs of the tiny CLIP on pets (1 epoch each)."""
        import train  # noqa: PLC0415 - the fuzz's subject, imported when the world is built
        common = ["--dataset", "folder", "--root", self.path("pets"), "--backbone", self.tiny,
                  "--shots", "2", "--batch-size", "4", "--device", "cpu"]
        one = ["--epochs", "1"]
        runs = {"coop_fewshot": ["--method", "coop", "--protocol", "fewshot", *one],
                "coop_b2n": ["--method", "coop", *one],
                "coop_csc": ["--method", "coop", "--protocol", "fewshot", "--csc",
                             "--ctx-init", "", *one],
                "cocoop_b2n": ["--method", "cocoop", *one],
                "maple_b2n": ["--method", "maple", "--prompt-depth", "2", *one],
                "linearprobe": ["--method", "linearprobe", "--protocol", "fewshot"],
                "zeroshot_b2n": ["--method", "zeroshot"],
                "interrupted": ["--method", "coop", "--protocol", "fewshot", "--epochs", "2",
                                "--stop-after-epoch", "1"]}
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for name, extra in runs.items():
                train.main([*common, *extra, "--out", self.path(name)])
            train.main(["--eval-only", "--load", self.path("coop_fewshot"), "--dataset",
                        "folder", "--root", self.path("fruit"), "--device", "cpu"])

    def copy(self, name, scratch, as_name=None):
        """A vector's own copy of fixture `name` (a file or a folder) in `scratch`."""
        dst = os.path.join(scratch, as_name or os.path.basename(name))
        if not os.path.exists(dst):
            src = self.path(name)
            (shutil.copytree if os.path.isdir(src) else shutil.copyfile)(src, dst)
        return dst


# ---- damage: each function rewrites the file at `path` (a copy), drawing from `rng`
def _cut(path, rng):
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[:rng.randrange(max(len(data), 1))])


def _bytes(payload):
    def write(path, rng):
        with open(path, "wb") as f:
            f.write(payload)
    return write


def _flip(path, rng):
    with open(path, "rb") as f:
        data = bytearray(f.read())
    for _ in range(rng.randint(1, 8)):
        if data:
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    with open(path, "wb") as f:
        f.write(bytes(data))


def _saved(change):
    """A damage that loads a train.py .pt file, changes its content and saves it back."""
    def damage(path, rng):
        saved = torch.load(path, weights_only=True)
        saved = change(saved, rng)
        torch.save(saved, path)
    return damage


def _tensor(saved, rng):
    """A (key, tensor) of the learned state, drawn."""
    key = rng.choice(sorted(saved["learned"]))
    return key, saved["learned"][key]


def _set_tensor(how):
    def change(saved, rng):
        key, t = _tensor(saved, rng)
        saved["learned"][key] = how(t.clone())
        return saved
    return change


def _key(d, last, rng):
    """A key of dict `d`: `last`, one of a tuple `last`, or (None) any of its keys."""
    return rng.choice(sorted(d)) if last is None else rng.choice(last) if \
        isinstance(last, tuple) else last


def _set(keys, values):
    """Set saved[k1][k2]... to one of `values` (the last key: see _key)."""
    def change(saved, rng):
        target = saved
        for k in keys[:-1]:
            target = target[k]
        target[_key(target, keys[-1], rng)] = rng.choice(values)
        return saved
    return change


def _drop(section, names=None):
    """Remove one key (see _key) of saved[section], or of saved for section ""."""
    def change(saved, rng):
        target = saved[section] if section else saved
        target.pop(_key(target, names, rng), None)
        return saved
    return change


def _nan(t):
    t.view(-1)[0] = float("nan") if t.is_floating_point() else t.view(-1)[0]
    return t


CONFIG_KEYS = ("method", "backbone", "backbone_id", "protocol", "dataset", "root",
               "model_options", "n_ctx", "ctx_init", "out", "seed", "shots", "lr", "epochs")
PT_DAMAGES = {  # learned.pt and checkpoint.pt
    "truncated": _cut, "empty": _bytes(b""), "text": _bytes(b"hello, not a checkpoint\n"),
    "json": _bytes(b'{"learned": {}, "config": {}}'), "zeros": _bytes(bytes(4096)),
    "bit flips": _flip,
    "a list": _saved(lambda s, rng: [1, 2, 3]),
    "no learned": _saved(_drop("", "learned")), "no config": _saved(_drop("", "config")),
    "learned a list": _saved(_set(["learned"], [[1, 2], "ctx", None])),
    "a learned value not a tensor": _saved(_set(["learned", None], ["abc", 1.5, None, [1.0]])),
    "nan": _saved(_set_tensor(_nan)),
    "inf": _saved(_set_tensor(lambda t: t.fill_(float("inf")) if t.is_floating_point()
                              else t)),
    "another shape": _saved(_set_tensor(lambda t: torch.cat([t, t[:1]]) if t.dim() else
                                        t.reshape(1))),
    "int64": _saved(_set_tensor(lambda t: t.long())),
    "float16": _saved(_set_tensor(lambda t: t.half())),
    "bool": _saved(_set_tensor(lambda t: t.bool())),
    "complex": _saved(_set_tensor(lambda t: t.to(torch.complex64))),
    "empty tensor": _saved(_set_tensor(lambda t: t.new_zeros(0))),
    "an extra tensor": _saved(_set(["learned", "prompt_learner.bogus"], [torch.zeros(3)])),
    "a tensor missing": _saved(_drop("learned")),
    "config a string": _saved(_set(["config"], ["coop", None, [1, 2]])),
    "a config key missing": _saved(_drop("config", CONFIG_KEYS)),
    "unknown method": _saved(_set(["config", "method"], ["nope", "", None, 5, ["coop"]])),
    "model_options wrong": _saved(_set(["config", "model_options"],
                                       ["n_ctx", ["bogus"], None, 3])),
    "an option of the wrong type": _saved(_set(
        ["config", ("n_ctx", "ctx_init", "csc", "class_token_position", "prompt_depth",
                    "template", "finetune_part", "ensemble")],
        ["abc", -3, 10**9, None, 1.5, [], "{x}", True])),
    "backbone moved": _saved(_set(["config", "backbone"], ["/proc/nonexistent/tiny.pt", "",
                                                          "ViT-B/17", None, 3])),
    "backbone_id wrong": _saved(_set(["config", "backbone_id"], ["sha256:0", None, 7])),
    "dataset wrong": _saved(_set(["config", "dataset"], ["nope", None, 1, "folder"])),
    "root wrong": _saved(_set(["config", "root"], ["/proc/nonexistent", None, 5, ""])),
    "classnames wrong": _saved(_set(["classnames"], ["cat", [], [1, 2], None, ["a"] * 9,
                                                     ["cat", "cat", "dog", "fox"]])),
    "epoch wrong": _saved(_set(["epoch"], [-1, 0, 10**9, "1", 1.5, None, float("nan")])),
    "optimizer wrong": _saved(_set(["optimizer"], [{}, "sgd", None, {"state": {},
                                                                     "param_groups": []}])),
}

CLIP_DAMAGES = {  # a CLIP checkpoint (--backbone): a state dict
    "truncated": _cut, "empty": _bytes(b""), "text": _bytes(b"hello, not a checkpoint\n"),
    "zeros": _bytes(bytes(4096)), "bit flips": _flip,
    "a list": _saved(lambda s, rng: [1, 2, 3]),
    "wrapped badly": _saved(lambda s, rng: {"state_dict": rng.choice([5, "x", {"a": 1}])}),
    "a weight missing": _saved(_drop("")),
    "a weight reshaped": _saved(lambda s, rng: (lambda k: dict(s, **{k: torch.cat(
        [s[k], s[k][:1]]) if s[k].dim() else s[k].reshape(1)}))(rng.choice(sorted(s)))),
    "nan weights": _saved(lambda s, rng: (lambda k: dict(s, **{k: s[k].float().fill_(
        float("nan"))}))(rng.choice(sorted(s)))),
    "int weights": _saved(lambda s, rng: {k: v.long() for k, v in s.items()}),
    "a string value": _saved(lambda s, rng: dict(s, extra="x")),
}

RESULTS_DAMAGES = {  # results.json (tools/summarise.py reads them back)
    "truncated": _cut, "empty": _bytes(b""), "not JSON": _bytes(b"accuracy: 80\n"),
    "a list": _bytes(b"[1, 2]"), "null": _bytes(b"null"), "binary": _bytes(bytes(range(256))),
    **{f"{key} wrong": (lambda key, values: lambda p, rng: _json_set(p, rng, key, values))(
        key, values) for key, values in {
        "accuracy": [{}, {"base": "abc", "new": 1}, {"all": None}, {"all": [1]}, "80",
                     {"all": float("nan")}, {"base": 1e309, "new": -5}, {"hm": 3}],
        "shots": [[1], "16", None, {"a": 1}, 1.5, True],
        "seed": ["1", None, [1], 1.5],
        "method": [5, None, ["coop"], "", {"a": 1}],
        "dataset": [5, None, [], ""],
        "protocol": [5, None, "other", []],
        "backbone": [5, None, [], "a/b/c.pt"],
        "config": ["x", None, [], {"load": 5}, {"model_options": "n_ctx"},
                   {"model_options": [1], "load": None}, {"load": "/proc/nonexistent"}],
    }.items()},
}


def _json_set(path, rng, key, values):
    with open(path) as f:
        r = json.load(f)
    r[key] = rng.choice(values)
    with open(path, "w") as f:
        json.dump(r, f)


def _split_set(change):
    def damage(path, rng):
        with open(path) as f:
            split = json.load(f)
        split = change(split, rng)
        with open(path, "w") as f:
            json.dump(split, f)
    return damage


def _row(values, column):
    """Change `column` of one drawn row to one of `values`."""
    def change(split, rng):
        row = rng.choice(split["train"] + split["test"])
        row[column] = rng.choice(values)
        return split
    return change


SPLIT_DAMAGES = {  # CoOp's split JSON (and a folder dataset's saved split_folder.json)
    "truncated": _cut, "empty": _bytes(b""), "not JSON": _bytes(b"train: []"),
    "binary": _bytes(b"\x89PNG\r\n\x1a\n\0\0"), "a list": _bytes(b"[[], [], []]"),
    "null": _bytes(b"null"),
    "a split missing": _split_set(lambda s, rng: {k: v for k, v in s.items()
                                                  if k != rng.choice(["train", "val", "test"])}),
    "a split not a list": _split_set(lambda s, rng: dict(s, test=rng.choice(
        [None, "x", 5, {"a": 1}]))),
    "empty splits": _split_set(lambda s, rng: {"train": [], "val": [], "test": []}),
    "a row too short": _split_set(lambda s, rng: (s["train"].append(
        s["train"][0][:rng.randrange(3)]), s)[1]),
    "a row not a list": _split_set(lambda s, rng: (s["test"].append(rng.choice(
        ["x", 5, None, {"a": 1}])), s)[1]),
    "a label wrong": _split_set(_row(["1", -1, 1.5, None, True, 10**9, [0], float("nan")], 1)),
    "a path wrong": _split_set(_row([5, None, "", "../../../etc/passwd", "/etc/hostname",
                                     "missing.png", "a/../../b.png"], 0)),
    "a class name wrong": _split_set(_row([5, None, "", "{x}", "cat" * 40, [1]], 2)),
}


def _dassl_module():
    """Dassl's Datum under its module name, registered while the caches are written."""
    class Datum:
        def __init__(self, impath, label, classname):
            self._impath, self._label, self._domain, self._classname = impath, label, 0, \
                classname
    module = types.ModuleType("dassl.data.datasets.base_dataset")
    Datum.__module__, Datum.__qualname__, module.Datum = module.__name__, "Datum", Datum
    return module


def write_cache(dataset_dir, shots, seed, rng):
    """split_fewshot/shot_K-seed_S.pkl for `dataset_dir` (dtd): valid, or damaged by a drawn
    way -> the way."""
    module = _dassl_module()
    names = ["dassl", "dassl.data", "dassl.data.datasets", module.__name__]
    saved = {n: sys.modules.get(n) for n in names}
    sys.modules.update({n: types.ModuleType(n) for n in names[:-1]}, **{module.__name__: module})
    try:
        with open(os.path.join(dataset_dir, DTD_SPLIT)) as f:
            split = json.load(f)
        D = module.Datum
        good = {k: [D(f"/elsewhere/dtd/images/{p}", y, c) for p, y, c in split[k][:shots * 4]]
                for k in ("train", "val")}
        ways = {"valid": good, "a list": [1, 2], "items not Datum": {"train": [1, "x"]},
                "a label not an int": {"train": [D("/x/dtd/images/a.png", "0", "a")]},
                "a path not a str": {"train": [D(5, 0, "a")]},
                "a path outside the folder": {"train": [D("/x/other/a.png", 0, "a")]},
                "images not in the split": {"train": [D("/x/dtd/images/nope.png", 0, "a")]},
                "code": {"train": [types.SimpleNamespace(a=os.getcwd)]}}
        way = rng.choice(sorted(ways) + ["truncated", "binary"])
        buffer = io.BytesIO()
        with contextlib.suppress(pickle.PicklingError, TypeError, AttributeError):
            pickle.dump(ways.get(way, good), buffer, protocol=rng.choice([2, 4, 5]))
    finally:
        for n, m in saved.items():
            sys.modules.pop(n) if m is None else sys.modules.__setitem__(n, m)
    data = buffer.getvalue()
    data = data[:rng.randrange(max(len(data), 1))] if way == "truncated" else \
        bytes(rng.randrange(256) for _ in range(64)) if way == "binary" else data
    os.makedirs(os.path.join(dataset_dir, "split_fewshot"), exist_ok=True)
    with open(os.path.join(dataset_dir, "split_fewshot", f"shot_{shots}-seed_{seed}.pkl"),
              "wb") as f:
        f.write(data)
    return way


def damage(path, table, rng):
    """Damage the file at `path` one drawn way of `table` -> the way's name."""
    way = rng.choice(sorted(table))
    table[way](path, rng)
    return way
