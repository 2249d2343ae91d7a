"""Command-line fuzzing of train.py and tools/: seeded argument vectors, run in-process.

    python tests/fuzz.py                          # the CI sweep (tests/test_fuzz.py)
    python tests/fuzz.py --vectors 2000 --seed 7  # a longer sweep
    python tests/fuzz.py --seed 7 --only 123      # replay one vector, printing its output

A vector is one command line of train.py or a tool (predict, interpret, summarise, reproduce
--dry-run, templates, toy_check --methods zeroshot): a valid base on a tiny dataset and a tiny
CLIP (sometimes the toy), then flags of its parser drawn from parser._actions (so a new flag is
fuzzed without a change here) with valid, boundary, wrong-type and absurd values, sometimes a
conflicting pair, and files damaged every way fuzz_world.py knows. It runs as the command
does, `runpy` on the script with sys.argv set, in a scratch folder of its own. The property:
  exit 0  the run wrote its files and they read back (results.json, learned.pt or
          checkpoint.pt, predict --out);
  exit 2  the last line on stderr is the one error line ("error: ..." or argparse's
          "prog: error: ..."), no traceback, no Python-internal text in it, no training before
          it unless only training could tell (a non-finite loss, unwritable --out, unreadable
          test images);
  exit 1  train.py's non-finite loss (one error line), toy_check's failed checks;
and after any failure nothing a later run would misread: no results.json, learned.pt or
checkpoint.pt new or changed, and a valid run into the same --out works or is refused cleanly.
Anything else is a finding, printed with the seed and index that replay it.
"""
import argparse
import contextlib
import io
import json
import os
import random
import re
import resource
import runpy
import shutil
import signal
import sys
import tempfile
import time
import traceback
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), HERE]  # the repository root; conftest, fuzz_world

import torch  # noqa: E402

import config  # noqa: E402
import runs  # noqa: E402
import train  # noqa: E402
from tools import predict  # noqa: E402
from fuzz_draw import TARGETS, draw, quiet_parse  # noqa: E402
from fuzz_world import World  # noqa: E402


CI_VECTORS = 250  # tests/test_fuzz.py's sweep, seed 0


class Timeout(BaseException):
    """A vector ran past its time limit (a BaseException: nothing under test catches it)."""


# ---- running a vector, and judging what it did
def show_warning(message, category, filename, lineno, file=None, line=None):
    """Python's own: a warning goes to (the captured) stderr."""
    sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))


def execute(target, argv, cwd, limit_s=120):
    """Run the target's script as `python SCRIPT argv` would (its __main__ block), in-process,
    in `cwd` -> (exit status or None, stdout, stderr, the traceback of an escaped exception)."""
    script = TARGETS[target].__file__
    out, err, code, crash = io.StringIO(), io.StringIO(), 0, None
    old_cwd, old_argv = os.getcwd(), sys.argv

    def alarm(*_):
        raise Timeout(f"still running after {limit_s} s")
    old_alarm = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, limit_s)
    try:
        os.chdir(cwd)
        sys.argv = [script, *argv]
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), \
                warnings.catch_warnings():
            warnings.simplefilter("default")  # as python does: to stderr, once per place
            warnings.showwarning = show_warning
            runpy.run_path(script, run_name="__main__")
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
    except BaseException as e:  # noqa: BLE001 - an escaped exception is what the fuzz seeks
        code, crash = None, (traceback.format_exc(),
                             "".join(traceback.format_exception_only(e)).strip())
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old_alarm)
        os.chdir(old_cwd)
        sys.argv = old_argv
    if code == 130:
        raise KeyboardInterrupt  # Ctrl-C: stop the sweep
    return code, out.getvalue(), err.getvalue(), crash


ERROR_LINE = re.compile(r"^(\[rank \d+\] )?error: |^\S+: error: ")
# the text of Python's own exceptions: an error line that holds it explains nothing to a user
PYTHON_TEXT = re.compile(r"object has no attribute|is not subscriptable|unsupported operand|"
                         r"invalid literal for|'NoneType'|object is not iterable|index out of "
                         r"range|unhashable type|positional argument|unexpected keyword|"
                         r"not supported between instances|object is not callable|"
                         r"must be real number|can't multiply sequence|invalid parse value|"
                         r"^error: '[^']*'$")
# what only training can tell: a refusal after training started is fine for these
LATE_OK = re.compile(r"the loss is|cannot write|no readable test images")
RUN_FILES = ("results.json", "learned.pt", "checkpoint.pt")


def judge(target, argv, code, out, err, crash, cwd):
    """What is wrong with one run (see the module docstring) -> [problem]."""
    if crash is not None:
        return ["escaped: " + crash[1][:300]]
    problems = ["a traceback was printed"] * ("Traceback (most recent call last)" in out + err)
    lines = err.strip().splitlines()
    last = lines[-1] if lines else ""
    if code == 2:
        errors = [x for x in lines if ERROR_LINE.match(x)]
        if not ERROR_LINE.match(last):
            problems.append(f"exit 2, but the last line on stderr is {last[:200]!r}")
        elif len(errors) > 1:
            problems.append(f"exit 2 with {len(errors)} error lines")
        if PYTHON_TEXT.search(last):
            problems.append(f"the error is Python's own text: {last[:300]}")
        if "epoch [" in out and not LATE_OK.search(last):
            problems.append(f"refused after training started: {last[:300]}")
    elif code == 1:
        if not (target == "train" and last.startswith("error: the loss is") or
                target == "toy_check" and "failed check" in out):
            problems.append(f"exit 1: {last[:300]!r}")
    elif code == 0:
        problems += outputs(target, argv, out, cwd)
    else:
        problems.append(f"exit {code}: {last[:300]!r}")
    return problems


def outputs(target, argv, out, cwd):
    """After exit 0: the files the command writes exist and read back -> [problem]."""
    old = os.getcwd()
    os.chdir(cwd)
    try:
        if target == "predict":
            path = quiet_parse(predict.parser, argv).out
            if path and not (os.path.isfile(path) and os.path.getsize(path)):
                return [f"predict --out {path}: not written"]
            return []
        if target != "train":
            return []
        cfg = config.resolve(train.parser.parse_args(argv), train.METHODS)
        recipe = train.METHODS[cfg["method"]]
        learns = ("lr" in recipe.defaults or hasattr(recipe.model, "fit")) and \
            not cfg["eval_only"]
        if "stopped after epoch" in out:
            runs.read(os.path.join(cfg["out"], "checkpoint.pt"),
                      keys=("learned", "config", "optimizer", "epoch"))
            return []
        with open(os.path.join(cfg["out"], "results.json")) as f:
            acc = json.load(f)["accuracy"]
        if learns:
            runs.read_run(cfg["out"])
        return [f"accuracy {acc}"] * (not all(0 <= a <= 100 for a in acc.values()))
    except (OSError, ValueError, KeyError, runs.UsageError) as e:
        return [f"exit 0, but its files do not read back: {type(e).__name__}: {e}"]
    finally:
        os.chdir(old)


def run_files(folder):
    """{path: (size, mtime)} of every run file below `folder` (links not followed)."""
    found = {}
    for d, _, files in os.walk(folder):
        for f in files:
            if f in RUN_FILES:
                st = os.stat(os.path.join(d, f))
                found[os.path.join(d, f)] = (st.st_size, st.st_mtime_ns)
    return found


def out_of(argv):
    """The last --out value of a train.py command line, or None."""
    value = None
    for i, x in enumerate(argv):
        if x == "--out" and i + 1 < len(argv):
            value = argv[i + 1]
        elif x.startswith("--out="):
            value = x[len("--out="):]
    return value


def aftermath(world, target, argv, code, scratch, before, limit_s):
    """After a refusal: no run file new or changed, and a valid run into the same --out works
    or is refused cleanly -> [problem]."""
    if code in (0, 1):  # exit 1: a non-finite loss may follow a saved epoch
        return []
    changed = sorted(p for p, st in run_files(scratch).items() if before.get(p) != st)
    problems = [f"left {os.path.relpath(p, scratch)} after exit {code}" for p in changed]
    out = out_of(argv) if target == "train" else None
    if out and os.path.isdir(os.path.join(scratch, out)) and \
            os.path.realpath(os.path.join(scratch, out)).startswith(os.path.realpath(scratch)):
        later = ["--dataset", "folder", "--root", world.copy("pets", scratch, "later_pets"),
                 "--backbone", world.tiny, "--shots", "1", "--epochs", "1", "--method", "coop",
                 "--protocol", "fewshot", "--device", "cpu", "--out", out]
        result = execute("train", later, scratch, limit_s)
        problems += [f"a later valid run into --out: {p}"
                     for p in judge("train", later, *result, scratch)]
    return problems


# ---- the sweep
def fingerprint(folder):
    return {os.path.join(d, f): os.stat(os.path.join(d, f)).st_mtime_ns
            for d, _, files in os.walk(folder) for f in files}


@contextlib.contextmanager
def memory_limit(extra=8 << 30):
    """Address space limited to what the process holds now plus `extra`: an absurd value that
    allocates without bound fails (MemoryError: a finding) instead of taking the machine."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    with open("/proc/self/status") as f:
        held = int(re.search(r"VmSize:\s+(\d+) kB", f.read()).group(1)) << 10
    resource.setrlimit(resource.RLIMIT_AS, (held + extra, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def run_vector(world, seed, i, root, limit_s):
    """Draw vector `i` of `seed` into its scratch folder, run it, judge it -> (target, argv,
    notes, exit status, its output, problems)."""
    rng = random.Random(f"{seed}:{i}")  # each vector from (seed, index) alone: --only replays
    scratch = os.path.join(root, f"v{i:05d}")
    os.makedirs(scratch)
    os.symlink(world.toy_root, os.path.join(scratch, "data"))  # the default --root ./data
    target, argv, notes = draw(rng, world, scratch)
    ns = quiet_parse(TARGETS[target].parser, argv[:argv.index("--")] if "--" in argv else argv)
    if (getattr(ns, "workers", None) or 0) > config.MAX_WORKERS:
        return target, argv, notes, None, "", [f"--workers {ns.workers} accepted: not run, it "
                                               "would start that many processes"]
    before = run_files(scratch)
    code, out, err, crash = execute(target, argv, scratch, limit_s)
    problems = judge(target, argv, code, out, err, crash, scratch)
    problems += aftermath(world, target, argv, code, scratch, before, limit_s)
    return target, argv, notes, code, out + err + (crash[0] if crash else ""), problems


def sweep(seed, vectors, root, toy_root, only=None, keep=False, log=print, limit_s=120):
    """Run `vectors` vectors (or only number `only`) of `seed` in `root` -> (findings,
    outcomes): findings [(index, target, argv, notes, problems)], outcomes {(target, exit):
    count}. A vector's scratch folder is removed after it unless `keep`; `log` gets each
    finding as it comes (and with `only`, the vector's output)."""
    world = World(os.path.join(root, "world"), toy_root)
    shared = [fingerprint(world.root), fingerprint(os.path.join(toy_root, "toy"))]
    findings, outcomes = [], {}
    torch.set_num_threads(1)
    with memory_limit():
        for i in ([only] if only is not None else range(vectors)):
            target, argv, notes, code, output, problems = run_vector(world, seed, i, root,
                                                                     limit_s)
            if [fingerprint(world.root), fingerprint(os.path.join(toy_root, "toy"))] != shared:
                problems.append("changed the shared fixtures")
                shared = [fingerprint(world.root), fingerprint(os.path.join(toy_root, "toy"))]
            outcomes[target, code] = outcomes.get((target, code), 0) + 1
            if only is not None:
                log(f"{target} {argv} {notes}\n{output}exit {code}")
            if problems:
                findings.append((i, target, argv, notes, problems))
                log(f"FINDING [--seed {seed} --only {i}] {target} {argv}" +
                    (f" ({'; '.join(notes)})" if notes else "") +
                    "".join(f"\n    {p}" for p in problems))
            if not keep and only is None:
                shutil.rmtree(os.path.join(root, f"v{i:05d}"))
    return findings, outcomes


def summary(findings, outcomes, seconds):
    """The closing note: vectors per target and exit status, the distinct findings."""
    by_target = {}
    for (target, code), n in sorted(outcomes.items(), key=str):
        by_target.setdefault(target, []).append(f"exit {code}: {n}")
    kinds = {}
    for _, target, _, _, problems in findings:
        for p in problems:
            key = re.sub(r"'[^']*'|\"[^\"]*\"|/\S+|\d+", "_", p)[:120]  # paths, numbers out
            kinds[target, key] = kinds.get((target, key), 0) + 1
    lines = [f"{sum(outcomes.values())} vectors in {seconds:.0f} s, {len(findings)} with "
             f"findings ({len(kinds)} distinct)"]
    lines += [f"  {t}: {', '.join(v)}" for t, v in by_target.items()]
    lines += [f"  {n} x {t}: {k}" for (t, k), n in sorted(kinds.items())]
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vectors", type=int, default=CI_VECTORS,
                   help=f"how many (default: CI's {CI_VECTORS})")
    p.add_argument("--only", type=int, help="run only vector number ONLY of --seed, and print "
                   "its output")
    p.add_argument("--keep", metavar="DIR", help="work in DIR and keep every vector's folder "
                   "(default: a temporary folder, removed)")
    args = p.parse_args(argv)
    t0 = time.time()
    with contextlib.ExitStack() as stack:
        root = os.path.abspath(args.keep or stack.enter_context(tempfile.TemporaryDirectory()))
        from toy import world  # noqa: PLC0415 - the toy task, rendered once for the sweep
        toy_root = os.path.join(root, "toy_data")
        world.ensure_dataset(toy_root)
        findings, outcomes = sweep(args.seed, args.vectors, root, toy_root, args.only,
                                   bool(args.keep))
    print(summary(findings, outcomes, time.time() - t0))
    return 1 if findings else 0


if __name__ == "__main__":
    sys.exit(main())
