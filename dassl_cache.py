"""The official repositories' dataset caches, read without running code from them.

CoOp, CoCoOp and MaPLe (through Dassl) save the few-shot images of each run in the dataset folder,
split_fewshot/shot_{K}-seed_{S}.pkl = {"train": [Datum, ...], "val": [Datum, ...]} (ImageNet:
"train" only), and ImageNet's file lists in preprocessed.pkl = {"train": [...], "test": [...]}
(CoOp:datasets/*.py). A Datum (Dassl:dassl/data/datasets/base_dataset.py) holds an absolute image
path, a label, a domain and a class name. Using these files gives exactly the images of the
official runs: for ImageNet, whose official lists follow the filesystem's listdir order, our
own sampler (which sorts) cannot.

Pickles can run code when loaded, so `read` accepts only Datum objects in plain containers and
refuses anything else. Image paths are matched relative to the dataset folder, so a data root
that moved since the cache was written still works.
"""
import os
import pickle


class CacheError(ValueError):
    """A cache file that is not what the official code writes."""


class Datum:
    """Stands in for Dassl's Datum while unpickling: only its fields, no code."""


class _Unpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) == ("dassl.data.datasets.base_dataset", "Datum"):
            return Datum
        raise CacheError(f"it holds a {module}.{name}, not only Dassl's Datum objects, and "
                         "would run code to load it")


def read(path, dataset_dir):
    """A cache file -> {split: [(image path under `dataset_dir`, label)]}."""
    def refuse(why):
        return CacheError(f"{path} is not a cache the official code writes ({why}); delete it "
                          "(or move it away) to use our sampler")
    try:
        with open(path, "rb") as f:
            cache = _Unpickler(f).load()
    except CacheError as e:  # a class other than Datum, refused before it was loaded
        raise refuse(e) from None
    except (pickle.UnpicklingError, AttributeError, TypeError, ValueError, EOFError, IndexError,
            KeyError, OverflowError, MemoryError) as e:  # what damaged bytes raise (measured)
        raise refuse(f"it does not unpickle: {type(e).__name__}") from None
    try:
        # the official paths are absolute: keep the part after the dataset folder's name
        folder = "/" + os.path.basename(os.path.normpath(dataset_dir)) + "/"
        if not (isinstance(cache, dict) and all(isinstance(v, list) for v in cache.values())):
            raise CacheError(f"it holds {str(cache)[:40]}, not {{split: [Datum, ...]}}")
        out = {}
        for split, items in cache.items():
            out[split] = []
            for d in items:
                if not isinstance(d, Datum):
                    raise CacheError(f"{split} holds {type(d).__name__}, not Datum items")
                if not (isinstance(getattr(d, "_label", None), int) and
                        isinstance(getattr(d, "_impath", None), str)):
                    raise CacheError(f"{split} holds a Datum whose label is not an int or "
                                     f"whose image path is not a string ({str(vars(d))[:100]})")
                _, found, rel = d._impath.replace("\\", "/").rpartition(folder)
                if not found:
                    raise CacheError(f"{d._impath} does not lie under a folder {folder}")
                out[split].append((os.path.join(dataset_dir, rel), d._label))
    except CacheError as e:
        raise refuse(e) from None
    return out


def fewshot(dataset_dir, shots, seed, splits):
    """The official few-shot picks {"train": [...], "val": [...] or absent} when
    `dataset_dir`/split_fewshot holds them for (shots, seed), else None. Every picked image
    must be in `splits` (the split file's), with the same label."""
    path = os.path.join(dataset_dir, "split_fewshot", f"shot_{shots}-seed_{seed}.pkl")
    if shots < 1 or not os.path.isfile(path):
        return None
    cached = read(path, dataset_dir)
    for split, items in cached.items():
        stray = set(items) - set(splits.get(split, ()))
        if stray:
            raise CacheError(f"{path} lists {len(stray)} {split} images that the split file does "
                             f"not (e.g. {sorted(stray)[0]}): it was made from another split; "
                             "delete it to use our sampler")
    return cached
