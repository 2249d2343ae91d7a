"""Train and evaluate prompt learning on CLIP: zero-shot CLIP, CoOp, CoCoOp, MaPLe.

    python train.py                                    # CoOp on the toy world, CPU, ~1 minute
    python train.py --method zeroshot --dataset oxford_pets --root ~/data
    python train.py --method coop --dataset caltech101 --root ~/data --protocol fewshot --shots 16
    python train.py --method cocoop --dataset dtd --root ~/data          # base -> new
    python train.py --method maple --dataset eurosat --root ~/data --seed 2
    python train.py --eval-only --load out/imagenet/coop/ViT-B-16_16shots_fewshot/seed1 \\
        --dataset imagenet_sketch --root ~/data                        # domain generalisation

Protocols. base2new (CoCoOp/MaPLe papers): train on the first half of the classes, test on the
base and the new (unseen) half, report H = 2*base*new/(base+new). fewshot (CoOp paper): train
and test on all classes. One run = one seed; the papers average seeds 1, 2, 3.

Configuration, lowest to highest precedence: RUN below < the method file's DEFAULTS (plus its
BASE2NEW for --protocol base2new, and epochs_for(shots, dataset) where it has one) < TOY (only
for the toy run: dataset and backbone both toy, the default when neither is given) < the command
line. The resolved configuration is printed, and saved in results.json and with the prompts.
"""
import argparse
import contextlib
import datetime
import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

import clip
import cocoop
import coop
import data
import finetune
import linearprobe
import maple
import zeroshot

# name -> (method file, model class). Each method file has DEFAULTS and its model a
# .prompt_learner holding every trained parameter. "zeroshot" (zeroshot.py) trains nothing.
METHODS = {"coop": (coop, coop.CoOp), "cocoop": (cocoop, cocoop.CoCoOp),
           "maple": (maple, maple.MaPLe),
           # the baselines the notes argue against: full fine-tuning and the linear probe
           "finetune": (finetune, finetune.FineTune),
           "linearprobe": (linearprobe, linearprobe.LinearProbe)}

# ---------------------------------------------------------------------------------------------
# Run-level defaults. A key of a method's DEFAULTS that is not one of these is a model argument.
RUN = dict(
    method="coop", dataset="toy", root="./data", backbone="ViT-B/16", shots=16, seed=1,
    protocol="base2new", lr=0.002, epochs=10, batch_size=32,
    print_freq=5,  # CoOp configs TRAIN.PRINT_FREQ (CoCoOp and MaPLe: 20)
    eval_batch_size=100,  # CoOp configs TEST.BATCH_SIZE
    workers=4 if torch.cuda.is_available() else 0,  # data-loading processes
    device="cuda" if torch.cuda.is_available() else "cpu",
    precision=None,  # None: amp on a GPU with bf16, else fp32
    out=None, eval_only=False, load=None, resume=False, template=None, ensemble=False,
    stop_after_epoch=None, checkpointing=False,
)
# The toy run (dataset and backbone "toy", the default): the toy world and the built-in tiny
# CLIP (toy/), well under a minute on a laptop CPU. Only what the tiny model needs differs from
# the papers' settings (measured on the toy, see README "The toy world"):
TOY = {"coop": dict(epochs=50),  # 200 epochs of 6 classes x 16 shots are not needed to fit them
       "cocoop": dict(),  # the paper's: batch 1, 10 epochs, lr 0.002
       # the paper's depth 9 of 12 text layers is 3 of the toy's 4; depth 4 (every layer) lost
       # the new classes in 4 of 10 seeds, depth 3 in 1 (README, "The toy world")
       "maple": dict(prompt_depth=3, lr=0.002),
       "finetune": dict(epochs=50),  # long enough to see forgetting (10 epochs still help)
       "linearprobe": dict()}
MODEL_OPTIONS = ("n_ctx", "ctx_init", "csc", "class_token_position", "prompt_depth",
                 "finetune_part")
# Bad input: reported as "error: <message>", exit status 2, no traceback. Anything else is a bug.
USER_ERRORS = (data.DataError, clip.CheckpointError, clip.DownloadError, ValueError,
               FileNotFoundError)


def _method_defaults(key):
    return ", ".join(f"{m} {mod.DEFAULTS[key]!r}" for m, (mod, _) in METHODS.items()
                     if key in mod.DEFAULTS)


parser = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
g = parser.add_argument_group("run")
g.add_argument("--method", choices=["zeroshot", *METHODS],
               help=f"what to run (default: {RUN['method']})")
g.add_argument("--seed", type=int, help=f"few-shot sample, init, order (default: {RUN['seed']})")
g.add_argument("--out", help="output folder (default: out/DATASET/METHOD/BACKBONE_<shots>shots_"
               "PROTOCOL/seed<seed>; with --load: LOAD/eval_DATASET_PROTOCOL)")
g.add_argument("--eval-only", action="store_true", default=None, help="evaluate, do not train")
g.add_argument("--load", metavar="DIR", help="with --eval-only: a training run's output folder; "
               "its method, backbone and method options are used (cross-dataset: other --dataset)")
g.add_argument("--resume", action="store_true", default=None, help="continue an interrupted run "
               "from the checkpoint in --out (same result as an uninterrupted run)")
g.add_argument("--device", help=f"cpu or cuda (default: {RUN['device']})")
g.add_argument("--precision", choices=["amp", "fp32", "fp16"], help="amp: bf16 autocast with fp32 "
               "weights (default on a GPU with bf16); fp32 (default otherwise); fp16: the "
               "official pure fp16, known to give NaN losses")
g.add_argument("--workers", type=int, help=f"data-loading processes (default: {RUN['workers']})")
g.add_argument("--checkpointing", action="store_true", default=None, help="activation "
               "checkpointing in the text encoder: bounds its memory with many classes "
               "(ImageNet) for ~1/3 more text-encoder compute; same results")
g.add_argument("--stop-after-epoch", type=int, help=argparse.SUPPRESS)  # tests: an interruption
g = parser.add_argument_group("data")
g.add_argument("--dataset", help=f"{', '.join(data.DATASETS)} (default: toy)")
g.add_argument("--root", help=f"data root; for 'folder' the folder itself (default: {RUN['root']})")
g.add_argument("--shots", type=int, help=f"training images per class, -1 all (default: "
               f"{RUN['shots']})")
g.add_argument("--protocol", choices=["base2new", "fewshot"], help="base2new: train on the base "
               "classes, test base and new; fewshot: all classes (default: base2new)")
g.add_argument("--backbone", help=f"{', '.join(clip.available_models())} or a checkpoint file "
               f"(default: {RUN['backbone']}; toy with the toy dataset)")
g = parser.add_argument_group("method (defaults: each method file's DEFAULTS)")
g.add_argument("--n-ctx", type=int, help=f"context tokens M ({_method_defaults('n_ctx')}; "
               "coop base2new 4)")
g.add_argument("--ctx-init", help=f"initial context words ({_method_defaults('ctx_init')}; coop "
               "base2new 'a photo of a'); '' for random N(0, 0.02)")
g.add_argument("--csc", action="store_true", default=None, help="coop: class-specific context")
g.add_argument("--class-token-position", choices=["end", "middle", "front"], help="coop (end)")
g.add_argument("--prompt-depth", type=int, help=f"maple ({_method_defaults('prompt_depth')})")
g.add_argument("--finetune-part", help="finetune: all (the whole CLIP), image (the image encoder) "
               "or last:N (the last N image blocks and the head); default all")
g.add_argument("--epochs", type=int, help="coop: 50 for 1 shot and ImageNet, 100 for 2-4 shots, "
               f"200 for 8-16; {_method_defaults('epochs')}")
g.add_argument("--lr", type=float, help=f"SGD learning rate ({_method_defaults('lr')})")
g.add_argument("--batch-size", type=int, help=f"({_method_defaults('batch_size')})")
g.add_argument("--template", help="zeroshot: own template, e.g. 'a blurry photo of a {}.' "
               "(default: the dataset's, CoOp's CUSTOM_TEMPLATES)")
g.add_argument("--ensemble", action="store_true", default=None, help="zeroshot: average the "
               "features of 7 ImageNet templates and the dataset's (prompt ensembling)")


class Tee:
    """Everything printed goes to the terminal and to log.txt."""

    def __init__(self, *streams):
        self.streams = streams

    def write(self, s):
        for stream in self.streams:
            stream.write(s)
            stream.flush()

    def flush(self):
        for stream in self.streams:
            stream.flush()


def resolve_config(args):
    """Merge the configuration layers (module docstring) into one flat dict and check it."""
    given = {k: v for k, v in vars(args).items() if v is not None}  # set on the command line
    saved = {}
    if args.load:  # evaluating saved prompts: their method, backbone and model options
        path = os.path.join(args.load, "prompt_learner.pt")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"--load {args.load}: there is no prompt_learner.pt in it; "
                                    "pass the output folder of a finished training run")
        saved = torch.load(path, map_location="cpu", weights_only=True)["config"]
        saved = {k: saved[k] for k in ("method", "backbone", "protocol", *saved["model_options"])}
        if given.get("method", saved["method"]) != saved["method"]:
            raise ValueError(f"--method {args.method}, but {path} holds {saved['method']} prompts")
    method = given.get("method", saved.get("method", RUN["method"]))
    module = METHODS[method][0] if method in METHODS else None  # None: zeroshot
    # The linear probe is closed-set: only the all-class protocol (it says so otherwise).
    protocol = given.get("protocol", saved.get("protocol", "fewshot" if method == "linearprobe"
                                                   else RUN["protocol"]))
    if method == "linearprobe":
        linearprobe.check_protocol(protocol)
    defaults = dict(getattr(module, "DEFAULTS", {}))
    if protocol == "base2new":  # CoOp in the CoCoOp paper's base-to-new table: coop.BASE2NEW
        defaults.update(getattr(module, "BASE2NEW", {}))
    toy = given.get("dataset", "toy") == "toy" and given.get("backbone", "toy") == "toy"
    toy = toy and not saved
    cfg = {**RUN, **defaults}
    if hasattr(module, "epochs_for") and not toy:  # CoOp: epochs depend on the shot count
        cfg["epochs"] = module.epochs_for(given.get("shots", cfg["shots"]),
                                          given.get("dataset", cfg["dataset"]))
    if toy:
        cfg.update(TOY.get(method, {}), dataset="toy", backbone="toy")
    cfg.update(saved)
    cfg.update(given, method=method, protocol=protocol)
    cfg["model_options"] = [k for k in defaults if k not in RUN]  # constructor arguments
    for key in MODEL_OPTIONS:
        if key in given and key not in cfg["model_options"]:
            raise ValueError(f"--{key.replace('_', '-')} is not an option of --method {method}")
    if module is None and {"epochs", "lr", "resume", "load"} & set(given):
        raise ValueError("--method zeroshot trains nothing: drop --epochs/--lr/--resume/--load")
    if module and ("template" in given or "ensemble" in given):
        raise ValueError("--template and --ensemble are options of --method zeroshot")
    if "{}" not in (cfg["template"] or "{}"):
        raise ValueError(f"--template {cfg['template']!r} needs a {{}} for the class name")
    if module and cfg["eval_only"] != bool(cfg["load"]):
        raise ValueError("--eval-only and --load DIR (a training run's output folder) go "
                         f"together for --method {method}")
    cuda = cfg["device"].startswith("cuda")
    if cuda and not torch.cuda.is_available():
        raise ValueError(f"--device {cfg['device']}, but torch finds no CUDA GPU; use cpu")
    if cfg["precision"] is None:  # bf16 autocast needs no loss scaling (fp16 autocast would)
        cfg["precision"] = "amp" if cuda and torch.cuda.is_bf16_supported() else "fp32"
    if cfg["precision"] != "fp32" and not cuda:
        raise ValueError(f"--precision {cfg['precision']} needs a GPU; on the CPU use fp32")
    if cfg["out"] is None:
        bb = cfg["backbone"]
        bb = bb.replace("/", "-") if bb in clip.available_models() else \
            os.path.splitext(os.path.basename(bb))[0]
        run = f"{bb}_{cfg['shots']}shots_{protocol}"
        cfg["out"] = os.path.join(cfg["load"], f"eval_{cfg['dataset']}_{protocol}") if \
            cfg["load"] else os.path.join("out", cfg["dataset"], method, run, f"seed{cfg['seed']}")
    return cfg


def get_lr(epoch, lr, epochs, warmup_lr=1e-5):
    """Learning rate of `epoch` (0-based), constant within the epoch.

    What Dassl's scheduler stack does for the official configs (ConstantWarmupScheduler with
    WARMUP_EPOCH 1, WARMUP_CONS_LR 1e-5, WARMUP_RECOUNT True, around CosineAnnealingLR with
    T_max = epochs, stepped once per epoch): epoch 0 warms up at 1e-5, then the cosine starts
    at the full lr in epoch 1, one epoch late, so it never reaches 0. FACTS.md 3.6."""
    if epoch == 0:
        return warmup_lr
    return 0.5 * lr * (1 + math.cos(math.pi * (epoch - 1) / epochs))


def build_model(cfg, clip_model, ds, state=None):
    """The method's model for the classes of dataset `ds`; `state`: learned prompts to load."""
    if cfg["method"] == "zeroshot":
        template = cfg["template"] or ds.template  # CoOp's CUSTOM_TEMPLATES (data.DATASETS)
        # NOTE(official code): ZeroshotCLIP2 adds the dataset's template except for ImageNet.
        extra = [] if ds.name == "imagenet" and not cfg["template"] else [template]
        return zeroshot.ZeroShot(clip_model, ds.classnames, zeroshot.ENSEMBLE_TEMPLATES + extra
                                 if cfg["ensemble"] else [template])
    model_class = METHODS[cfg["method"]][1]
    options = {k: cfg[k] for k in cfg["model_options"]}
    if cfg["method"] == "finetune":  # start from exactly zero-shot CLIP's classifier
        options["template"] = ds.template
    model = model_class(clip_model, ds.classnames, **options)
    if state is not None:  # strict: a checkpoint holds exactly the learned tensors
        model.prompt_learner.load_state_dict(state)
    return model.to(cfg["device"])


@torch.no_grad()
def evaluate(model, loader, cfg, amp):
    """Top-1 accuracy in percent (Dassl's Classification evaluator)."""
    model.eval()
    text_features = None
    if hasattr(model, "text_features"):  # image-independent: once, not once per test batch
        with amp:
            text_features = model.text_features()  # (n_cls, E)
    correct = total = 0
    for images, labels in loader:
        images = images.to(cfg["device"])  # (B, 3, H, W)
        with amp:
            logits = model(images) if text_features is None else \
                model(images, text_features=text_features)  # (B, n_cls)
        correct += (logits.argmax(dim=-1).cpu() == labels).sum().item()
        total += len(labels)
    if total == 0:
        raise data.DataError("no readable test images: every one was skipped as unreadable")
    return 100.0 * correct / total


def train(model, loader, cfg, amp):
    """The loop: SGD on the trainable parameters, get_lr per epoch, cross-entropy, a resumable
    checkpoint after each epoch. Returns False when --stop-after-epoch stopped it early."""
    params = [p for p in model.parameters() if p.requires_grad]
    # Momentum 0.9 and weight decay 5e-4 are Dassl's defaults; no official config changes them.
    optimizer = torch.optim.SGD(params, lr=cfg["lr"], momentum=0.9, weight_decay=5e-4)
    ckpt_path, start = os.path.join(cfg["out"], "checkpoint.pt"), 0
    if cfg["resume"] and os.path.isfile(ckpt_path):
        ckpt = torch.load(ckpt_path, map_location=cfg["device"], weights_only=True)
        model.prompt_learner.load_state_dict(ckpt["prompt_learner"])
        optimizer.load_state_dict(ckpt["optimizer"])
        start = ckpt["epoch"]
        print(f"resumed from {ckpt_path} after epoch {start}")
    E, n, t0 = cfg["epochs"], len(loader), time.time()
    for epoch in range(start, E):
        # The randomness of an epoch (order, crops, flips) depends on (seed, epoch) only, so a
        # resumed run repeats exactly what the uninterrupted run did.
        torch.manual_seed(cfg["seed"] * 1000 + epoch)
        loader.generator.manual_seed(cfg["seed"] * 1000 + epoch)
        lr = get_lr(epoch, cfg["lr"], E)
        for group in optimizer.param_groups:
            group["lr"] = lr
        model.eval()  # NOTE(official code): frozen CLIP in eval mode, only the learner trains
        model.prompt_learner.train()
        for i, (images, labels) in enumerate(loader):
            images, labels = images.to(cfg["device"]), labels.to(cfg["device"])
            with amp:
                logits = model(images)  # (B, n_cls)
            loss = F.cross_entropy(logits.float(), labels)
            done = (epoch - start) * n + i + 1
            if (i + 1) % cfg["print_freq"] == 0 or n < cfg["print_freq"] or \
                    not torch.isfinite(loss):
                acc = 100.0 * (logits.argmax(dim=-1) == labels).float().mean().item()
                eta = (time.time() - t0) / done * ((E - start) * n - done)
                print(f"epoch [{epoch + 1}/{E}] batch [{i + 1}/{n}] loss {loss.item():.4f} "
                      f"acc {acc:.1f} lr {lr:.4e} eta {datetime.timedelta(seconds=round(eta))}")
            if not torch.isfinite(loss):  # as Dassl: stop, do not train on
                kept = f" {ckpt_path} still holds epoch {epoch} (--resume continues from " \
                    "it)." if epoch > 0 and os.path.isfile(ckpt_path) else ""
                fp32 = "" if cfg["precision"] == "fp32" else \
                    f" or --precision fp32 (now {cfg['precision']})"
                raise FloatingPointError(f"the loss is {loss.item()} at epoch {epoch + 1}/{E}, "
                                         f"batch {i + 1}/{n}. Try a lower --lr (now "
                                         f"{cfg['lr']}){fp32}.{kept}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        ckpt = dict(prompt_learner=model.prompt_learner.state_dict(),
                    optimizer=optimizer.state_dict(), epoch=epoch + 1, config=cfg)
        torch.save(ckpt, ckpt_path + ".tmp")
        os.replace(ckpt_path + ".tmp", ckpt_path)  # atomic: a kill never leaves half a file
        if epoch + 1 == cfg["stop_after_epoch"]:
            return False
    # The learned tensors only (ctx ...: kilobytes, no class-name buffers) and the configuration
    # that rebuilds the model, so --eval-only --load can use them for any classes.
    torch.save(dict(prompt_learner=model.prompt_learner.state_dict(), config=cfg),
               os.path.join(cfg["out"], "prompt_learner.pt"))
    return True


def main(argv=None):
    cfg = resolve_config(parser.parse_args(argv))
    os.makedirs(cfg["out"], exist_ok=True)
    log_file = open(os.path.join(cfg["out"], "log.txt"), "a" if cfg["resume"] else "w")
    with log_file, contextlib.redirect_stdout(Tee(sys.stdout, log_file)), \
            contextlib.redirect_stderr(Tee(sys.stderr, log_file)):
        print(" ".join(["python train.py", *(sys.argv[1:] if argv is None else argv)]),
              "config:", *(f"  {k}: {v}" for k, v in cfg.items()), sep="\n")
        # ---- data
        torch.manual_seed(cfg["seed"])  # the context initialisation
        ds = data.load(cfg["dataset"], cfg["root"], cfg["shots"], cfg["seed"])
        base, new = data.base_new(ds) if cfg["protocol"] == "base2new" else (ds, None)
        print("\n".join(str(d) for d in (base, new) if d))
        # ---- model
        clip_model, _ = clip.load(cfg["backbone"], cfg["device"],
                                  fp16=cfg["precision"] == "fp16")
        for block in clip_model.transformer.resblocks:  # opt-in, see clip/model.py
            block.checkpoint = cfg["checkpointing"]
        n_px = clip_model.visual.input_resolution
        state = torch.load(os.path.join(cfg["load"], "prompt_learner.pt"), map_location="cpu",
                           weights_only=True)["prompt_learner"] if cfg["load"] else None
        model = build_model(cfg, clip_model, base, state)
        trainable = print_trainable(model, cfg)
        amp = torch.autocast(torch.device(cfg["device"]).type, dtype=torch.bfloat16,
                             enabled=cfg["precision"] == "amp")
        # ---- train
        loaders, t0 = [], time.time()
        if trainable and not cfg["eval_only"]:
            loaders.append(data.make_loader(base.train, data.train_transform(n_px),
                                            cfg["batch_size"], True, cfg["workers"], cfg["seed"]))
            if not train(model, loaders[0], cfg, amp):
                print(f"stopped after epoch {cfg['stop_after_epoch']}; --resume continues")
                return None
        elif cfg["method"] == "linearprobe" and not cfg["eval_only"]:
            # No SGD loop: features of the shots once, then L-BFGS, C chosen on the val shots
            # (CoOp:lpclip uses no augmentation, hence the test transform).
            shots = [test_loader(base.train, cfg, n_px), test_loader(base.val, cfg, n_px)]
            loaders += shots
            with amp:
                C, val_acc = model.fit(*shots)  # (train loader, val loader)
            print(f"linear probe: C {C:.3g}, validation accuracy {val_acc:.1f}%")
            torch.save(dict(prompt_learner=model.prompt_learner.state_dict(), config=cfg),
                       os.path.join(cfg["out"], "prompt_learner.pt"))
        train_seconds = time.time() - t0
        # ---- evaluate: the last epoch's prompts (Dassl TEST.FINAL_MODEL "last_step")
        accuracy, learned = {}, model.prompt_learner.state_dict() if trainable else None
        for name, subset in (("base" if new else "all", base), ("new", new)):
            if subset:  # the "new" model: the same learned prompts, built for the new classes
                subset_model = model if subset is base else build_model(cfg, clip_model, subset,
                                                                        learned)
                loaders.append(test_loader(subset.test, cfg, n_px))
                accuracy[name] = evaluate(subset_model, loaders[-1], cfg, amp)
                print(f"* {name} accuracy: {accuracy[name]:.2f}%")
        if new:  # harmonic mean H = 2*B*N/(B+N)
            b, n = accuracy["base"], accuracy["new"]
            accuracy["hm"] = 2 * b * n / (b + n) if b + n else 0.0
        return save_results(cfg, accuracy, train_seconds, loaders)


def test_loader(items, cfg, n_px):
    """Batches of test-transformed (no augmentation) images, in order."""
    return data.make_loader(items, data.test_transform(n_px), cfg["eval_batch_size"], False,
                            cfg["workers"])


def print_trainable(model, cfg):
    """Print what will be trained (and n_ctx when ctx_init set it); -> [(name, parameter)]."""
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    names = [f"{k} {tuple(p.shape)}" for k, p in trainable]
    names = names if len(names) <= 12 else names[:6] + [f"... {len(names) - 6} more"]
    print("trainable parameters:", ", ".join(names),
          f"= {sum(p.numel() for _, p in trainable):,}")
    n_ctx = getattr(getattr(model, "prompt_learner", None), "n_ctx", cfg.get("n_ctx"))
    if n_ctx != cfg.get("n_ctx"):  # CoOp, CoCoOp: n_ctx = the length of ctx_init
        print(f"note: n_ctx is {n_ctx}, set by ctx_init {cfg['ctx_init']!r}")
    return trainable


def save_results(cfg, accuracy, train_seconds, loaders):
    """results.json in the output folder and the one-line summary; -> the results dict."""
    skipped = len(set().union(*(loader.skipped for loader in loaders)))
    results = {k: cfg[k] for k in ("method", "dataset", "backbone", "shots", "seed", "protocol")}
    results.update(accuracy=accuracy, train_seconds=round(train_seconds, 1),
                   skipped_images=skipped, config=cfg)
    with open(os.path.join(cfg["out"], "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    print(f"{cfg['method']} | {cfg['dataset']} | " +
          " ".join(f"{k} {v:.2f}" for k, v in accuracy.items()) +
          f" | train {train_seconds:.0f}s | skipped images {skipped} | {cfg['out']}")
    return results


def run_cli(main):
    """Run a command line's main() (train.py, tools/): bad input prints "error: <message>" and
    exits with status 2, a non-finite loss with status 1; no traceback for either."""
    try:
        main()
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except FloatingPointError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    run_cli(main)
