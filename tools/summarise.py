"""Summarise train.py runs into the papers' tables (Markdown), from their results.json files.

    python tools/summarise.py out/                 # every results.json below out/
    python tools/summarise.py out/ --ci95 > RESULTS.md

Runs are grouped by method, protocol, backbone, shots and method options (n_ctx, ctx_init, ...);
each cell is the mean +/- std over the seeds (numpy's population std, as CoOp's
parse_test_res.py; --ci95: 1.96 * std / sqrt(n)). Tables:
  base2new   rows datasets: base, new and H = 2*B*N/(B+N) computed from the seed-averaged base
             and new, as the papers do; an Average row over the datasets, H again from the
             averaged base and new (the CoCoOp and MaPLe papers' "Average over 11 datasets");
  fewshot    rows datasets, columns shot counts (the CoOp paper's few-shot curves as a table);
  transfer   --eval-only --load runs (cross-dataset and domain generalisation): rows methods,
             the source dataset, then each target dataset and the target average;
  curves     runs with a learning curve (train.py --eval-every): each epoch's accuracies,
             averaged over the seeds.
Datasets appear in the papers' order (PAPER_ORDER), others after them.
"""
import argparse
import json
import math
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # repo root

from runs import UsageError, run_cli  # noqa: E402

# The papers' column order (names as data.DATASETS); ImageNet variants: domain generalisation.
PAPER_ORDER = ["imagenet", "caltech101", "oxford_pets", "stanford_cars", "oxford_flowers",
               "food101", "fgvc_aircraft", "sun397", "dtd", "eurosat", "ucf101"]
VARIANTS = ["imagenetv2", "imagenet_sketch", "imagenet_a", "imagenet_r"]
OPTIONS = ("n_ctx", "ctx_init", "csc", "class_token_position", "prompt_depth")

parser = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("folder", help="an output folder; results.json files are found recursively")
parser.add_argument("--ci95", action="store_true", help="+/- the 95%% confidence interval "
                    "1.96*std/sqrt(n) instead of the std")


def find_results(folder):
    """{real path of a run folder: its results.json} for every one below `folder`."""
    if not os.path.isdir(folder):
        raise UsageError(f"{folder} is not a folder")
    runs = {}
    for d, _, files in sorted(os.walk(folder)):
        if "results.json" in files:
            path = os.path.join(d, "results.json")
            try:
                with open(path) as f:
                    r = json.load(f)
                check_result(r)
            except (OSError, ValueError) as e:
                print(f"warning: skipping {path}: not a train.py results.json "
                      f"({type(e).__name__}: {str(e)[:200]})", file=sys.stderr)
                continue
            runs[os.path.realpath(d)] = r
    if not runs:
        raise UsageError(f"no usable results.json below {folder}: pass train.py's "
                         "output folder")
    return runs


def check_result(r):
    """A results.json's content as train.py writes it: what this file reads of it, of the types
    it reads; else ValueError saying what is not."""
    if not isinstance(r, dict):
        raise ValueError(f"{json.dumps(r)[:40]}, not an object")
    acc, cfg = r.get("accuracy"), r.get("config", {})
    need = dict(method=str, dataset=str, protocol=str, shots=int)
    wrong = [k for k, t in need.items() if type(r.get(k)) is not t] + \
        [k for k, t in (("backbone", str), ("seed", int)) if k in r and type(r[k]) is not t]
    halves = {"base", "new"} if r.get("protocol") == "base2new" else {"all"}
    if not wrong and not (isinstance(acc, dict) and halves <= set(acc) and all(
            type(v) in (int, float) and math.isfinite(v) for v in acc.values())):
        wrong = ["accuracy"]
    if not wrong and not (isinstance(cfg, dict) and isinstance(cfg.get("model_options", []), list)
                          and all(isinstance(k, str) and k in cfg
                                  for k in cfg.get("model_options", []))
                          and isinstance(cfg.get("load", ""), (str, type(None)))):
        wrong = ["config"]
    if wrong:
        raise ValueError(f"{wrong[0]} is {r.get(wrong[0], 'missing')!r:.60}")


def order(names):
    known = [n for n in PAPER_ORDER + VARIANTS if n in names]
    return known + sorted(set(names) - set(known))


def stat(values, ci95=False):
    """(mean, spread, n) over seeds; spread: population std, or the 95% CI half-width."""
    v = np.asarray(values, dtype=float)
    s = float(v.std())
    return float(v.mean()), 1.96 * s / math.sqrt(len(v)) if ci95 else s, len(v)


def cell(st):
    m, s, n = st
    return f"{m:.2f}" if n == 1 else f"{m:.2f} ± {s:.2f}"


def plural(n, word):
    return f"{n} {word}" + ("" if n == 1 else "s")


def hm(b, n):
    return 2 * b * n / (b + n) if b + n else 0.0


def backbone(name):
    """A model name as it is; a checkpoint file by its name: /ckpt/tiny.pt -> tiny."""
    return os.path.splitext(os.path.basename(name))[0] if name.endswith((".pt", ".pth")) else name


def options(cfg):
    return " ".join(f"{k}={cfg[k]!r}" for k in OPTIONS if k in cfg.get("model_options", []))


def seeds(rs):
    s = [r.get("seed") for r in rs]
    if len(set(s)) < len(s):
        print(f"warning: {rs[0]['method']} {rs[0]['dataset']}: repeated seeds {s}; all runs are "
              "averaged", file=sys.stderr)
    return ",".join(str(x) for x in sorted(s, key=lambda x: -1 if x is None else x))


def source_of(d, r, runs):
    """The training run that an --eval-only --load run evaluated (None: not a transfer run)."""
    cfg = r.get("config", {})
    if not cfg.get("load") or "all" not in r["accuracy"]:  # base/new: into the base2new table
        return None
    for cand in (os.path.dirname(d), os.path.realpath(cfg["load"])):
        if cand in runs:
            return runs[cand]
    return {"dataset": "?", "accuracy": {}, "shots": "?"}  # the source run is not below folder


def table(head, rows):
    return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] +
                     ["| " + " | ".join(map(str, row)) + " |" for row in rows])


def base2new_tables(groups, ci95):
    out = []
    for (method, bb, shots, opts), by_ds in sorted(groups.items()):
        rows, means = [], []
        for ds in order(by_ds):
            rs = by_ds[ds]
            b, n = (stat([r["accuracy"][k] for r in rs], ci95) for k in ("base", "new"))
            rows.append([ds, seeds(rs), cell(b), cell(n), f"{hm(b[0], n[0]):.2f}"])
            means.append((b[0], n[0]))
        b, n = np.mean(means, axis=0)
        rows.append([f"**Average ({plural(len(means), 'dataset')})**", "", f"{b:.2f}", f"{n:.2f}",
                     f"{hm(b, n):.2f}"])
        out.append(f"### {method}, base-to-new, {bb}, {shots} shots{opts}\n\n"
                   + table(["dataset", "seeds", "base", "new", "H"], rows))
    return out


def fewshot_tables(groups, ci95):
    out = []
    for (method, bb, opts), by_ds in sorted(groups.items()):
        shots = sorted({r["shots"] for rs in by_ds.values() for r in rs})
        label = {k: "zero-shot" if method == "zeroshot" else plural(k, "shot") for k in shots}
        rows, cols = [], {k: [] for k in shots}
        for ds in order(by_ds):
            row = [ds]
            for k in shots:
                rs = [r["accuracy"]["all"] for r in by_ds[ds] if r["shots"] == k]
                row.append(cell(stat(rs, ci95)) if rs else "")
                cols[k] += [np.mean(rs)] if rs else []
            rows.append(row)
        rows.append([f"**Average ({plural(len(by_ds), 'dataset')})**"] + [
            f"{np.mean(cols[k]):.2f}" + ("" if len(cols[k]) == len(by_ds) else
                                         f" ({plural(len(cols[k]), 'dataset')})") for k in shots])
        out.append(f"### {method}, few-shot, {bb}{opts}\n\n"
                   + table(["dataset"] + [label[k] for k in shots], rows))
    return out


def transfer_tables(groups, ci95):
    """One cross-dataset and one domain-generalisation table; a row per (method, source)."""
    out = []
    for title, keep in (("cross-dataset transfer", lambda ds: ds not in VARIANTS),
                        ("domain generalisation", lambda ds: ds in VARIANTS)):
        targets = order({ds for g in groups.values() for ds in g["targets"] if keep(ds)})
        if not targets:
            continue
        rows = []
        for (method, bb, src, opts), g in sorted(groups.items()):
            src_acc = [s["accuracy"]["all"] for s in g["sources"] if "all" in s["accuracy"]]
            have = {ds: stat(g["targets"][ds], ci95) for ds in targets if ds in g["targets"]}
            avg = f"{np.mean([st[0] for st in have.values()]):.2f}" if have else ""
            avg += "" if len(have) in (0, len(targets)) else f" ({plural(len(have), 'target')})"
            rows.append([f"{method}, {bb}{opts}", src, cell(stat(src_acc, ci95))
                         if src_acc else ""] + [cell(have[ds]) if ds in have else ""
                                                for ds in targets] + [avg])
        out.append(f"### {title}\n\n" + table(["method", "source", "source acc"] + targets +
                                                ["target average"], rows))
    return out


def curve_tables(groups, ci95):
    """Learning curves (train.py --eval-every): per method and dataset, each epoch's accuracies
    averaged over the seeds whose curve has that epoch."""
    out = []
    for (method, bb, shots, opts), by_ds in sorted(groups.items()):
        for ds in order(by_ds):
            curves = [r["curve"] for r in by_ds[ds] if r.get("curve")]
            if not curves:
                continue
            keys = [k for k in ("base", "new", "hm", "all") if k in curves[0][0]]
            epochs = sorted({p["epoch"] for c in curves for p in c})
            rows = [[e, len(at)] + [cell(stat([p[k] for p in at], ci95)) for k in keys]
                    for e in epochs for at in [[p for c in curves for p in c if p["epoch"] == e]]]
            out.append(f"### learning curve: {method}, {ds}, {bb}, {shots} shots{opts}\n\n" +
                       table(["epoch", "seeds"] + [{"hm": "H"}.get(k, k) for k in keys], rows))
    return out


def summarise(folder, ci95=False):
    """The Markdown tables for every run below `folder`."""
    runs = find_results(folder)
    variants = {}  # method -> its option sets; shown in the headings only when there are several
    for r in runs.values():
        variants.setdefault(r["method"], set()).add(options(r.get("config", {})))
    b2n, few, xfer = {}, {}, {}
    for d, r in runs.items():
        bb, opts = backbone(r.get("backbone", "?")), options(r.get("config", {}))
        opts = f" [{opts}]" if opts and len(variants[r["method"]]) > 1 else ""
        src = source_of(d, r, runs)
        if src is not None:
            source = f"{src['dataset']}, {src['shots']} shots"
            g = xfer.setdefault((r["method"], bb, source, opts),
                                {"targets": {}, "sources": []})
            g["targets"].setdefault(r["dataset"], []).append(r["accuracy"]["all"])
            if all(src is not s for s in g["sources"]):
                g["sources"].append(src)
        elif r["protocol"] == "base2new":
            b2n.setdefault((r["method"], bb, r["shots"], opts), {}).setdefault(
                r["dataset"], []).append(r)
        else:  # all classes: fewshot, or a crossdataset source trained with its transfer recipe
            opts += " (crossdataset recipe)" * (r["protocol"] == "crossdataset")
            few.setdefault((r["method"], bb, opts), {}).setdefault(r["dataset"], []).append(r)
    spread = "95% confidence interval" if ci95 else "population std"
    parts = [f"{len(runs)} runs below {folder}; mean ± {spread} over seeds"]
    parts += base2new_tables(b2n, ci95) + fewshot_tables(few, ci95) + transfer_tables(xfer, ci95)
    curves = {}
    for r in runs.values():
        curves.setdefault((r["method"], backbone(r.get("backbone", "?")), r["shots"], ""),
                          {}).setdefault(r["dataset"], []).append(r)
    parts += curve_tables(curves, ci95)
    return "\n\n".join(parts) + "\n"


def main(argv=None):
    args = parser.parse_args(argv)
    text = summarise(args.folder, args.ci95)
    print(text, end="")
    return text


if __name__ == "__main__":
    run_cli(main)
