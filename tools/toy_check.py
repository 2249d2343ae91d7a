"""Does the toy world tell the notes' story on every seed? Run each method's default command on
seeds 1-3 (or --seeds) and check, seed by seed, what the README says the toy shows.

    python tools/toy_check.py                       # the default commands, seeds 1 2 3
    python tools/toy_check.py --seeds 1 2 3 4 5 --methods zeroshot coop cocoop

The checks (the story of prompt-learning-notes.md, on the toy):
    coop      base >= zero-shot base + 5, new <= zero-shot new - 3   (base-class overfitting,
              prototype distortion, 原型扭曲)
    cocoop    new >= CoOp new + 3, H > CoOp H                       (conditioning keeps the new)
    maple     H > CoOp H; mean H over the seeds > CoCoOp's          (prompts in both towers)
    finetune  new < zero-shot new                                   (forgetting, 灾难性遗忘)
Each run goes to OUT/<method>/seed<s> (default out/toy_check) and is reused when its
results.json is there (--rerun trains again), so a change to the world is measured the same way
every time: change toy/world.py, run this with --rerun, read the table. Exit status 1 when a
check fails.
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
CHECKS = {  # method -> [(what the README claims, test on that seed's runs r[method][key])]
    "coop": [("base >= zero-shot + 5", lambda r: r["coop"]["base"] >= r["zeroshot"]["base"] + 5),
             ("new <= zero-shot - 3", lambda r: r["coop"]["new"] <= r["zeroshot"]["new"] - 3)],
    "cocoop": [("new >= CoOp + 3", lambda r: r["cocoop"]["new"] >= r["coop"]["new"] + 3),
               ("H > CoOp", lambda r: r["cocoop"]["hm"] > r["coop"]["hm"])],
    "maple": [("H > CoOp", lambda r: r["maple"]["hm"] > r["coop"]["hm"])],
    "finetune": [("new < zero-shot", lambda r: r["finetune"]["new"] < r["zeroshot"]["new"])],
}

parser = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--seeds", nargs="+", default=[1, 2, 3],  # train.py's --seed type
                    type=next(a.type for a in train.parser._actions if a.dest == "seed"))
parser.add_argument("--methods", nargs="+", default=METHODS, choices=list(train.METHODS),
                    help="default: " + " ".join(METHODS))
parser.add_argument("--out", default=os.path.join("out", "toy_check"))
parser.add_argument("--rerun", action="store_true", help="train again (replaces the runs)")


def run(method, seed, args):
    """The default command's accuracies {base, new, hm}: from OUT if done, else trained now."""
    out = os.path.join(args.out, method, f"seed{seed}")
    done = os.path.join(out, "results.json")
    if args.rerun or not os.path.isfile(done):
        with contextlib.redirect_stdout(io.StringIO()):  # the runs' own logs are in OUT
            train.main(["--method", method, "--seed", str(seed), "--out", out, "--overwrite"])
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
    return acc


def main(argv=None):
    args = parser.parse_args(argv)
    acc = {s: {m: run(m, s, args) for m in args.methods} for s in args.seeds}
    cell = "{base:.1f} / {new:.1f} / {hm:.1f}".format
    print("| seed | " + " | ".join(args.methods) + " | failed checks |")
    print("|---" * (len(args.methods) + 2) + "|")
    failed = []
    for s, r in acc.items():
        bad = [f"{m}: {what}" for m, checks in CHECKS.items() if m in r
               for what, ok in checks if all(k in r for k in ("zeroshot", "coop")) and not ok(r)]
        failed += bad
        print(f"| {s} | " + " | ".join(cell(**r[m]) for m in args.methods) +
              f" | {'; '.join(bad) or '-'} |")
    mean = {m: {k: statistics.mean(acc[s][m][k] for s in acc) for k in ("base", "new", "hm")}
            for m in args.methods}
    print("| mean | " + " | ".join(cell(**mean[m]) for m in args.methods) + " | |")
    if {"maple", "cocoop"} <= set(mean) and not mean["maple"]["hm"] > mean["cocoop"]["hm"]:
        failed.append("maple: mean H > CoCoOp's mean H")
        print("failed: maple's mean H is not above CoCoOp's")
    print(f"{len(failed)} failed check(s) over seeds {' '.join(map(str, args.seeds))}"
          " (cells: base / new / H)")
    return failed


if __name__ == "__main__":
    runs.run_cli(lambda: sys.exit(1 if main() else 0))
