"""Reproduce a paper protocol: run train.py over datasets and seeds, then summarise.

    python tools/reproduce.py --protocol base2new --method cocoop --root ~/data --dry-run
    python tools/reproduce.py --protocol fewshot --root ~/data --datasets dtd eurosat
    python tools/reproduce.py --protocol crossdataset --method maple --root ~/data -- --workers 8

Protocols (the runs the papers average over seeds 1, 2, 3):
  base2new      CoCoOp/MaPLe Table 1: each method on the 11 datasets, 16 shots of the base
                classes, tested on base and new classes (ViT-B/16);
  fewshot       the CoOp paper's curves: 1, 2, 4, 8, 16 shots on the 11 datasets, all classes
                (RN50, the paper's main backbone);
  crossdataset  CoCoOp/MaPLe Table 2: train on ImageNet (all classes, 16 shots), then
                --eval-only --load on the 10 other datasets (ViT-B/16);
  domaingen     CoCoOp/MaPLe Table 3: the same ImageNet runs, evaluated on ImageNet-V2, -Sketch,
                -A and -R.
The ImageNet runs of crossdataset/domaingen are train.py --protocol crossdataset runs (the
method files' cross-dataset recipes), in <bb>_16shots_crossdataset folders. A run whose
results.json exists is skipped, and a run with a checkpoint gets --resume, so an interrupted
reproduction continues where it stopped. Arguments after `--` go to every train.py command (--device,
--workers, ...).
"""
import argparse
import os
import shlex
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # the repository root: train, data, clip, tools

import config  # noqa: E402
import data  # noqa: E402
import runs  # noqa: E402
from runs import UsageError  # noqa: E402
import train  # noqa: E402
from tools import summarise  # noqa: E402

FEWSHOTS = [1, 2, 4, 8, 16]  # CoOp paper, Fig. 3
# train.py's --method choices and --seed/--shots types, so that what train.py would refuse is
# refused here, before any run
TRAIN_FLAGS = {a.dest: a for a in train.parser._actions}
METHOD_CHOICES = TRAIN_FLAGS["method"].choices
TRAIN = os.path.join(ROOT, "train.py")

parser = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--protocol", required=True,
                    choices=["base2new", "fewshot", "crossdataset", "domaingen"])
parser.add_argument("--method", choices=METHOD_CHOICES, help="default: coop for fewshot, "
                    "cocoop otherwise")
parser.add_argument("--root", default="./data", help="data root (CoOp's DATASETS.md layout)")
parser.add_argument("--datasets", nargs="+", metavar="NAME", help="default: the 11 datasets "
                    "(crossdataset: the 10 targets; domaingen: the 4 ImageNet variants)")
parser.add_argument("--seeds", nargs="+", type=TRAIN_FLAGS["seed"].type, default=[1, 2, 3])
parser.add_argument("--shots", nargs="+", type=TRAIN_FLAGS["shots"].type,
                    help="fewshot: default 1 2 4 8 16; others: 16")
parser.add_argument("--backbone", help="default: RN50 for fewshot, ViT-B/16 otherwise")
parser.add_argument("--out", default="out", help="output folder (default: out, where train.py "
                    "writes by default)")
parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")


def plan(args):
    """[(train.py arguments, its output folder, the run it needs first or None)], in order."""
    method = args.method or ("coop" if args.protocol == "fewshot" else "cocoop")
    bb = args.backbone or ("RN50" if args.protocol == "fewshot" else "ViT-B/16")
    jobs = []

    def resume(out):  # an interrupted run (a checkpoint, no results) continues
        return ["--resume"] if os.path.isfile(os.path.join(out, "checkpoint.pt")) else []
    if args.protocol in ("base2new", "fewshot"):
        shots = args.shots or (FEWSHOTS if args.protocol == "fewshot" else [16])
        shots = shots[:1] if method == "zeroshot" else shots  # nothing is trained
        for ds in args.datasets or summarise.PAPER_ORDER:
            for k in shots:
                for seed in args.seeds:
                    out = config.folder(args.out, ds, method, bb, k, args.protocol, seed)
                    jobs.append((["--method", method, "--dataset", ds, "--root", args.root,
                                  "--protocol", args.protocol, "--shots", str(k), "--seed",
                                  str(seed), "--backbone", bb, "--out", out, *resume(out)], out, None))
        return jobs
    if method == "zeroshot":
        raise UsageError(f"zero-shot CLIP trains nothing to transfer: run --protocol fewshot "
                         f"--method zeroshot --datasets imagenet ... for the {args.protocol} "
                         "datasets instead")
    targets = args.datasets or (summarise.PAPER_ORDER[1:] if args.protocol == "crossdataset"
                                else summarise.VARIANTS)
    shots = (args.shots or [16])[0]
    for seed in args.seeds:  # the source model: train.py --protocol crossdataset, shared by both
        src = config.folder(args.out, "imagenet", method, bb, shots, "crossdataset", seed)
        jobs.append((["--method", method, "--dataset", "imagenet", "--root", args.root,
                      "--protocol", "crossdataset", "--shots", str(shots), "--seed", str(seed),
                      "--backbone", bb, "--out", src, *resume(src)], src, None))
        for ds in targets:
            out = os.path.join(src, f"eval_{ds}_crossdataset")
            jobs.append((["--eval-only", "--load", src, "--dataset", ds, "--root", args.root,
                          "--seed", str(seed), "--out", out], out, src))
    return jobs


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []  # for every train.py command
    args = parser.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    unknown = set(args.datasets or []) - set(data.DATASETS)
    if unknown:
        raise UsageError(f"unknown datasets {sorted(unknown)}; choose from {list(data.DATASETS)}")
    jobs = plan(args)
    todo = [j for j in jobs if not os.path.isfile(os.path.join(j[1], "results.json"))]
    print(f"{args.protocol}: {len(jobs)} runs, {len(jobs) - len(todo)} done (results.json "
          f"exists), {len(todo)} to run")
    commands = [["python", os.path.relpath(TRAIN), *a, *extra] for a, _, _ in todo]
    if args.dry_run:
        print(*(shlex.join(c) for c in commands), sep="\n")
        return commands
    failed = []
    for (a, out, needs), cmd in zip(todo, commands):
        if needs in failed:
            print(f"skipped (its training run {needs} failed): {shlex.join(cmd)}")
            failed.append(out)
            continue
        print(f"\n$ {shlex.join(cmd)}", flush=True)
        if subprocess.run([sys.executable, TRAIN, *cmd[2:]]).returncode != 0:
            failed.append(out)
    if len(failed) < len(jobs):  # the tables of every run below --out, this protocol's and others
        print("\n" + summarise.summarise(args.out), end="")
    if failed:
        print(f"\n{len(failed)} runs failed or were skipped: {', '.join(failed)}", file=sys.stderr)
        sys.exit(1)
    return commands


if __name__ == "__main__":
    runs.run_cli(main)
