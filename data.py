"""Datasets for the runs: few-shot (小样本) sampling, the base/new class split, transforms and
loaders. What train.py and tools/ use of the data, all here.

load(name, root, shots, seed) reads a dataset (its layout on disk: layouts.py; the official
caches: dassl_cache.py), samples the few shots per class as Dassl does, and returns a Dataset of
(image path, label) items; base_new() splits its classes; make_loader() turns items into
batches. Every image is read by open_image() (8-bit RGB from any mode PIL opens, at most
MAX_PIXELS and MAX_ASPECT); one that cannot be read is skipped with a warning naming why, and
counted (Loader.skipped).

Shape legend: B images in a batch, n_px the backbone's input resolution.
"""
import datetime
import math
import os
import time
import random
import struct
import warnings
from dataclasses import dataclass, replace

import torch
from PIL import Image, ImageOps
from torchvision import transforms as T

import clip
import dassl_cache
from clip.image import to_rgb
from layouts import (DATASETS, IMAGE_EXTS, PHOTO, DataError, find_images,  # noqa: F401
                     read)  # (data.DATASETS, data.find_images ...: one import for train/tools)


@dataclass
class Dataset:
    name: str
    classnames: list[str]          # label order, "_" already replaced by " "
    train: list[tuple[str, int]]   # (image path, label), few-shot sampled
    val: list[tuple[str, int]]     # few-shot: min(shots, 4) per class
    test: list[tuple[str, int]]    # never sampled
    template: str                  # zero-shot template, e.g. "a photo of a {}."
    test_only: bool = False  # ImageNet variants: nothing to train on
    subset: str = "all"      # "all", "base" or "new"
    source: str = ""         # where the few-shot images came from: a cache or our sampler

    def __str__(self):
        return (f"{self.name} ({self.subset}): {len(self.classnames)} classes, "
                f"train {len(self.train)}, val {len(self.val)}, test {len(self.test)}")


# ---- load(): read, few-shot sample; and the base/new split
def _subset(splits, names, labels):
    """Keep the items whose label is in `labels` (sorted) and relabel them 0..len(labels)-1."""
    new = {old: i for i, old in enumerate(labels)}
    kept = {k: [(p, new[y]) for p, y in items if y in new] for k, items in splits.items()}
    return kept, [names[old] for old in labels]


def _fewshot(items, shots, rng, classnames, what):
    """K images per class with rng.sample; classes in order of first appearance (Dassl's
    generate_fewshot_dataset). A class with fewer than K images is used whole, with a warning."""
    if shots <= 0:
        return items
    groups, picked = {}, []
    for item in items:
        groups.setdefault(item[1], []).append(item)
    for group in groups.values():
        picked += rng.sample(group, shots) if len(group) >= shots else group
    short = [f"'{classnames[y]}' ({len(g)})" for y, g in groups.items() if len(g) < shots]
    if short:
        more = f" and {len(short) - 10} more" if len(short) > 10 else ""
        warnings.warn(f"{what}: {len(short)} classes have fewer than {shots} images and are used "
                      f"whole: {', '.join(short[:10])}{more}")
    return picked


def load(name, root, shots=-1, seed=1):
    """Read dataset `name` under `root` (for "folder", root is the folder itself) and sample
    `shots` training images per class (<= 0: all) and min(shots, 4) validation images: the
    official picks where the dataset folder caches them (dassl_cache.py), else our sampler.
    Raises DataError, naming the expected path and layout, when files are missing."""
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; choose one of {', '.join(sorted(DATASETS))}")
    spec = DATASETS[name]
    splits, names, template, d = read(os.path.expanduser(str(root)), spec)
    cached = dassl_cache.fewshot(d, shots, seed, splits) if spec["dir"] else None
    labels = sorted(names)  # relabelled 0..n-1, even if ignored folders left gaps
    splits, classnames = _subset(splits, names, labels)
    cached = _subset(cached, names, labels)[0] if cached else {}
    classnames = [c.replace("_", " ") for c in classnames]  # as every CoOp trainer does
    for c in classnames:  # each goes into a prompt
        try:
            clip.check_words(c, "the class name")
        except ValueError as e:
            raise DataError(f"{name}: {e}") from None
    # One Random(seed), train then val, gives CoOp's few-shot picks for the same split order
    # (set_random_seed runs just before its sampling); any other random call in between, or
    # ImageNet's unsorted listdir order there (preprocessed.pkl keeps it), would change them.
    rng = random.Random(seed)
    train = cached.get("train") or _fewshot(splits["train"], shots, rng, classnames,
                                            f"{name} train")
    val = cached.get("val") or _fewshot(splits["val"], min(shots, 4), rng, classnames,
                                        f"{name} val")
    if spec["kind"] == "imagenet":  # val shots from the train images not picked for training
        picked = set(train)
        val = _fewshot([x for x in splits["train"] if x not in picked], min(shots, 4), rng,
                       classnames, f"{name} val") if shots > 0 else []
    source = "the official few-shot cache " + os.path.join(
        d, "split_fewshot", f"shot_{shots}-seed_{seed}.pkl") if cached else \
        f"our sampler (Dassl's, seed {seed})" if shots > 0 else "all images"
    return Dataset(name, classnames, train, val, splits["test"], template,
                   test_only=spec["kind"] in ("wnids", "numbered"), source=source)


def base_new(ds):
    """Split into base classes and new, unseen classes (未见类别) as CoOp's subsample_classes:
    sort the train labels, the first ceil(n/2) are base, the rest new; each half is relabelled
    from 0. Apply it after load(), i.e. after few-shot sampling, as the official code does."""
    labels = sorted({y for _, y in ds.train}) or list(range(len(ds.classnames)))
    m = math.ceil(len(labels) / 2)  # the larger half is base when n is odd
    out = []
    for subset, keep in (("base", labels[:m]), ("new", labels[m:])):
        splits, names = _subset({"train": ds.train, "val": ds.val, "test": ds.test},
                                ds.classnames, keep)
        out.append(replace(ds, classnames=names, subset=subset, **splits))
    return tuple(out)


def halves(ds, protocol):
    """The class halves a protocol trains and tests on: {"base", "new"} (base2new) or {"all"}
    (fewshot, crossdataset). Each base2new half needs two classes: on one class any model
    scores 100%."""
    if protocol != "base2new":
        return {"all": ds}
    base, new = base_new(ds)
    if min(len(base.classnames), len(new.classnames)) < 2:
        n = len(ds.classnames)
        raise DataError(f"{ds.name}: base2new splits {n} class{'es' * (n != 1)} into "
                        f"{len(base.classnames)} base and {len(new.classnames)} new; each half "
                        "needs at least 2: use --protocol fewshot or add classes")
    return {"base": base, "new": new}


# ---- Reading one image: the one path for training, evaluation and tools/predict.py
MAX_PIXELS = 100_000_000  # width x height; larger images are skipped (README "Bad input")
# long side / short side: the test transform resizes the short side to n_px, so a 1 x 100000
# strip (a small file) would become n_px x 100000 n_px pixels, gigabytes; thinner ones are skipped
MAX_ASPECT = 100
# What PIL raises for a file it cannot decode (measured by corrupting PNG, JPEG, GIF, BMP,
# WebP, TIFF, ICO, PPM, TGA and JPEG 2000 files: OSError, ValueError, SyntaxError, and
# DecompressionBombError for a damaged size; EOFError and struct.error come from plugins'
# header parsing).
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, struct.error)


class ImageError(DataError):
    """An image file that cannot be used: missing, empty, not an image, truncated, corrupt,
    larger than MAX_PIXELS or thinner than MAX_ASPECT."""


def open_image(path):
    """The image file `path` -> an 8-bit RGB PIL image: its first frame (animated GIF, WebP,
    multi-page TIFF), turned upright as its EXIF orientation says, any mode scaled to 8-bit RGB
    (clip/image.py). Raises ImageError naming the file and why it cannot be used."""
    if os.path.isfile(path) and os.path.getsize(path) == 0:
        raise ImageError(f"{path}: the file is empty (0 bytes)")
    try:
        with warnings.catch_warnings():  # PIL's own size warning: MAX_PIXELS decides instead
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                w, h = im.size  # from the header: nothing decoded yet
                if w * h > MAX_PIXELS:
                    raise ImageError(f"{path}: too large: {w} x {h} = {w * h:,} pixels, over "
                                     f"the limit of {MAX_PIXELS:,} (data.MAX_PIXELS); downscale "
                                     "it")
                if max(w, h) > MAX_ASPECT * min(w, h):
                    raise ImageError(f"{path}: too thin: {w} x {h}, its long side over "
                                     f"{MAX_ASPECT} times its short side (data.MAX_ASPECT); "
                                     "resized for the model it would take gigabytes: crop it")
                # NOTE(official code): Dassl's read_image ignores the EXIF orientation; we apply
                # it, so a phone photo is read the way it is shown (no tag: no change).
                return to_rgb(ImageOps.exif_transpose(im))
    except Image.DecompressionBombError as e:  # over PIL's own limit, Image.MAX_IMAGE_PIXELS
        raise ImageError(f"{path}: too large for PIL: {e} Downscale it (this project reads "
                         f"up to {MAX_PIXELS:,} pixels, data.MAX_PIXELS).") from None
    except _DECODE_ERRORS as e:
        raise ImageError(f"{path}: cannot be read as an image ({type(e).__name__}: "
                         f"{str(e)[:200]})") from None


# ---- Transforms (Dassl:dassl/data/transforms/transforms.py with CoOp's configs) and loaders
def train_transform(n_px):
    crop = T.RandomResizedCrop(n_px, scale=(0.08, 1.0), interpolation=T.InterpolationMode.BICUBIC)
    return T.Compose([crop, T.RandomHorizontalFlip(), T.ToTensor(),
                      T.Normalize(clip.MEAN, clip.STD)])  # (3, n_px, n_px)


# CLIP's own test transform: aspect-preserving bicubic resize, centre crop, normalise (a plain
# square resize costs ~1 point, CoOp #8).
test_transform = clip.preprocess


class ImageList(torch.utils.data.Dataset):
    """(path, label) items -> (image tensor, label); (None, (path, why)) for an unreadable one.
    With `seed` set (training), the random augmentation of image i is seeded by (seed, i): an
    image gets the same crop whichever process or data-loading worker reads it (DDP, --workers)."""

    def __init__(self, items, transform):
        self.items, self.transform, self.seed = items, transform, None

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        path, label = self.items[i]
        try:
            image = open_image(path)
        except ImageError as e:
            return None, (path, str(e))
        if self.seed is None:
            return self.transform(image), label
        with torch.random.fork_rng(devices=[]):  # the CPU generator the transforms draw from
            torch.default_generator.manual_seed(self.seed * 1_000_003 + i)
            return self.transform(image), label


def _collate(batch):
    """Drop unreadable images; their (path, why) travel with the batch, so the main process
    counts them even when workers (num_workers > 0) did the reading."""
    good = [b for b in batch if b[0] is not None]
    images = torch.stack([b[0] for b in good]) if good else torch.empty(0)  # (B, 3, n_px, n_px)
    labels = torch.tensor([b[1] for b in good], dtype=torch.long)  # (B,)
    return images, labels, [b[1] for b in batch if b[0] is None]


class Loader(torch.utils.data.DataLoader):
    """A DataLoader of (images (B, 3, n_px, n_px), labels (B,)). An unreadable image is skipped
    with a warning that says why, once per file however many epochs; `skipped` holds the paths.
    A progress line every `print_freq` batches and at the end (None: silent); a training
    loader's randomness is set per epoch by set_epoch."""

    def __init__(self, *args, name="", print_freq=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.skipped, self.name, self.print_freq = set(), name, print_freq

    def set_epoch(self, seed, epoch):
        """Seed the image order (this loader's generator) and each image's crop and flip
        (ImageList.seed) from (seed, epoch) alone: a resumed run repeats the same epoch."""
        self.generator.manual_seed(seed * 1000 + epoch)
        self.dataset.seed = seed * 1000 + epoch

    def __iter__(self):
        t0, done = time.time(), 0
        for i, (images, labels, bad) in enumerate(super().__iter__()):
            for path, why in bad:
                if path not in self.skipped:
                    warnings.warn(f"skipping unreadable image {why}")
                    self.skipped.add(path)
            if len(labels):
                yield images, labels
            done += len(labels)
            if self.print_freq and ((i + 1) % self.print_freq == 0 or i + 1 == len(self)):
                rate, left = done / max(time.time() - t0, 1e-9), len(self) - i - 1
                eta = datetime.timedelta(seconds=round(left * (time.time() - t0) / (i + 1)))
                print(f"{self.name} [{i + 1}/{len(self)}] images {done} ({rate:.1f}/s, this "
                      f"process) eta {eta}")


class _Share(torch.utils.data.BatchSampler):
    """The one-process batches, each cut into `world` equal shares: this rank's share (DDP: the
    ranks together read exactly the batch one process would, each only its part)."""

    def __init__(self, sampler, batch_size, drop_last, rank, world):
        super().__init__(sampler, batch_size, drop_last)
        self.rank, self.world = rank, world

    def __iter__(self):
        for batch in super().__iter__():
            n = len(batch) // self.world  # the global batch size is a multiple of world
            yield batch[self.rank * n:(self.rank + 1) * n]


def make_loader(items, n_px, batch_size, train, num_workers=0, rank=0, world=1,
                print_freq=None):
    """Train: augmented (train_transform), shuffled by a torch.Generator (Loader.set_epoch seeds
    it), and drop_last only when there is at least one full batch (as Dassl), so fewer images than
    a batch still train; this rank's share of each batch. Otherwise: test_transform, in order,
    this rank's share of the items (every world-th), with a progress line every print_freq
    batches."""
    if not items:
        raise DataError("no images to load: this split is empty (test-only datasets such as "
                        "the ImageNet variants have no train/val split)")
    if not train:
        return Loader(ImageList(items[rank::world], test_transform(n_px)), batch_size=batch_size,
                      num_workers=num_workers, collate_fn=_collate, name="evaluate",
                      print_freq=print_freq, pin_memory=torch.cuda.is_available())
    dataset = ImageList(items, train_transform(n_px))
    generator = torch.Generator()  # the order: as DataLoader(shuffle=True, generator=...) draws it
    batches = _Share(torch.utils.data.RandomSampler(dataset, generator=generator), batch_size,
                     len(items) >= batch_size, rank, world)
    return Loader(dataset, batch_sampler=batches, generator=generator, num_workers=num_workers,
                  collate_fn=_collate, pin_memory=torch.cuda.is_available())


def check(halves, train=True, val=False):
    """Refuse, before any training, what cannot give a meaningful run: fewer than two classes to
    tell apart, or a class without images in a split the run needs (test; train and val of the
    first half when `train` / `val`). `halves`: halves()'s dict."""
    first = next(iter(halves.values()))
    if len(first.classnames) < 2:
        raise DataError(f"{first.name}: {len(first.classnames)} class(es) to train on; a "
                        "classifier needs at least 2 (base2new: 4, 2 in each half)")
    if train and first.test_only:
        raise DataError(f"{first.name} is test-only (no training images): evaluate trained "
                        "prompts on it with --eval-only --load RUN_DIR")
    for d in halves.values():
        needed = ("train",) * train + ("val",) * val if d is first else ()
        for split in (*needed, "test"):
            empty = sorted(set(range(len(d.classnames))) - {y for _, y in getattr(d, split)})
            if empty:
                raise DataError(
                    f"{d.name} ({d.subset}): {len(empty)} of {len(d.classnames)} classes have no "
                    f"{split} images, e.g. {d.classnames[empty[0]]!r}. Add images (a folder "
                    "dataset splits each class 50/20/30: at least 4 per class), or choose "
                    "another --dataset")
