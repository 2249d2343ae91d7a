"""A run's folder: what train.py writes there and reads back, and how a command ends.

    OUT/log.txt          everything the run printed; its first line is the command
    OUT/checkpoint.pt    after every epoch: {"learned", "optimizer", "epoch", "config"} (--resume)
    OUT/learned.pt       at the end: {"learned", "config", "classnames"}: what the method learned,
                         the configuration that rebuilds its model, the classes it learned
    OUT/results.json     accuracies in percent, the configuration, the training time
    OUT/eval_*/          --eval-only --load OUT on a dataset: log.txt and results.json

What a method learned is its model's state minus the frozen CLIP (`learned_state`). Every file
is written under a temporary name and renamed, so a kill or a full disk never leaves half a
file under a run's name. train.py writes only into a folder that is new, empty or a run folder
(nothing in it but the entries above): a user's own files are never replaced.

Bad input, anywhere in train.py or tools/, raises UsageError (or data.DataError,
clip.CheckpointError, clip.DownloadError, dassl_cache.CacheError): `run_cli` prints
"error: <message>" and exits with status 2. Any other exception is a bug and keeps its
traceback.
"""
import contextlib
import io
import json
import os
import pickle
import shutil
import struct
import sys

import torch
import torch.distributed as dist

import clip
import dassl_cache
import data


class UsageError(Exception):
    """Bad input: a value, a combination of options, a file or a folder. Says what to do."""


class Interrupted(Exception):
    """Ctrl-C during a run: one line, exit status 130."""


USER_ERRORS = (UsageError, data.DataError, clip.CheckpointError, clip.DownloadError,
               dassl_cache.CacheError)
RUN_FILES = ("log.txt", "checkpoint.pt", "learned.pt", "results.json")
COMMAND = "python train.py"  # the first line of a run's log.txt: how its folder is recognised
# What shapes a run's result: --resume refuses a checkpoint written with other values.
SHAPES_RESULT = ("method", "dataset", "root", "backbone", "backbone_id", "shots", "seed",
                 "protocol", "lr", "batch_size", "epochs", "precision")
CONFIG_KEYS = {"method", "backbone", "dataset", "root", "protocol", "model_options"}  # --load's


def rank():
    """This process's rank under torchrun (DDP), 0 without it: only rank 0 writes."""
    return dist.get_rank() if dist.is_initialized() else 0


# ---- the learned tensors, and the files that hold them
def learned_state(model):
    """What the method learned: the model's state minus the frozen CLIP."""
    return {k: v for k, v in model.state_dict().items() if not k.startswith("clip_model.")}


def load_learned(model, state, source):
    """Load learned_state() tensors (read from `source`) into `model`; CLIP keeps its weights."""
    mine = learned_state(model)
    missing, unexpected = sorted(set(mine) - set(state)), sorted(set(state) - set(mine))
    # a float tensor loads into a float one of any precision; an integer or complex one would be
    # cast (or rejected) without meaning what was learned
    wrong = [f"{k} {tuple(state[k].shape)} {state[k].dtype} (this model: {tuple(v.shape)} "
             f"{v.dtype})" for k, v in mine.items() if k in state and (
                 state[k].shape != v.shape or state[k].is_complex() or
                 state[k].is_floating_point() != v.is_floating_point())]
    if missing or unexpected or wrong:
        raise UsageError(f"{source} does not fit this {type(model).__name__}: missing "
                         f"{missing[:4]}, unexpected {unexpected[:4]}, other shapes or dtypes "
                         f"{wrong[:4]}")
    model.load_state_dict(state, strict=False)


def read(path, keys=("learned", "config")):
    """A file train.py wrote (learned.pt, checkpoint.pt): a dict with `keys` whose tensors are
    finite. Missing, empty, truncated, another kind of file: one UsageError naming it."""
    if not os.path.isfile(path):
        raise UsageError(f"{path} not found: pass the output folder of a training run")
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, IndexError, TypeError,
            AttributeError, UnicodeDecodeError, ImportError, pickle.UnpicklingError,
            struct.error, AssertionError) as e:  # torch.load's ways to fail (measured: bit
        # flips and cuts of the zip and of the legacy format, whose reader asserts on its input)
        raise UsageError(f"cannot read {path} ({type(e).__name__}): it is not a complete file "
                         "written by train.py (truncated or replaced?); run training again") \
            from None
    if not (isinstance(saved, dict) and set(keys) <= set(saved)
            and isinstance(saved.get("config"), dict) and isinstance(saved.get("learned"), dict)
            and all(torch.is_tensor(v) for v in saved["learned"].values())
            and CONFIG_KEYS <= set(saved["config"])):
        raise UsageError(f"{path} is not a file written by train.py (a dict with "
                         f"{', '.join(keys)}); pass a training run's output folder")
    wrong = _unreadable(saved)
    if wrong:
        raise UsageError(f"{path} is not as train.py writes it: {wrong}; pass a training run's "
                         "output folder, or train again")
    bad = [k for k, v in saved["learned"].items() if v.is_floating_point() and
           not torch.isfinite(v).all()]
    if bad:
        raise UsageError(f"{path} holds non-finite values (nan or inf) in {bad[:3]}: the run "
                         "diverged; train again with a lower --lr")
    return saved


def _unreadable(saved):
    """What train.py and tools/ read back from a saved dict that is not of the kind they read
    (config.resolve, prepare, train.train, tools/predict.py), or None."""
    cfg = saved["config"]
    wrong = [k for k in ("method", "backbone", "protocol", "dataset", "root")
             if not isinstance(cfg.get(k), str)]
    wrong += ["backbone_id"] * ("backbone_id" in cfg and not isinstance(cfg["backbone_id"], str))
    options = cfg.get("model_options")
    if not (isinstance(options, list) and all(isinstance(k, str) for k in options)):
        wrong.append("model_options")
    if wrong:
        return f"its config's {', '.join(wrong)} {'is' if len(wrong) == 1 else 'are'} " \
            f"{', '.join(repr(cfg.get(k, 'missing'))[:40] for k in wrong)}"
    if not set(options) <= set(cfg):
        return f"its config lacks the model options {sorted(set(options) - set(cfg))}"
    names = saved.get("classnames", [""])
    if not (isinstance(names, list) and names and all(isinstance(c, str) for c in names)):
        return f"its classnames are {str(names)[:60]}, not a list of class names"
    if not (type(saved.get("epoch", 1)) is int and saved.get("epoch", 1) >= 1):
        return f"its epoch is {saved['epoch']!r}, not a count of epochs done"
    optimizer = saved.get("optimizer", {"state": {}, "param_groups": []})
    if not (isinstance(optimizer, dict) and isinstance(optimizer.get("state"), dict)
            and isinstance(optimizer.get("param_groups"), list)):
        return f"its optimizer state is {str(optimizer)[:60]}, not SGD's state_dict()"
    return None


def read_run(run_dir):
    """A finished run's learned.pt (see `read`), for --eval-only --load and tools/."""
    if not os.path.isfile(os.path.join(run_dir, "learned.pt")):
        raise UsageError(f"{run_dir} holds no learned.pt: pass the output folder of a finished "
                         "training run")
    return read(os.path.join(run_dir, "learned.pt"), keys=("learned", "config", "classnames"))


def read_text(path, flag):
    """A user's text file (`flag`: the option that named it, e.g. "--words") -> its text.
    Missing, a folder, unreadable or not UTF-8: one UsageError naming the flag and file."""
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as e:
        why = e.strerror if isinstance(e, OSError) else f"not UTF-8 text: {e.reason}"
        raise UsageError(f"{flag} {path}: cannot read it as text ({why}); pass a UTF-8 "
                         "text file") from None


def _write(path, payload):
    """Bytes to `path` through a temporary file and a rename; a failing disk is bad input."""
    try:
        with open(path + ".tmp", "wb") as f:
            f.write(payload)
        os.replace(path + ".tmp", path)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.remove(path + ".tmp")
        raise UsageError(f"cannot write {path} ({e.strerror}): free some space or pass another "
                         "--out") from None


def save(path, **content):
    buffer = io.BytesIO()
    torch.save(content, buffer)
    _write(path, buffer.getvalue())


def save_json(path, content):
    _write(path, json.dumps(content, indent=2).encode())


# ---- the folder: whose it is, what it holds
def is_run_folder(path):
    """A folder that train.py wrote: nothing in it but RUN_FILES (log.txt beginning with the
    command), their temporary files and eval_* run folders."""
    for entry in os.scandir(path):
        name = entry.name.removesuffix(".tmp")
        if entry.is_dir(follow_symlinks=False):
            if not (name.startswith("eval_") and is_run_folder(entry.path)):
                return False
        elif name not in RUN_FILES or entry.is_symlink():
            return False
    log = os.path.join(path, "log.txt")
    if os.path.isfile(log):
        with open(log, "rb") as f:
            return f.read(len(COMMAND)) == COMMAND.encode()
    return True


def prepare(cfg):
    """Make --out ready for this run: refuse a folder that is not a run's, a finished or
    interrupted run (without --overwrite or --resume), a --resume with nothing to resume or with
    other settings; -> the open log file (log.txt, or log.txt.tmp until replace_run)."""
    out, ckpt = cfg["out"], os.path.join(cfg["out"], "checkpoint.pt")
    if os.path.exists(out) and not os.path.isdir(out):
        raise UsageError(f"--out {out} is a file; pass a folder (new, empty or a run's own)")
    try:
        foreign = os.path.isdir(out) and not is_run_folder(out)
    except OSError as e:
        raise UsageError(f"--out {out}: cannot read it ({e.strerror}); pass another --out") \
            from None
    if foreign:
        raise UsageError(f"--out {out} holds files that train.py did not write: it writes only "
                         "into a new or empty folder or a run folder of its own. Pass another "
                         "--out")
    done = os.path.isfile(os.path.join(out, "results.json"))
    if cfg["resume"]:
        if done or not os.path.isfile(ckpt):
            what = "a finished run" if done else "no interrupted run (no checkpoint.pt)"
            raise UsageError(f"--resume: {out} holds {what}: nothing to resume. Check --out, or "
                             "drop --resume")
        saved = read(ckpt, keys=("learned", "config", "optimizer", "epoch"))["config"]
        keys = dict.fromkeys([*SHAPES_RESULT, *cfg["model_options"], *saved["model_options"]])
        diff = [f"{k} {saved.get(k)!r} there, {cfg.get(k)!r} now" for k in keys
                if saved.get(k) != cfg.get(k)]
        if diff:
            raise UsageError(f"--resume: {ckpt} was written with other settings "
                             f"({'; '.join(diff)}). Resume with the checkpoint's settings, or "
                             "pass --overwrite (or another --out) to start again")
    elif (done or os.path.isfile(ckpt)) and not cfg["overwrite"]:
        raise UsageError(f"{out} holds {'a finished' if done else 'an interrupted'} run: pass "
                         f"{'' if done else '--resume to continue it, '}--overwrite to replace "
                         "it, or another --out")
    # --overwrite: the old run stays until replace_run(), once the new run has passed every
    # check that can be made before training; until then this run logs to log.txt.tmp
    replacing = cfg["overwrite"] and not cfg["resume"] and os.path.isdir(out) and \
        any(e.name != "log.txt.tmp" for e in os.scandir(out))
    try:
        os.makedirs(out, exist_ok=True)
        return open(os.path.join(out, "log.txt.tmp" if replacing else "log.txt"),
                    "a" if cfg["resume"] else "w")
    except OSError as e:
        raise UsageError(f"--out {out}: cannot write there ({e.strerror}); pass another --out") \
            from None


def replace_run(cfg):
    """--overwrite, after the new run's checks: the old run goes (its eval_* folders included)
    and this run's log.txt.tmp becomes log.txt. A refused command never gets here, so it
    leaves the old run as it was."""
    out = cfg["out"]
    if rank() != 0 or not os.path.isfile(os.path.join(out, "log.txt.tmp")):
        return
    for entry in os.scandir(out):  # a run folder (checked by prepare): all of it goes
        if entry.name != "log.txt.tmp":
            shutil.rmtree(entry.path) if entry.is_dir() else os.remove(entry.path)
    os.replace(os.path.join(out, "log.txt.tmp"), os.path.join(out, "log.txt"))  # still open


class Tee(list):
    """A stream that writes to each of its streams (the terminal and log.txt)."""

    def write(self, text):
        for stream in self:
            stream.write(text)
            stream.flush()

    def flush(self):
        pass


@contextlib.contextmanager
def run_folder(cfg, command):
    """Prepare --out (see `prepare`) and send everything printed and warned inside to
    OUT/log.txt too, after `command`. Ctrl-C ends with one line naming the last checkpoint."""
    if rank() != 0:  # DDP: rank 0 keeps the folder and prints; the others stay silent
        with open(os.devnull, "w") as null, contextlib.redirect_stdout(null):
            yield
        return
    with prepare(cfg) as log, contextlib.redirect_stdout(Tee([sys.stdout, log])), \
            contextlib.redirect_stderr(Tee([sys.stderr, log])):
        print(command)
        try:
            yield
        except KeyboardInterrupt:
            ckpt = os.path.join(cfg["out"], "checkpoint.pt")
            epoch = read(ckpt)["epoch"] if os.path.isfile(ckpt) else 0
            raise Interrupted(f"interrupted. {ckpt} holds epoch {epoch}: run the same command "
                              "with --resume to continue" if epoch else
                              "interrupted before the first epoch ended; nothing was saved") \
                from None


def run_cli(main):
    """Run a command's main(): bad input prints "error: <message>" and exits with status 2, a
    non-finite loss with status 1, Ctrl-C with 130; a bug keeps its traceback."""
    try:
        main()
    except (*USER_ERRORS, FloatingPointError, Interrupted) as e:
        where = f"[rank {rank()}] " if dist.is_initialized() else ""  # DDP: which process
        print(f"{where}{'' if isinstance(e, Interrupted) else 'error: '}{e}", file=sys.stderr)
        sys.exit(130 if isinstance(e, Interrupted) else 1 if isinstance(e, FloatingPointError)
                 else 2)
    except KeyboardInterrupt:  # before the run's folder was set up: nothing to lose
        sys.exit(130)
    except BrokenPipeError:  # `... | head` closed the pipe: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        sys.exit(1)
    finally:  # DDP: leave the process group before exit (its threads must not outlive it)
        if dist.is_initialized():
            dist.destroy_process_group()
