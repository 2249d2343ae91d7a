"""Predict with learned prompts: the top-k classes, with probabilities, of new images.

    python tools/predict.py --load out/toy/coop/toy_16shots_base2new/seed1 data/toy/images/heart
    python tools/predict.py --load RUN --classes "cat,dog,red fox" 'photos/*.jpg' --out preds.csv
    python tools/predict.py --method zeroshot --backbone ViT-B/16 --classes cat,dog dog.jpg

--load takes a train.py output folder (or its learned.pt): the method, backbone and
method options come from the saved configuration, and the model is built by train.build_model,
exactly as for evaluation. The class names default to the training run's (its base classes for
a base2new run; --subset new for the unseen half), read from its dataset; any other list works
too, since the saved prompts hold no class-name tensors. Images go through the test transform
(resize, centre crop) at the backbone's input resolution, in fp32.

Shape legend: B images in a batch, n_cls classes, k = --topk.
"""
import argparse
import contextlib
import csv
import glob
import io
import json
import os
import sys
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # repo root

import torch  # noqa: E402

import clip  # noqa: E402
import config  # noqa: E402
import data  # noqa: E402
import runs  # noqa: E402
import train  # noqa: E402
from runs import UsageError  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("images", nargs="+", help="image files, folders (searched recursively) "
                    "or quoted globs such as 'photos/**/*.jpg'")
parser.add_argument("--load", metavar="RUN", help="a training run's output folder (or its "
                    "learned.pt / checkpoint.pt)")
parser.add_argument("--method", help="zeroshot: hand-written prompts, no --load; otherwise a "
                    "check that --load holds this method's prompts")
parser.add_argument("--backbone", help="zeroshot: the CLIP model (default ViT-B/16); with "
                    "--load: only to point at the same checkpoint file moved elsewhere")
parser.add_argument("--template", type=config.template, help="zeroshot: prompt template "
                    "(default 'a photo of a {}.')")
parser.add_argument("--classes", help="comma-separated class names (default: the run's)")
parser.add_argument("--classes-file", help="class names, one per line")
parser.add_argument("--subset", choices=["base", "new", "all"], help="which of the run's classes "
                    "(default: base for a base2new run, else all)")
parser.add_argument("--topk", type=int, default=5, help="classes shown per image (default 5)")
parser.add_argument("--out", help="also write the predictions to a .csv or .json file")
parser.add_argument("--batch-size", type=config.number(int, high=config.MAX_BATCH + 1),
                    default=64, help="images per forward pass")
parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")


def load_prompts(path):
    """A train.py learned.pt (or checkpoint.pt, or the run folder holding it) ->
    (learned state dict, config, file, the classes it was learned for or None)."""
    saved = runs.read_run(path) if os.path.isdir(path) else runs.read(path)
    path = os.path.join(path, "learned.pt") if os.path.isdir(path) else path
    config.check_saved(saved["config"], train.METHODS, path)
    return saved["learned"], saved["config"], path, saved.get("classnames")


def run_classes(cfg, subset=None):
    """The class names of the run's dataset, as train.py derived them."""
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # few-shot sampling notes: not about class names
            ds = data.load(cfg["dataset"], cfg["root"])  # all shots: the same classes
    except data.DataError as e:
        raise UsageError(f"the class names come from the run's dataset {cfg['dataset']!r} under "
                         f"{cfg['root']!r}, which cannot be read here ({e}). Pass --classes or "
                         "--classes-file") from None
    subset = subset or ("base" if cfg["protocol"] == "base2new" else "all")
    return ds.classnames if subset == "all" else \
        data.base_new(ds)[subset == "new"].classnames


def class_list(args, cfg):
    if args.classes and args.classes_file:
        raise UsageError("give --classes or --classes-file, not both")
    if args.classes_file:
        names = [s.strip() for s in runs.read_text(args.classes_file, "--classes-file")
                 .split("\n") if s.strip() and not s.startswith("#")]
    elif args.classes:
        names = [s.strip() for s in args.classes.split(",") if s.strip()]
    elif cfg["method"] == "zeroshot":
        raise UsageError("--method zeroshot needs --classes or --classes-file")
    else:
        return run_classes(cfg, args.subset)
    if len(names) < 2 or len(set(names)) != len(names):
        raise UsageError(f"need at least two distinct class names, got {names}")
    try:
        return [clip.check_words(c, "the class name") for c in names]
    except ValueError as e:
        raise UsageError(str(e)) from None


def check_backbone(cfg, given, path):
    """The run's backbone; another --backbone only when it is the same checkpoint, moved."""
    if given is None or given == cfg["backbone"]:
        return cfg["backbone"]
    if config.backbone_id(given) == cfg.get("backbone_id", config.backbone_id(cfg["backbone"])):
        return given
    raise UsageError(f"the prompts in {path} were trained with backbone {cfg['backbone']!r}, not "
                     f"--backbone {given!r}: learned prompts only work with the backbone they "
                     "were trained on")


def configure(args):
    """-> (config for train.build_model, learned state or None, where it came from, the classes
    it was learned for or None)."""
    if args.load is None:
        if args.method != "zeroshot":
            raise UsageError("pass --load RUN (a training run's output folder), or "
                             "--method zeroshot for hand-written prompts")
        cfg = dict(config.RUN, method="zeroshot", backbone=args.backbone or config.RUN["backbone"],
                   template=args.template, ensemble=False, model_options=["template", "ensemble"])
        return cfg, None, f"the template {args.template or clip.PHOTO!r}", None
    state, cfg, path, learned_for = load_prompts(args.load)
    if args.method not in (None, cfg["method"]):
        raise UsageError(f"--method {args.method}, but {path} holds {cfg['method']} prompts")
    if args.template:
        raise UsageError("--template is for --method zeroshot; learned prompts have no template")
    cfg = dict(cfg, backbone=check_backbone(cfg, args.backbone, path))
    return cfg, state, path, learned_for


def expand_images(specs):
    """Paths, folders (recursive, data.find_images) and globs -> image paths, in the order
    given, each file once (a glob through a link loop finds the same file under many paths)."""
    paths = []
    for spec in specs:
        if any(c in spec for c in "*?["):
            found = sorted(p for p in glob.glob(os.path.expanduser(spec), recursive=True)
                           if os.path.isfile(p))
            if not found:
                raise UsageError(f"no file matches {spec!r}")
        elif os.path.isdir(spec):
            found = data.find_images(spec)
            if not found:
                raise UsageError(f"folder {spec} holds no images "
                                        f"({', '.join(data.IMAGE_EXTS)})")
        elif os.path.isfile(spec):
            found = [spec]
        else:
            raise UsageError(f"{spec} not found (not a file, a folder or a glob)")
        paths += found
    unique, seen = [], set()
    for p in paths:
        if os.path.realpath(p) not in seen:
            seen.add(os.path.realpath(p))
            unique.append(p)
    return unique


@torch.no_grad()
def predict(model, paths, n_px, device, batch_size=64):
    """Probabilities (N, n_cls) of the readable images and the paths they belong to. The same
    transform and loader as evaluation; each item's "label" is its index, to find it again."""
    model.eval()
    loader = data.make_loader([(p, i) for i, p in enumerate(paths)], n_px,
                              batch_size, False)
    text_features = model.text_features() if hasattr(model, "text_features") else None
    probs, kept = [], []
    for images, index in loader:
        images = images.to(device)  # (B, 3, n_px, n_px)
        logits = model(images) if text_features is None else \
            model(images, text_features=text_features)  # (B, n_cls)
        probs.append(logits.float().softmax(dim=-1).cpu())
        kept += [paths[i] for i in index.tolist()]
    if not kept:
        raise UsageError(f"none of the {len(paths)} files is an image PIL can read")
    return torch.cat(probs), kept  # (N, n_cls)


def write(out, rows):
    """rows: [(path, [(class, probability), ...])] -> CSV (one line per rank) or JSON."""
    try:
        f = open(out, "w", newline="")
    except OSError as e:  # no such folder, a folder of that name, no permission
        raise UsageError(f"--out {out}: cannot write it ({e.strerror}); pass another --out") \
            from None
    with f:
        if out.endswith(".json"):
            json.dump([{"image": p, "predictions": [{"class": c, "probability": round(q, 6)}
                                                    for c, q in top]} for p, top in rows],
                      f, indent=2)
            return
        w = csv.writer(f)
        w.writerow(["image", "rank", "class", "probability"])
        w.writerows([p, r + 1, c, f"{q:.6f}"] for p, top in rows for r, (c, q) in enumerate(top))


def main(argv=None):
    args = parser.parse_args(argv)
    if args.out and not args.out.endswith((".csv", ".json")):
        raise UsageError(f"--out {args.out}: name a .csv or .json file")
    if args.topk < 1:
        raise UsageError("--topk must be at least 1")
    config.check_device(args.device)
    cfg, state, source, learned_for = configure(args)
    cfg["device"] = args.device
    classnames = class_list(args, cfg)
    paths = expand_images(args.images)
    clip_model, _ = clip.load(cfg["backbone"], args.device)
    config.check_vocabulary(clip_model, cfg["backbone"])
    ds = data.Dataset(cfg["dataset"], classnames, [], [], [], clip.PHOTO)
    model = train.build_model(cfg, clip_model, ds)
    # per-class learned tensors (CoOp's csc, the linear probe) fit only the classes they learned
    train.check_classes(model, dict(cfg, load=source), {"all": ds}, learned_for)
    if state is not None:
        runs.load_learned(model, state, source)
    probs, kept = predict(model, paths, clip_model.visual.input_resolution, args.device,
                          args.batch_size)
    top = probs.topk(min(args.topk, len(classnames)), dim=-1)  # (N, k)
    rows = [(p, [(classnames[j], q) for q, j in zip(v.tolist(), i.tolist())])
            for p, v, i in zip(kept, top.values, top.indices)]
    print(f"{cfg['method']} prompts from {source}, backbone {cfg['backbone']}, "
          f"{len(classnames)} classes, {len(rows)} image{'s' * (len(rows) != 1)}")
    for path, preds in rows:
        print(path, *(f"  {q:7.2%}  {c}" for c, q in preds), sep="\n")
    if args.out:
        write(args.out, rows)
        print(f"wrote {args.out}")
    return rows


if __name__ == "__main__":
    runs.run_cli(main)
