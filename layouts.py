"""How each dataset lies on disk, and reading it: CoOp's split files, FGVCAircraft's txt files,
ImageNet's class folders (and its test-only variants), any folder of class subfolders, the toy.

The layouts are those of CoOp's DATASETS.md, so an existing data root works unchanged:
read("oxford_pets", "~/data") reads ~/data/oxford_pets/split_zhou_OxfordPets.json and
~/data/oxford_pets/images/. Quirks live in the DATASETS table. "folder" is any folder of class
subfolders (root/<class>/<image>), split 50/20/30 once and saved as root/split_folder.json;
"toy" is the embedded toy world (toy/world.py). A wrong layout gets a DataError naming the path
it expected and the layout it wants. data.py samples the few shots and loads the images.

Split JSON format (CoOp's): {"train": [[relative_impath, label, classname], ...], "val": ...,
"test": ...}.
"""
import json
import os
import random
import warnings

import clip
import clip.tokenizer
import dassl_cache


class DataError(Exception):
    """A dataset is missing or laid out differently from what load() expects."""


# ---- The table: dataset name -> folders and quirks (CoOp:datasets/*.py, CoOp:DATASETS.md)
# name: (kind, dataset folder, image folder, split file); "" = the dataset folder itself.
# kind "split" reads split_zhou_<Name>.json, "fgvc" FGVCAircraft's txt files, "imagenet" the
# wnid folders of images/train and images/val, "wnids"/"numbered" a test-only ImageNet variant.
_TABLE = {
    "imagenet": ("imagenet", "imagenet", "images", ""),
    "caltech101": ("split", "caltech-101", "101_ObjectCategories", "split_zhou_Caltech101.json"),
    "oxford_pets": ("split", "oxford_pets", "images", "split_zhou_OxfordPets.json"),
    # StanfordCars' JSON paths are relative to the dataset folder (cars_train/...).
    "stanford_cars": ("split", "stanford_cars", "", "split_zhou_StanfordCars.json"),
    "oxford_flowers": ("split", "oxford_flowers", "jpg", "split_zhou_OxfordFlowers.json"),
    "food101": ("split", "food-101", "images", "split_zhou_Food101.json"),
    "fgvc_aircraft": ("fgvc", "fgvc_aircraft", "images", ""),
    "sun397": ("split", "sun397", "SUN397", "split_zhou_SUN397.json"),
    "dtd": ("split", "dtd", "images", "split_zhou_DescribableTextures.json"),
    "eurosat": ("split", "eurosat", "2750", "split_zhou_EuroSAT.json"),
    "ucf101": ("split", "ucf101", "UCF-101-midframes", "split_zhou_UCF101.json"),
    # Test-only ImageNet variants; each folder holds a copy of imagenet/classnames.txt.
    "imagenetv2": ("numbered", "imagenetv2", "imagenetv2-matched-frequency-format-val", ""),
    "imagenet_sketch": ("wnids", "imagenet-sketch", "images", ""),
    "imagenet_a": ("wnids", "imagenet-adversarial", "imagenet-a", ""),
    "imagenet_r": ("wnids", "imagenet-rendition", "imagenet-r", ""),
    "folder": ("folder", "", "", "split_folder.json"),
    "toy": ("toy", "toy", "images", "split_zhou_Toy.json"),  # rendered by toy.world
}
PHOTO = clip.PHOTO  # "a photo of a {}."
TEMPLATES = {  # CoOp:trainers/zsclip.py CUSTOM_TEMPLATES; every other dataset uses PHOTO
    "oxford_pets": "a photo of a {}, a type of pet.",
    "oxford_flowers": "a photo of a {}, a type of flower.",
    "fgvc_aircraft": "a photo of a {}, a type of aircraft.",
    "dtd": "{} texture.", "eurosat": "a centered satellite photo of {}.",
    "food101": "a photo of {}, a type of food.", "ucf101": "a photo of a person doing {}."}
# Class-name quirks. The official JSONs already hold the renamed names (renaming is idempotent);
# these make a JSON listing raw folder names give the same 100 Caltech / 10 EuroSAT classes.
QUIRKS = {
    "caltech101": dict(ignore=("BACKGROUND_Google", "Faces_easy"), rename={
        "airplanes": "airplane", "Faces": "face", "Leopards": "leopard",
        "Motorbikes": "motorbike"}),
    "eurosat": dict(rename={
        "AnnualCrop": "Annual Crop Land", "Forest": "Forest",
        "HerbaceousVegetation": "Herbaceous Vegetation Land", "Highway": "Highway or Road",
        "Industrial": "Industrial Buildings", "Pasture": "Pasture Land",
        "PermanentCrop": "Permanent Crop Land", "Residential": "Residential Buildings",
        "River": "River", "SeaLake": "Sea or Lake"})}
DATASETS = {name: dict(name=name, kind=kind, dir=folder, images=images, split=split,
                       template=TEMPLATES.get(name, PHOTO), **QUIRKS.get(name, {}))
            for name, (kind, folder, images, split) in _TABLE.items()}
LAYOUTS = {  # what each kind expects, for error messages; d = <root>/<dataset folder>
    "split": "{d}/{images}/... and {d}/{split}", "toy": "{d}/{images}/... and {d}/{split}",
    "imagenet": "{d}/images/train/<wnid>/*.JPEG, {d}/images/val/<wnid>/*.JPEG, {d}/classnames.txt",
    "wnids": "{d}/{images}/<wnid>/<image> and {d}/classnames.txt",
    "numbered": "{d}/{images}/<0..999>/<image> and {d}/classnames.txt",
    "fgvc": "{d}/images/*.jpg, {d}/variants.txt, {d}/images_variant_{{train,val,test}}.txt",
    "folder": "<root>/<class name>/<image> (--root names this image folder itself)"}
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
FOLDER_SPLIT = (0.5, 0.2)  # train/val fractions, rest test (CoOp:datasets/dtd.py)


# ---- Readers: each returns ({"train"|"val"|"test": [(path, label)]}, {label: classname}).
def _layout(spec):
    """The layout dataset `spec` expects, for error messages."""
    text = LAYOUTS[spec["kind"]].format(d=f"<root>/{spec['dir']}".rstrip("/"), **spec)
    return text.replace("//", "/")


def _need(path, spec, what="", isdir=True):
    """`path` if it exists, else a DataError that names it and the layout `spec` wants."""
    if not (os.path.isdir(path) if isdir else os.path.isfile(path)):
        found = "is a symbolic link to a missing path" if os.path.islink(path) and not \
            os.path.exists(path) else f"is not a {'folder' if isdir else 'file'}" if \
            os.path.exists(path) else "not found"
        raise DataError(f"{spec['name']}: {path} {found}. {what}Expected layout: "
                        f"{_layout(spec)}")
    return path


def _listdir(path, dirs):
    """Sorted subfolders (dirs=True) or image files (dirs=False) of `path`, symbolic links
    followed; one level only, so a link loop cannot recurse. Skipped with a warning: entries
    that cannot be read (a link loop, a dangling link, no permission), hidden folders (.name)
    and links to a folder already listed (or to `path` itself); hidden files (.DS_Store, macOS's
    ._x.jpg) are skipped silently. A folder that cannot be listed raises DataError."""
    try:
        with os.scandir(path) as it:
            entries = sorted(it, key=lambda e: (e.is_symlink(), e.name))  # real folders first
    except OSError as e:
        raise DataError(f"cannot list the folder {path} ({e.strerror}); check that it exists "
                        "and is readable") from None
    names, bad, hidden, seen = [], [], [], {os.path.realpath(path)}
    for e in entries:
        try:
            is_dir, is_file = e.is_dir(), e.is_file()  # both False: a dangling link
            if e.is_symlink() and not (is_dir or is_file):
                raise FileNotFoundError(2, "a symbolic link to a missing path")
        except OSError as err:
            bad.append(f"{e.name} ({err.strerror})")
            continue
        if e.name.startswith("."):
            if dirs and is_dir:
                hidden.append(e.name)
        elif dirs and is_dir and os.path.realpath(e.path) in seen:
            bad.append(f"{e.name} (a link to {os.path.realpath(e.path)}: listed already, or "
                       "the folder itself)")
        elif dirs and is_dir:
            names.append(e.name)
            seen.add(os.path.realpath(e.path))
        elif not dirs and is_file and e.name.lower().endswith(IMAGE_EXTS):
            names.append(e.name)
    if bad:
        warnings.warn(f"{path}: skipping {len(bad)} entries that cannot be used: "
                      f"{', '.join(sorted(bad))}")
    if hidden:
        warnings.warn(f"{path}: skipping hidden folders {', '.join(hidden)} (a name starting "
                      "with '.'); rename them to use them")
    return sorted(names)


def find_images(folder):
    """The image files under `folder`, searched recursively (tools/predict.py), sorted; links
    followed, each real folder once (a link loop ends), hidden entries skipped, and image names
    that are not readable files skipped with a warning."""
    found, seen = [], set()
    for d, subdirs, files in os.walk(folder, followlinks=True, onerror=lambda e: warnings.warn(
            f"skipping {e.filename}: {e.strerror}")):
        if os.path.realpath(d) in seen:  # a link back to a folder already searched
            subdirs[:] = []
            continue
        seen.add(os.path.realpath(d))
        subdirs[:] = sorted(s for s in subdirs if not s.startswith("."))
        images = [os.path.join(d, f) for f in sorted(files)
                  if f.lower().endswith(IMAGE_EXTS) and not f.startswith(".")]
        broken = [p for p in images if not os.path.isfile(p)]  # a link loop or a dangling link
        if broken:
            warnings.warn(f"skipping {len(broken)} image names that are not readable files: "
                          f"{', '.join(broken[:5])}")
        found += [p for p in images if p not in broken]
    return sorted(found)


def check_prompt_names(names, where, fix):
    """Refuse two class folders whose names CLIP would read as the same words. The test is the
    tokenizer's own (clip/tokenizer.py encode: ftfy, whitespace collapsed, lowercased, then
    BPE), after load()'s "_" -> " ": the same ids make the same prompt, e.g. Circle/circle or
    red_fox/"red fox"."""
    first = {}
    for name in names:
        ids = tuple(clip.tokenizer.encode(name.replace("_", " ")))
        if ids in first:
            raise DataError(f"folder: the class folders {first[ids]!r} and {name!r} in {where} "
                            f"both read as {clip.tokenizer.decode(ids)!r} to CLIP (its tokenizer "
                            "lowercases and cleans spaces; '_' reads as a space), so their "
                            f"prompts would be the same: {fix}")
        first[ids] = name


def _check_split(split, path, spec):
    """CoOp's split format, checked before any of it is used: {"train"|"val"|"test": [[image
    path, label >= 0, class name], ...]}. What is wrong first -> DataError naming the file."""
    what = None if isinstance(split, dict) else f"{json.dumps(split)[:40]}, not an object"
    for key in ("train", "val", "test"):
        if what is None and not isinstance(split.get(key), list):
            what = f"{key!r} is {'not a list' if key in split else 'missing'}"
        for row in split[key] if what is None else ():
            if not (isinstance(row, list) and len(row) == 3 and isinstance(row[0], str) and
                    type(row[1]) is int and row[1] >= 0 and isinstance(row[2], str)):
                what = f"{key} holds {str(row)[:80]}, not [image path, label >= 0, class name]"
                break
    if what:
        raise DataError(f"{spec['name']}: {path} is not a split in CoOp's format ({what}); "
                        "download it again, or delete it if train.py wrote it")


def _read_split(split, image_dir, spec):
    """A split in CoOp's JSON format (a dict, or the path of its file) -> (splits, names)."""
    if isinstance(split, str):
        with open(_need(split, spec, f"Download {os.path.basename(split)} from the link in "
                        "CoOp's DATASETS.md (github.com/KaiyangZhou/CoOp/blob/main/DATASETS.md) "
                        "and put it there. ", isdir=False)) as f:
            try:
                split = json.load(f)
            except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
                raise DataError(f"{spec['name']}: {f.name} is not valid JSON ({e}); download it "
                                "again, or delete it if train.py wrote it") from None
        _check_split(split, f.name, spec)
    splits, names = {}, {}
    for key in ("train", "val", "test"):
        rows = [(p, y, c) for p, y, c in split[key]
                if p.split("/")[0] not in spec.get("ignore", ())]
        splits[key] = [(os.path.join(image_dir, p), y) for p, y, _ in rows]
        names.update((y, spec.get("rename", {}).get(c, c)) for _, y, c in rows)  # one per label
    return splits, names


def _class_files(root, spec):
    """{class folder: its image files} of a folder dataset; a class folder that cannot be
    listed is skipped with a warning (the others keep their order)."""
    classes = {}
    for cname in _listdir(_need(root, spec), dirs=True):
        try:
            classes[cname] = _listdir(os.path.join(root, cname), dirs=False)
        except DataError as e:
            warnings.warn(f"folder: skipping class folder {cname}: {e}")
    if not classes:
        flat = "holds images but " if _listdir(root, dirs=False) else ""
        raise DataError(f"folder: {root} {flat}has no class subfolders: put each class's images "
                        f"in a subfolder named after the class. Expected: {_layout(spec)}")
    for cname, files in classes.items():
        path = os.path.join(root, cname)
        if not files and _listdir(path, dirs=True):  # e.g. --root ./data holding data/toy/...
            raise DataError(f"folder: {path} holds no images, only subfolders: --root must name "
                            "the image folder itself (<root>/<class name>/<image>), not a "
                            "folder above it")
        if not files:
            raise DataError(f"folder: class folder {path} has no images "
                            f"({', '.join(IMAGE_EXTS)}); add some or remove the folder")
    return classes


def _make_folder_split(root, spec):
    """Split each class folder 50/20/30 with a seeded shuffle (seed 0, shared by every run), as
    CoOp's DTD.read_and_split_data does when a split file is absent; save it next to them."""
    classes = _class_files(root, spec)
    check_prompt_names(classes, root, "rename or merge one of them")
    rng, split = random.Random(0), {"train": [], "val": [], "test": []}
    for label, (cname, files) in enumerate(classes.items()):
        rng.shuffle(files)
        # NOTE(simplification): at least one train image per class; CoOp asserts instead.
        a = max(1, round(FOLDER_SPLIT[0] * len(files)))
        b = a + round(FOLDER_SPLIT[1] * len(files))
        for key, chunk in zip(split, (files[:a], files[a:b], files[b:])):
            split[key] += [[f"{cname}/{f}", label, cname] for f in chunk]
    path = os.path.join(root, spec["split"])
    try:
        with open(path, "w") as f:
            json.dump(split, f, indent=4)
        print(f"wrote split {path}; later runs reuse it")
    except OSError as e:
        warnings.warn(f"folder: could not write {path} ({e}); using the split in memory, "
                      "so it is made again next run")
    return split


def _read_wnid_folders(image_dir, wnids, wnid2name, spec):
    """Items from <image_dir>/<wnid>/<image>, labelled by the wnid's index in `wnids`."""
    folders = _listdir(image_dir, dirs=True)
    if not folders and _listdir(image_dir, dirs=False):
        raise DataError(f"{spec['name']}: {image_dir} holds images directly, not in class "
                        "folders. Sort them into one folder per class (for ImageNet val the "
                        f"usual valprep.sh script does this). Expected layout: {_layout(spec)}")
    index = {w: i for i, w in enumerate(wnids)}
    stray = [w for w in folders if w not in index or w not in wnid2name]
    if stray:  # a stray folder would shift every label
        raise DataError(f"{spec['name']}: unexpected folder {os.path.join(image_dir, stray[0])} "
                        f"(not in classnames.txt or images/train). Expected: {_layout(spec)}")
    items = [(os.path.join(image_dir, w, f), index[w])
             for w in folders for f in _listdir(os.path.join(image_dir, w), dirs=False)]
    if not items:
        raise DataError(f"{spec['name']}: no images under {image_dir}. Expected: {_layout(spec)}")
    return items


def _read_imagenet_like(d, spec):
    path = _need(os.path.join(d, "classnames.txt"), spec, "It is CoOp's ImageNet classnames.txt "
                 "(linked in CoOp's DATASETS.md; each variant needs a copy). ", isdir=False)
    with open(path) as f:  # lines: "<wnid> <class name>", e.g. "n01440764 tench"
        wnid2name = dict(line.strip().partition(" ")[::2] for line in f if line.strip())
    imagenet = spec["kind"] == "imagenet"
    train_dir = _need(os.path.join(d, "images", "train"), spec) if imagenet else None
    test_dir = _need(os.path.join(d, "images", "val") if imagenet else
                     os.path.join(d, spec["images"]), spec)
    if spec["kind"] == "numbered":  # ImageNet-V2: folder "i" is line i of classnames.txt
        wnids = [str(i) for i in range(len(wnid2name))]
        wnid2name = dict(zip(wnids, wnid2name.values()))
    else:  # sorted wnid folders; -A and -R have 200 of them, relabelled 0..199
        wnids = _listdir(train_dir or test_dir, dirs=True)
    cache = os.path.join(d, "preprocessed.pkl")
    if imagenet and os.path.isfile(cache):  # the official file lists (their listdir order)
        splits = dassl_cache.read(cache, d)
        print(f"using the official image lists {cache}")
    else:
        splits = {"test": _read_wnid_folders(test_dir, wnids, wnid2name, spec), "train": (
            _read_wnid_folders(train_dir, wnids, wnid2name, spec) if imagenet else [])}
    # NOTE(official code): ImageNet's val folder is the test set; its val shots are drawn from
    # the train images in load(), so that nothing is ever chosen on test images.
    return dict(splits, val=[]), dict(enumerate(wnid2name[w] for w in wnids))


def _read_fgvc(d, spec):
    with open(_need(os.path.join(d, "variants.txt"), spec, isdir=False)) as f:
        names = dict(enumerate(line.strip() for line in f if line.strip()))
    label_of, splits = {c: i for i, c in names.items()}, {}
    for key in ("train", "val", "test"):
        path = _need(os.path.join(d, f"images_variant_{key}.txt"), spec, isdir=False)
        with open(path) as f:  # lines: "<image id> <variant name with spaces>"
            rows = [line.strip().split(" ", 1) for line in f if line.strip()]
        bad = [r for r in rows if len(r) < 2 or r[1] not in label_of]
        if bad:
            raise DataError(f"fgvc_aircraft: {path} names a variant not in variants.txt: {bad[0]}")
        splits[key] = [(os.path.join(d, "images", i + ".jpg"), label_of[c]) for i, c in rows]
    return splits, names


def read(root, spec):
    """Dispatch on the dataset kind -> (splits, names, template, dataset folder); every listed
    image exists."""
    kind, template = spec["kind"], spec["template"]
    d = os.path.join(root, spec["dir"])
    if kind == "toy":
        from toy import world  # lazy: only the toy entry needs it
        try:  # rendered into the root on first use
            d, template = world.ensure_dataset(root), world.TEMPLATE
        except OSError as e:
            raise DataError(f"toy: cannot render the toy dataset into {root}/toy ({e.strerror}):"
                            " pass a --root that is a folder you can write to") from None
    if kind in ("imagenet", "wnids", "numbered"):  # listed from the folders: they exist
        return (*_read_imagenet_like(_need(d, spec), spec), template, d)
    if kind == "fgvc":
        splits, names = _read_fgvc(_need(d, spec), spec)
        source = "images_variant_*.txt"
    elif kind == "folder" and not os.path.isfile(os.path.join(root, spec["split"])):
        splits, names = _read_split(_make_folder_split(root, spec), root, spec)
        source = os.path.join(root, spec["split"])
    else:  # a split JSON: CoOp's, the toy's or a folder's saved one
        source = os.path.join(_need(d, spec), spec["split"])
        if kind == "folder":
            print(f"using the saved split {source} (delete it to split the folder again)")
        splits, names = _read_split(source, os.path.join(d, spec["images"]), spec)
        if kind == "folder":
            check_prompt_names([names[y] for y in sorted(names)], root, "rename or merge one of "
                               f"them and delete {source} to split the folder again")
    paths = [p for items in splits.values() for p, _ in items]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise DataError(f"{spec['name']}: {len(missing)} of {len(paths)} images listed in {source}"
                        f" are missing, e.g. {missing[0]}. Is the data root right? Expected "
                        f"layout: {_layout(spec)}")
    return splits, names, template, d
