"""Prototype distortion (原型扭曲), measured: how far a run's learned prompts moved each class's
text embedding away from the hand-written template's, and which new class that pulls into which.

    python tools/distortion.py out/toy/coop/toy_16shots_base2new/seed1
    python tools/distortion.py RUN [RUN ...] --plot distortion.png --json distortion.json

The notes' story: a context learned on cats and dogs moves every class prototype the way that
separates cats from dogs; for the unseen fox that move is a bias, and the fox is taken for a dog.
For each train.py run folder and each half of its classes (base and new; all for fewshot):

    d_i = 1 - cos(w_i, w_i^clip)   w_i: the learned prompt's class embedding, the model's
                                   normalised text feature of class i; w_i^clip: zero-shot
                                   CLIP's from the dataset's hand-written template (zeroshot.py)
    rank_i                         1 for the class whose embedding moved most
    C[i, j], C^clip[i, j]          test images of class i predicted as j, by the run's model and
                                   by zero-shot CLIP; "most pulled": largest C - C^clip, i != j

For unit vectors ||w_i - w_i^clip||^2 = 2 d_i. Over several runs (methods, seeds, epochs) the
new-class accuracy change (run - zero-shot) is set against the mean d over the classes, with
Pearson's correlation (numpy): the relation of the KgCoOp paper's motivation figure (Yao, Zhang,
Xu, CVPR 2023, arXiv:2303.13283, Fig. 1), there on real data.

w_i per method: text_features() of the rebuilt model (CoOp, MaPLe, IVLP, fine-tuning; a zero-shot
run measures its own template: 0 for the dataset's). CoCoOp's depend on the image, so its w_i is
the mean over the half's test images x of its normalised g(t_i(x)), normalised again: the
prototype the test images meet on average (tools/conditioning.py measures the image-dependent
part). MaPLe and IVLP move the image features too; d_i sees only the text side.

The model is rebuilt as tools/predict.py does (train.build_model, the saved configuration, the
run's dataset read again: --root if it moved) and predicts with its own forward, as
train.evaluate does (the test transform, the run's eval batch size, fp32): on the CPU the
accuracies are results.json's. Zero-shot CLIP gets its own copy of the backbone (fine-tuning
writes into the CLIP it is given). --plot needs matplotlib (optional: pip install matplotlib);
without it a line says so and the numbers print all the same.

Shape legend: B images in a batch, n classes in a half, E joint embedding dim.
"""
import argparse
import contextlib
import io
import json
import os
import sys
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # repo root

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import clip  # noqa: E402
import cocoop  # noqa: E402
import data  # noqa: E402
import config  # noqa: E402
import runs  # noqa: E402
import train  # noqa: E402
from runs import UsageError  # noqa: E402
import zeroshot  # noqa: E402
from tools.predict import load_prompts  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="train.py output folders")
parser.add_argument("--root", help="the data root, when the runs' data moved (default: the "
                    "root each run saved)")
parser.add_argument("--device", default=config.RUN["device"])
parser.add_argument("--workers", default=config.RUN["workers"], type=config.number(
                    int, -1, config.MAX_WORKERS + 1, what=f"0 to {config.MAX_WORKERS}"),
                    help=f"data-loading processes (default: {config.RUN['workers']})")
parser.add_argument("--max-rows", type=config.number(int, -1, what="0 or more"),
                    default=20, help="classes listed per half, most "
                    "distorted first (default 20; --json has all)")
parser.add_argument("--max-matrix", type=config.number(int, -1, what="0 or more"),
                    default=20, help="print the confusion matrices "
                    "up to this many classes (default 20; --json has them always)")
parser.add_argument("--pairs", type=config.number(int, -1, what="0 or more"),
                    default=5, help="most pulled pairs shown (default 5)")
parser.add_argument("--plot", metavar="PNG", help="one run: its two confusion matrices; several: "
                    "new-accuracy change against mean distance (needs matplotlib)")
parser.add_argument("--json", metavar="OUT", help="write every number to this JSON file")


def open_run(path):
    """A run folder (or its learned.pt) -> (config, learned tensors or None). A zero-shot run
    has no learned.pt; its results.json holds the configuration."""
    folder = path if os.path.isdir(path) else os.path.dirname(path)
    results = os.path.join(folder, "results.json")
    if os.path.isfile(os.path.join(folder, "learned.pt")) or not os.path.isfile(results):
        state, cfg, _, _ = load_prompts(path)
        return cfg, state
    with open(results) as f:
        try:
            cfg = json.load(f)
        except ValueError:
            raise UsageError(f"{results} is not a results.json written by train.py") from None
    cfg = config.check_saved(cfg.get("config") if isinstance(cfg, dict) else cfg,
                             train.METHODS, results)
    if cfg.get("load"):
        raise UsageError(f"{path} is an --eval-only run: pass the training run it loaded, "
                         f"{cfg['load']}")
    if cfg["method"] != "zeroshot":
        raise UsageError(f"{path} holds no learned.pt: pass a finished training run's folder")
    return cfg, None


def read_halves(cfg, root=None):
    """The run's class halves as train.py read them: {"base", "new"} or {"all"} -> Dataset."""
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # few-shot sampling notes: not about the test split
        ds = data.load(cfg["dataset"], root or cfg["root"], cfg["shots"], cfg["seed"])
    return data.halves(ds, cfg["protocol"])


def rebuild(cfg, state, halves, device):
    """The run's model for each half, on one fresh load of its backbone, as train.py builds
    them -> ({half: model}, input resolution)."""
    clip_model, _ = clip.load(cfg["backbone"], device)
    cfg = dict(cfg, device=device)
    models = {k: train.build_model(cfg, clip_model, ds) for k, ds in halves.items()}
    for model in models.values() if state is not None else ():
        runs.load_learned(model, state, cfg.get("out", "learned.pt"))
    return models, clip_model.visual.input_resolution


def cocoop_class_features(model, images):
    """CoCoOp's class features g(t_i(x)) of each image (B, n, E), normalised: the first half of
    CoCoOp.forward, through its own pieces (prompt_learner, encode_text)."""
    f = F.normalize(model.clip_model.encode_image(images), dim=-1)  # (B, E)
    prompts = model.prompt_learner(f.float())  # (B, n, L, D)
    B, n = prompts.shape[:2]
    tokens = model.prompt_learner.tokenized_prompts.repeat(B, 1)  # (B*n, L)
    g = model.encode_text(prompts.flatten(0, 1), tokens)  # (B*n, E)
    return F.normalize(g, dim=-1).view(B, n, -1)  # (B, n, E)


@torch.no_grad()
def evaluate_half(model, ds, n_px, batch_size, device, workers=0):
    """The test images of `ds` through `model` -> (confusion (n, n), class embeddings (n, E))."""
    static = hasattr(model, "text_features")
    if not static and not isinstance(model, cocoop.CoCoOp):
        raise UsageError(f"{type(model).__name__} has no class text embeddings to compare with "
                         "the template's")
    model.eval()
    g = model.text_features() if static else 0  # (n, E); CoCoOp: a sum over the images
    n = len(ds.classnames)
    confusion = torch.zeros(n * n, dtype=torch.long)
    for images, labels in data.make_loader(ds.test, n_px, batch_size, False, workers):
        images = images.to(device)  # (B, 3, n_px, n_px)
        logits = model(images, text_features=g) if static else model(images)  # (B, n)
        confusion += torch.bincount(labels * n + logits.argmax(dim=-1).cpu(), minlength=n * n)
        if not static:
            g = g + cocoop_class_features(model, images).sum(0)  # (n, E)
    if confusion.sum() == 0:
        raise data.DataError(f"{ds.name} ({ds.subset}): no readable test images")
    return confusion.view(n, n), F.normalize(g, dim=-1).float().cpu()  # (n, n), (n, E)


def zero_shot(cfg, halves, args):
    """Zero-shot CLIP with the dataset's template, on its own load of the run's backbone ->
    {half: (confusion, class embeddings w^clip)}."""
    clip_model, _ = clip.load(cfg["backbone"], args.device)
    n_px = clip_model.visual.input_resolution
    return {k: evaluate_half(zeroshot.ZeroShot(clip_model, ds.classnames, ds.template), ds,
                             n_px, cfg["eval_batch_size"], args.device, args.workers)
            for k, ds in halves.items()}


def measure(path, args, zero_shot_cache):
    """One run: per half the distances, ranks, confusion matrices, accuracies -> a dict."""
    cfg, state = open_run(path)
    halves = read_halves(cfg, args.root)
    key = (cfg["backbone"], cfg["dataset"], args.root or cfg["root"], cfg["protocol"])
    if key not in zero_shot_cache:  # zero-shot CLIP on the same halves, once per dataset
        zero_shot_cache[key] = zero_shot(cfg, halves, args)
    models, n_px = rebuild(cfg, state, halves, args.device)
    out = dict(run=path, **{k: cfg[k] for k in ("method", "dataset", "backbone", "seed",
                                                "protocol")}, halves={},
               epochs=0 if cfg["method"] == "zeroshot" else cfg["epochs"])
    for name, ds in halves.items():
        confusion, w = evaluate_half(models[name], ds, n_px, cfg["eval_batch_size"],
                                     args.device, args.workers)
        zs_confusion, w_clip = zero_shot_cache[key][name]
        d = 1 - (w * w_clip).sum(dim=-1)  # (n,)   d_i = 1 - cos(w_i, w_i^clip)
        rank = torch.empty(len(d), dtype=torch.long)
        rank[d.argsort(descending=True)] = torch.arange(1, len(d) + 1)
        out["halves"][name] = dict(
            classes=ds.classnames, distance=d.tolist(), rank=rank.tolist(),
            mean_distance=d.mean().item(), test_counts=confusion.sum(1).tolist(),
            accuracy=accuracy(confusion), zeroshot_accuracy=accuracy(zs_confusion),
            confusion=confusion.tolist(), zeroshot_confusion=zs_confusion.tolist(),
            most_pulled=most_pulled(confusion, zs_confusion, ds.classnames, args.pairs))
    return out


def accuracy(confusion):
    return 100.0 * confusion.diag().sum().item() / confusion.sum().item()


def most_pulled(confusion, zs_confusion, names, k):
    """The k largest increases of an off-diagonal count over zero-shot's: [(true, predicted,
    zero-shot count, run's count)], increases only."""
    gain = (confusion - zs_confusion).fill_diagonal_(0)  # (n, n)
    top = gain.flatten().argsort(descending=True)[:k].tolist()
    n = len(names)
    return [(names[i // n], names[i % n], zs_confusion.flatten()[i].item(),
             confusion.flatten()[i].item()) for i in top if gain.flatten()[i] > 0]


def abbreviate(names):
    """The shortest prefixes (3-8 characters, spaces dropped) that tell the names apart, else
    c0, c1, ..."""
    for k in range(3, 9):
        short = [n.replace(" ", "")[:k] for n in names]
        if len(set(short)) == len(names):
            return short
    return [f"c{i}" for i in range(len(names))]


def print_matrix(title, matrix, short):
    """Counts, rows true class, columns predicted; "." for 0."""
    width = max(max(len(s) for s in short), len(str(max(max(r) for r in matrix)))) + 1
    print(title, "".join(s.rjust(width) for s in [""] + short), sep="\n")
    for s, row in zip(short, matrix):
        print(s.rjust(width) + "".join((str(c) if c else ".").rjust(width) for c in row))


def print_run(r, args):
    print(f"\n{r['method']} | {r['dataset']} | seed {r['seed']} | {r['epochs']} epochs | "
          f"backbone {r['backbone']} | {r['run']}")
    for name, h in r["halves"].items():
        n, d = len(h["classes"]), h["distance"]
        print(f"{name}: {n} classes, {sum(h['test_counts'])} test images; accuracy "
              f"{h['accuracy']:.2f} (zero-shot {h['zeroshot_accuracy']:.2f}, "
              f"{h['accuracy'] - h['zeroshot_accuracy']:+.2f}); mean 1 - cos {np.mean(d):.4f}")
        print(f"{'rank':>6}  {'class':<20} {'1 - cos':>8}  accuracy zero-shot -> run")
        for i in sorted(range(n), key=lambda i: h["rank"][i])[:args.max_rows]:
            z, c = (100.0 * h[k][i][i] / h["test_counts"][i]
                    for k in ("zeroshot_confusion", "confusion"))
            print(f"{h['rank'][i]:>6}  {h['classes'][i][:20]:<20} {d[i]:8.4f}  {z:8.1f} -> "
                  f"{c:.1f}")
        if n > args.max_rows:
            print(f"{'':>6}  ... {n - args.max_rows} more (--max-rows, --json)")
    name = "new" if "new" in r["halves"] else next(iter(r["halves"]))
    h = r["halves"][name]
    if len(h["classes"]) <= args.max_matrix:
        short = abbreviate(h["classes"])
        print(f"confusion, {name} classes (rows: true class, columns: predicted; test images)")
        print_matrix("zero-shot CLIP:", h["zeroshot_confusion"], short)
        print_matrix(f"{r['method']}:", h["confusion"], short)
    pulled = [f"{t} -> {p}: {z} -> {c} of {h['test_counts'][h['classes'].index(t)]} "
              f"({c - z:+d})" for t, p, z, c in h["most_pulled"]]
    print(f"most pulled ({name}; off-diagonal counts that grew most over zero-shot):",
          *(pulled or ["none: no count grew"]), sep="\n  ")


def summarise(results):
    """One line per run and the correlation over runs -> {half: Pearson r} (None: undefined)."""
    names = [k for k in ("base", "new", "all") if any(k in r["halves"] for r in results)]
    print(f"\n{'method':<10} {'seed':>4} {'epochs':>6}" + "".join(f" {'d ' + k:>8}" for k in names)
          + f" {'new acc':>8} {'zero-shot':>9} {'change':>7}  run")
    xs, ys = {k: [] for k in names}, []
    for r in results:
        h = r["halves"]
        cells = "".join(f" {h[k]['mean_distance']:8.4f}" if k in h else f" {'-':>8}"
                        for k in names)
        if "new" in h:
            acc, zs = h["new"]["accuracy"], h["new"]["zeroshot_accuracy"]
            ys.append(acc - zs)
            for k in names:
                xs[k].append(h[k]["mean_distance"] if k in h else np.nan)
            tail = f" {acc:8.2f} {zs:9.2f} {acc - zs:+7.2f}"
        else:
            tail = f" {'-':>8} {'-':>9} {'-':>7}"
        print(f"{r['method']:<10} {r['seed']:>4} {r['epochs']:>6}{cells}{tail}  {r['run']}")
    corr = {}
    for k in names:
        x = np.array(xs[k])
        ok = len(ys) >= 3 and not np.isnan(x).any() and np.ptp(x) > 0 and np.ptp(ys) > 0
        corr[k] = float(np.corrcoef(x, ys)[0, 1]) if ok else None
    if any(v is not None for v in corr.values()):
        print(f"Pearson correlation over {len(ys)} runs, new-accuracy change vs mean 1 - cos: " +
              ", ".join(f"{k} {v:+.3f}" for k, v in corr.items() if v is not None))
    else:
        print(f"correlation: needs at least 3 runs with a new half whose numbers differ "
              f"({len(ys)} here)")
    return corr


def plot(results, path):
    """One run: its zero-shot and learned confusion matrices; several: the change against
    the mean distance on the new half. matplotlib is optional: without it, say how to get it."""
    try:
        import matplotlib  # noqa: PLC0415 - optional, only for --plot
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415
    except ImportError:
        print(f"--plot {path}: not written, the plot needs matplotlib (pip install matplotlib); "
              "the numbers above are complete")
        return
    with_new = [r for r in results if "new" in r["halves"]]
    if len(results) == 1 or not with_new:
        halves = results[0]["halves"]
        name = "new" if "new" in halves else next(iter(halves))
        h = halves[name]
        fig, axes = plt.subplots(1, 2, figsize=(11, 5))
        for ax, key, title in zip(axes, ("zeroshot_confusion", "confusion"),
                                  ("zero-shot CLIP", results[0]["method"])):
            ax.imshow(np.array(h[key]), cmap="Blues")
            ax.set(title=f"{title}: {name} classes", xlabel="predicted", ylabel="true",
                   xticks=range(len(h["classes"])), yticks=range(len(h["classes"])))
            ax.set_xticklabels(h["classes"], rotation=90)
            ax.set_yticklabels(h["classes"])
    else:
        fig, ax = plt.subplots(figsize=(6, 4.5))
        x = [r["halves"]["new"]["mean_distance"] for r in with_new]
        y = [r["halves"]["new"]["accuracy"] - r["halves"]["new"]["zeroshot_accuracy"]
             for r in with_new]
        ax.scatter(x, y)
        for r, xi, yi in zip(with_new, x, y):
            ax.annotate(f"{r['method']} s{r['seed']} {r['epochs']}ep", (xi, yi), fontsize=8)
        ax.axhline(0, color="grey", lw=0.5)
        ax.set(xlabel="mean 1 - cos(learned, template) over the new classes",
               ylabel="new accuracy - zero-shot (points)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def main(argv=None):
    args = parser.parse_args(argv)
    if args.json and not args.json.endswith(".json"):
        raise UsageError(f"--json {args.json}: name a .json file")
    if args.plot and not args.plot.endswith(".png"):
        raise UsageError(f"--plot {args.plot}: name a .png file")
    config.check_device(args.device)
    cache = {}
    results = []
    for path in args.runs:
        results.append(measure(path, args, cache))
        print_run(results[-1], args)
    corr = summarise(results)
    if args.json:
        try:
            with open(args.json, "w") as f:
                json.dump(dict(runs=results, correlation=corr), f, indent=1)
        except OSError as e:  # no such folder, a folder of that name, no permission
            raise UsageError(f"--json {args.json}: cannot write it ({e.strerror})") from None
        print(f"wrote {args.json}")
    if args.plot:
        plot(results, args.plot)
    return dict(runs=results, correlation=corr)


if __name__ == "__main__":
    runs.run_cli(main)
