"""A run's folder and its command line: what train.py writes and tools/ read back.

    OUT/log.txt          everything the run printed, warnings included
    OUT/checkpoint.pt    after every epoch: {"learned", "optimizer", "epoch", "config"} (--resume)
    OUT/learned.pt       at the end: {"learned", "config", "classnames"}: what the method
                         learned, the configuration that rebuilds its model and the classes it
                         learned on (--eval-only --load, tools/)
    OUT/results.json     accuracies in percent, the configuration, the training time

What a method learned is its model's state minus the frozen CLIP (`learned_state`): CoOp's
context is kilobytes, fine-tuning's trained part is CLIP-sized. The class-name buffers of the
prompt learners are not saved (persistent=False), so the tensors fit a model built for other
classes (base -> new, cross-dataset).

Bad input, anywhere in train.py or tools/, ends with "error: <message>" and exit status 2,
without a traceback (`run_cli`), and as much of it as can be known is refused before any work:
values outside their meaning (`positive`, `shots`), options that do not go together
(`check_config`), an output folder that cannot be written or that holds a finished run, or a
--resume whose settings differ from the checkpoint's (`run_folder`). Ctrl-C ends with one line
that says where the last checkpoint is.
"""
import argparse
import contextlib
import datetime
import json
import os
import sys
import time

import torch
import torch.distributed as dist

import clip
import data

# Bad input: reported as "error: <message>", exit status 2, no traceback. Anything else is a bug.
USER_ERRORS = (data.DataError, clip.CheckpointError, clip.DownloadError, ValueError,
               FileNotFoundError)
# What shapes a run's result: --resume refuses a checkpoint written with other values.
SHAPES_RESULT = ("method", "dataset", "root", "backbone", "shots", "seed", "protocol", "lr",
                 "batch_size", "epochs", "precision")


# ---- the command line: values, combinations
def positive(kind):
    """An argparse type: a number of `kind` (int, float) greater than 0."""
    def parse(text):
        value = kind(text)
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be greater than 0, got {text}")
        return value
    return parse


def shots(text):
    """An argparse type: images per class, a positive count or -1 for all of them."""
    value = int(text)
    if value < 1 and value != -1:
        raise argparse.ArgumentTypeError(f"a positive number of images per class, or -1 for "
                                         f"all of them; got {text}")
    return value


def check_config(cfg, given, flags, module):
    """Refuse what cannot mean what the user wants, before any work. `given`: the keys set on
    the command line; `flags`: the method options train.py has flags for."""
    if cfg["method"] != given.get("method", cfg["method"]):
        raise ValueError(f"--method {given['method']}, but --load {cfg['load']} holds "
                         f"{cfg['method']} prompts")
    for key in flags:
        if key in given and key not in cfg["model_options"]:
            raise ValueError(f"--{key.replace('_', '-')} is not an option of --method "
                             f"{cfg['method']}")
    trains = cfg["method"] != "zeroshot"
    if not trains and {"epochs", "lr", "resume", "load"} & set(given):
        raise ValueError("--method zeroshot trains nothing: drop --epochs/--lr/--resume/--load")
    if trains and cfg["eval_only"] != bool(cfg["load"]):
        raise ValueError("--eval-only and --load DIR (a training run's output folder) go "
                         f"together for --method {cfg['method']}")
    try:
        device = torch.device(cfg["device"])
    except RuntimeError:
        raise ValueError(f"--device {cfg['device']}: not a device torch knows; use cpu or "
                         "cuda (cuda:N for the N-th GPU)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {cfg['device']}, but torch finds no CUDA GPU; use cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"--device {cfg['device']}, but torch finds only "
                         f"{torch.cuda.device_count()} GPU(s): cuda:0 .. cuda:"
                         f"{torch.cuda.device_count() - 1}")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {cfg['device']}: train.py runs on cpu or cuda")
    if cfg["precision"] not in (None, "fp32") and device.type != "cuda":
        raise ValueError(f"--precision {cfg['precision']} needs a GPU; on the CPU use fp32")
    world = cfg["world_size"]
    if trains and not cfg["eval_only"] and cfg["batch_size"] % world:
        raise ValueError(f"--batch-size {cfg['batch_size']} is the global batch, split over "
                         f"{world} processes: pass a multiple of {world} (e.g. --batch-size "
                         f"{world}, a different recipe), or run on fewer processes")


def check_classes(model, cfg, halves, learned_for=None):
    """Learned tensors with one row per training class (the model's `class_specific` says
    which) fit only those classes: refuse the new half (base2new), or another class list
    (`learned_for`: the classes a --load'ed run learned)."""
    reason, names = getattr(model, "class_specific", ""), next(iter(halves.values())).classnames
    if reason and "new" in halves:
        raise ValueError(f"--method {cfg['method']} with --protocol base2new: {reason}. Use "
                         "--protocol fewshot (all classes)")
    if reason and learned_for is not None and list(learned_for) != names:
        raise ValueError(f"--load {cfg['load']}: {reason}. It was learned for {len(learned_for)}"
                         f" classes ({', '.join(learned_for[:3])}, ...), not the {len(names)} of "
                         f"--dataset {cfg['dataset']}: evaluate it on the classes it learned")


def check_context_length(model, cfg, given):
    """ctx_init sets CoOp's and CoCoOp's context length: an explicit --n-ctx (`given`) that it
    would override is refused; otherwise a note says which length runs."""
    n_ctx = getattr(getattr(model, "prompt_learner", None), "n_ctx", None)
    if n_ctx is None or n_ctx == cfg.get("n_ctx"):
        return
    if given is not None:
        raise ValueError(f"--n-ctx {given}, but --ctx-init {cfg['ctx_init']!r} sets the context "
                         f"length ({n_ctx} tokens): pass --ctx-init '' for {given} random context "
                         f"vectors, or --ctx-init with the {given} words to start from")
    print(f"note: n_ctx is {n_ctx}, the length of ctx_init {cfg['ctx_init']!r}")


def check_data(halves, train=True, val=False):
    """Refuse, before any training, what cannot give a meaningful run: fewer than two classes to
    tell apart, or a class without images in a split the run needs (test; train and val of the
    first half when `train` / `val`)."""
    first = next(iter(halves.values()))
    if len(first.classnames) < 2:
        raise data.DataError(f"{first.name}: {len(first.classnames)} class(es) to train on; a "
                             "classifier needs at least 2 (base2new: 3, for a base and a new half)")
    if train and first.test_only:
        raise data.DataError(f"{first.name} is test-only (no training images): evaluate trained "
                             "prompts on it with --eval-only --load RUN_DIR")
    for d in halves.values():
        needed = ("train",) * train + ("val",) * val if d is first else ()
        for split in (*needed, "test"):
            empty = sorted(set(range(len(d.classnames))) - {y for _, y in getattr(d, split)})
            if empty:
                raise data.DataError(
                    f"{d.name} ({d.subset}): {len(empty)} of {len(d.classnames)} classes have no "
                    f"{split} images, e.g. {d.classnames[empty[0]]!r}. Add images (a folder "
                    "dataset splits each class 50/20/30: at least 4 per class), or choose "
                    "another --dataset")


def start_processes(cfg):
    """Under torchrun (cfg["world_size"] > 1): join the process group, nccl on GPUs (each
    process on the GPU of its LOCAL_RANK), gloo on CPUs. Without torchrun, nothing."""
    if cfg["world_size"] > 1:
        cuda = cfg["device"].startswith("cuda")
        dist.init_process_group("nccl" if cuda else "gloo")
        if cuda:
            cfg["device"] = f"cuda:{os.environ['LOCAL_RANK']}"
            torch.cuda.set_device(cfg["device"])


def rank():
    """This process's rank under torchrun (DDP), 0 without it."""
    return dist.get_rank() if dist.is_initialized() else 0


def progress(what, i, n, done, t0, cfg):
    """A Dassl-style progress line every print_freq batches and at the end (batch i of n,
    `done` images so far, all ranks together)."""
    if (i + 1) % cfg["print_freq"] == 0 or i + 1 == n:
        rate = done / max(time.time() - t0, 1e-9)
        eta = datetime.timedelta(seconds=round((n - i - 1) * (time.time() - t0) / (i + 1)))
        print(f"{what} [{i + 1}/{n}] images {done} ({rate:.1f}/s) eta {eta}")


# ---- the run's folder
def folder(root, dataset, method, backbone, shots, protocol, seed):
    """train.py's default output folder: ROOT/DATASET/METHOD/BACKBONE_<shots>shots_PROTOCOL/
    seed<seed>, with the backbone's name ('ViT-B-16') or its checkpoint file's stem."""
    bb = backbone.replace("/", "-") if backbone in clip.available_models() else \
        os.path.splitext(os.path.basename(backbone))[0]
    return os.path.join(root, dataset, method, f"{bb}_{shots}shots_{protocol}", f"seed{seed}")


def learned_state(model):
    """What the method learned: the model's state minus the frozen CLIP."""
    return {k: v for k, v in model.state_dict().items() if not k.startswith("clip_model.")}


def load_learned(model, state):
    """Load learned_state() tensors into `model`; its frozen CLIP keeps its own weights."""
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # tensors of other shapes
        raise ValueError(f"the saved tensors do not fit this {type(model).__name__}: {e}") \
            from None
    missing = [k for k in missing if not k.startswith("clip_model.")]
    if missing or unexpected:
        raise ValueError(f"the saved tensors do not fit this {type(model).__name__}: missing "
                         f"{missing}, unexpected {unexpected}")


def read(run_dir, name="learned.pt"):
    """A run's learned.pt (or checkpoint.pt): {"learned": tensors, "config": ...}."""
    path = os.path.join(run_dir, name)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{run_dir} holds no {name}: pass the output folder of a "
                                "finished training run")
    return torch.load(path, map_location="cpu", weights_only=True)


def method_settings(run_dir):
    """What --load takes from a training run: its method, backbone, protocol, model options."""
    cfg = read(run_dir)["config"]
    return {k: cfg[k] for k in ("method", "backbone", "protocol", *cfg["model_options"])}


def save(path, **content):
    torch.save(content, path + ".tmp")
    os.replace(path + ".tmp", path)  # atomic: a kill never leaves half a file


def resume(path, model, optimizer, cfg):
    """Continue from the checkpoint at `path`, if there is one: -> the epochs it completed."""
    if not os.path.isfile(path):
        return 0
    ckpt = torch.load(path, map_location=cfg["device"], weights_only=True)
    load_learned(model, ckpt["learned"])
    optimizer.load_state_dict(ckpt["optimizer"])
    print(f"resumed from {path} after epoch {ckpt['epoch']}")
    return ckpt["epoch"]


def non_finite(loss, epoch, i, n, cfg, ckpt_path):
    """The message for a loss that is inf or nan at batch i of n of `epoch` (0-based)."""
    fp32 = "" if cfg["precision"] == "fp32" else f" or --precision fp32 (now {cfg['precision']})"
    kept = f" {ckpt_path} holds epoch {epoch} (--resume continues from it)." if epoch else ""
    return (f"the loss is {loss.item()} at epoch {epoch + 1}/{cfg['epochs']}, batch {i + 1}/{n}."
            f" Try a lower --lr (now {cfg['lr']}){fp32}.{kept}")


def save_results(cfg, accuracy, train_seconds, loaders, fewshot_source):
    """results.json in the output folder and the one-line summary; -> the results dict."""
    skipped = len(set().union(*(loader.skipped for loader in loaders)))
    results = {k: cfg[k] for k in ("method", "dataset", "backbone", "shots", "seed", "protocol")}
    results.update(accuracy=accuracy, train_seconds=round(train_seconds, 1),
                   skipped_images=skipped, fewshot_source=fewshot_source, config=cfg)
    if rank() == 0:  # DDP: one writer
        with open(os.path.join(cfg["out"], "results.json"), "w") as f:
            json.dump(results, f, indent=2)
    print(f"{cfg['method']} | {cfg['dataset']} | " + " ".join(
        f"{k} {v:.2f}" for k, v in accuracy.items()) +
        f" | train {train_seconds:.0f}s | skipped images {skipped} | {cfg['out']}")
    return results


class Tee(list):
    """A stream that writes to each of its streams (the terminal and log.txt)."""

    def write(self, text):
        for stream in self:
            stream.write(text)
            stream.flush()

    def flush(self):
        pass


@contextlib.contextmanager
def run_folder(cfg):
    """Make the output folder ready (refusing to replace a finished run, or to resume with other
    settings), and send everything printed (and warned) inside also to OUT/log.txt. Ctrl-C
    ends with one line saying where the last checkpoint is."""
    out, ckpt = cfg["out"], os.path.join(cfg["out"], "checkpoint.pt")
    if rank() != 0:  # DDP: rank 0 keeps the folder and prints; the others stay silent
        with open(os.devnull, "w") as null, contextlib.redirect_stdout(null):
            yield
        return
    if os.path.isfile(out):
        raise ValueError(f"--out {out} is a file; pass a folder (new or a run's own)")
    try:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, ".write_test"), "w"):
            pass
        os.remove(os.path.join(out, ".write_test"))
    except OSError as e:
        raise ValueError(f"--out {out}: cannot write there ({e.strerror}); pass another --out") \
            from None
    if not cfg["overwrite"]:
        check_folder(cfg, ckpt)
    for name in ("results.json", "learned.pt", "checkpoint.pt") if cfg["overwrite"] else ():
        if os.path.isfile(os.path.join(out, name)):  # --overwrite: the old run goes
            os.remove(os.path.join(out, name))
    with open(os.path.join(out, "log.txt"), "a" if cfg["resume"] else "w") as log, \
            contextlib.redirect_stdout(Tee([sys.stdout, log])), \
            contextlib.redirect_stderr(Tee([sys.stderr, log])):
        try:
            yield
        except KeyboardInterrupt:
            epoch = torch.load(ckpt, weights_only=True)["epoch"] if os.path.isfile(ckpt) else 0
            raise Interrupted(f"interrupted. {ckpt} holds epoch {epoch}: run the same command "
                              "with --resume to continue" if epoch else
                              "interrupted before the first epoch ended; nothing was saved") \
                from None


def check_folder(cfg, ckpt):
    """A finished run is never replaced, an interrupted one not restarted, a checkpoint not
    resumed with other settings, without a word."""
    if os.path.isfile(os.path.join(cfg["out"], "results.json")):
        raise ValueError(f"{cfg['out']} holds a finished run (results.json)"
                         f"{': nothing to resume' if cfg['resume'] else ''}. Pass --overwrite to "
                         "replace it, or another --out")
    if not os.path.isfile(ckpt):
        return
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)
    if not cfg["resume"]:
        raise ValueError(f"{cfg['out']} holds an interrupted run ({ckpt}, epoch "
                         f"{saved['epoch']}): pass --resume to continue it, --overwrite to "
                         "start again, or another --out")
    keys = [*SHAPES_RESULT, *cfg["model_options"], *saved["config"]["model_options"]]
    diff = [f"{k} {saved['config'].get(k)!r} there, {cfg.get(k)!r} now" for k in dict.fromkeys(
        keys) if saved["config"].get(k) != cfg.get(k)]
    if diff:
        raise ValueError(f"--resume: {ckpt} was written with other settings ({'; '.join(diff)}). "
                         "Resume with the checkpoint's settings, or pass --overwrite (or another "
                         "--out) to start again")


class Interrupted(Exception):
    """Ctrl-C during a run (run_cli prints it without a traceback, exit status 130)."""


def run_cli(main):
    """Run a command line's main(): bad input prints "error: <message>" and exits with status
    2, a non-finite loss with status 1; no traceback for either."""
    try:
        main()
    except (*USER_ERRORS, FloatingPointError, Interrupted) as e:
        where = f"[rank {rank()}] " if dist.is_initialized() else ""  # DDP: which process
        print(f"{where}{'' if isinstance(e, Interrupted) else 'error: '}{e}", file=sys.stderr)
        sys.exit({FloatingPointError: 1, Interrupted: 130}.get(type(e), 2))
    except KeyboardInterrupt:  # before the run's folder was set up: nothing to lose
        sys.exit(130)
    finally:  # DDP: leave the process group before exit (its threads must not outlive it)
        if dist.is_initialized():
            dist.destroy_process_group()
