"""Does the toy world tell the notes' story? Run each method's default command on seeds 1-5 (or
--seeds) and check what the README says the toy shows, seed by seed and on the mean.

    python tools/toy_check.py                      # the default commands, seeds 1-5
    python tools/toy_check.py --seeds 1 2 3 --methods zeroshot coop cocoop

The checks (the story of prompt-learning-notes.md, on the toy):
    coop      base >= zero-shot base + 5 on every seed; new below zero-shot on seed 1 and, by
              >= 3 points, on the mean (base-class overfitting, prototype distortion, 原型扭曲);
              its mean learning curve: new ends >= 5 points below its peak, base >= 95
    cocoop    mean new >= CoOp's mean new + 3, mean H > CoOp's (conditioning keeps the new)
    maple     mean H > CoOp's mean H                                (prompts in both towers)
    finetune  mean new < zero-shot new                              (forgetting, 灾难性遗忘)
CoOp and CoCoOp run with --eval-every (CURVES) for their learning curves. Each run goes to
OUT/<method>/seed<s> (default out/toy_check) and is reused when its results.json is there
(--rerun trains again). Exit status 1 when a check fails.
"""
import argparse
import contextlib
import io
import json
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # repo root

import runs  # noqa: E402
import train  # noqa: E402

METHODS = ["zeroshot", "coop", "cocoop", "maple", "finetune"]
CURVES = {"coop": 10, "cocoop": 1}  # --eval-every: 20 points over CoOp's 200 epochs, 10 for CoCoOp


def mean(runs, m, key="new"):
    return statistics.mean(r[m][key] for r in runs.values())


def curve_drop(runs):
    """CoOp's mean curve (over the seeds, epoch by epoch): (how far new accuracy ends below its
    peak, base accuracy at the end)."""
    curves = [r["coop"]["curve"] for r in runs.values()]
    base, new = ([statistics.mean(c[i][k] for c in curves) for i in range(len(curves[0]))]
                 for k in ("base", "new"))
    return max(new) - new[-1], base[-1]


# method -> [(what the README claims, test on the runs {seed: {method: accuracy}})]
CHECKS = {
    "coop": [
        ("base >= zero-shot + 5 on every seed",
         lambda r: all(s["coop"]["base"] >= s["zeroshot"]["base"] + 5 for s in r.values())),
        ("new < zero-shot on seed 1", lambda r: 1 not in r or
         r[1]["coop"]["new"] < r[1]["zeroshot"]["new"]),
        ("mean new <= zero-shot - 3", lambda r: mean(r, "coop") <= mean(r, "zeroshot") - 3),
        ("mean curve: new ends >= 5 below its peak, base >= 95 at the end",
         lambda r: curve_drop(r)[0] >= 5 and curve_drop(r)[1] >= 95)],
    "cocoop": [("mean new >= CoOp's + 3", lambda r: mean(r, "cocoop") >= mean(r, "coop") + 3),
               ("mean H > CoOp's", lambda r: mean(r, "cocoop", "hm") > mean(r, "coop", "hm"))],
    "maple": [("mean H > CoOp's", lambda r: mean(r, "maple", "hm") > mean(r, "coop", "hm"))],
    "finetune": [("mean new < zero-shot", lambda r: mean(r, "finetune") < mean(r, "zeroshot"))],
}

parser = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--seeds", nargs="+", default=[1, 2, 3, 4, 5],  # train.py's --seed type
                    type=next(a.type for a in train.parser._actions if a.dest == "seed"))
parser.add_argument("--methods", nargs="+", default=METHODS, choices=list(train.METHODS),
                    help="default: " + " ".join(METHODS))
parser.add_argument("--out", default=os.path.join("out", "toy_check"))
parser.add_argument("--rerun", action="store_true", help="train again (replaces the runs)")


def run(method, seed, args):
    """The default command's results (accuracy, curve): from OUT if done, else trained now."""
    out = os.path.join(args.out, method, f"seed{seed}")
    done = os.path.join(out, "results.json")
    if args.rerun or not os.path.isfile(done):
        curve = ["--eval-every", str(CURVES[method])] if method in CURVES else []
        with contextlib.redirect_stdout(io.StringIO()):  # the runs' own logs are in OUT
            train.main(["--method", method, "--seed", str(seed), "--out", out, "--overwrite",
                        *curve])
    try:
        with open(done) as f:
            r = json.load(f)
    except (OSError, ValueError) as e:  # unreadable, not JSON
        r = f"{type(e).__name__}: {e}"
    acc = r.get("accuracy") if isinstance(r, dict) else r
    if not (isinstance(acc, dict) and
            all(type(acc.get(k)) in (int, float) for k in ("base", "new", "hm"))):
        raise runs.UsageError(f"{done} is not a base-to-new results.json that train.py wrote "
                              f"({str(acc)[:100]}): pass --rerun to train it again")
    return {**acc, "curve": r.get("curve", []), "seconds": r.get("train_seconds")}


def main(argv=None):
    args = parser.parse_args(argv)
    runs = {s: {m: run(m, s, args) for m in args.methods} for s in args.seeds}
    cell = "{:.1f} / {:.1f} / {:.1f}".format
    print("| seed | " + " | ".join(args.methods) + " |")
    print("|---" * (len(args.methods) + 1) + "|")
    for s, r in runs.items():
        print(f"| {s} | " + " | ".join(cell(*(r[m][k] for k in ("base", "new", "hm")))
                                        for m in args.methods) + " |")
    print("| mean | " + " | ".join(cell(*(mean(runs, m, k) for k in ("base", "new", "hm")))
                                   for m in args.methods) + " |")
    print("(cells: base / new / H)")
    if "coop" in args.methods and all(r["coop"]["curve"] for r in runs.values()):
        drop, base = curve_drop(runs)
        print(f"CoOp's mean curve: new ends {drop:.1f} points below its peak; base at the end "
              f"{base:.1f}")
    failed = [f"{m}: {what}" for m, checks in CHECKS.items() for what, ok in checks
              if {m, "zeroshot", "coop"} <= set(args.methods) and not ok(runs)]
    print(*(f"failed: {f}" for f in failed), sep="\n")
    print(f"{len(failed)} failed check(s) over seeds {' '.join(map(str, args.seeds))}")
    return failed


if __name__ == "__main__":
    runs.run_cli(lambda: sys.exit(1 if main() else 0))
