"""A run's folder and its command line: what train.py writes and tools/ read back.

    OUT/log.txt          everything the run printed, warnings included
    OUT/checkpoint.pt    after every epoch: {"learned", "optimizer", "epoch", "config"} (--resume)
    OUT/learned.pt       at the end: {"learned", "config"}, what the method learned and the
                         configuration that rebuilds its model (--eval-only --load, tools/)
    OUT/results.json     accuracies in percent, the configuration, the training time

What a method learned is its model's state minus the frozen CLIP (`learned_state`): CoOp's
context is kilobytes, fine-tuning's trained part is CLIP-sized. The class-name buffers of the
prompt learners are not saved (persistent=False), so the tensors fit a model built for other
classes (base -> new, cross-dataset).

Bad input, anywhere in train.py or tools/, ends with "error: <message>" and exit status 2,
without a traceback (`run_cli`).
"""
import contextlib
import json
import os
import sys

import torch

import clip
import data

# Bad input: reported as "error: <message>", exit status 2, no traceback. Anything else is a bug.
USER_ERRORS = (data.DataError, clip.CheckpointError, clip.DownloadError, ValueError,
               FileNotFoundError)


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


def save_results(cfg, accuracy, train_seconds, loaders):
    """results.json in the output folder and the one-line summary; -> the results dict."""
    skipped = len(set().union(*(loader.skipped for loader in loaders)))
    results = {k: cfg[k] for k in ("method", "dataset", "backbone", "shots", "seed", "protocol")}
    results.update(accuracy=accuracy, train_seconds=round(train_seconds, 1),
                   skipped_images=skipped, config=cfg)
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
def logged(out, append=False):
    """Everything printed (and warned) inside also goes to OUT/log.txt."""
    with open(os.path.join(out, "log.txt"), "a" if append else "w") as log, \
            contextlib.redirect_stdout(Tee([sys.stdout, log])), \
            contextlib.redirect_stderr(Tee([sys.stderr, log])):
        yield


def run_cli(main):
    """Run a command line's main(): bad input prints "error: <message>" and exits with status
    2, a non-finite loss with status 1; no traceback for either."""
    try:
        main()
    except (*USER_ERRORS, FloatingPointError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1 if isinstance(e, FloatingPointError) else 2)
