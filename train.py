"""Train and evaluate zero-shot CLIP, CoOp, CoCoOp, MaPLe and its ablations, and the baselines the
notes argue against (full fine-tuning, the linear probe). Examples (README.md has more):

    python train.py                                    # CoOp on the toy world, CPU, ~45 s
    python train.py --method cocoop --dataset dtd --root ~/data    # base -> new, ViT-B/16
    torchrun --nproc_per_node=4 train.py --method coop --dataset imagenet --root ~/data

Protocols: base2new (CoCoOp/MaPLe papers) trains on the first half of the classes and tests on
the base and the new (unseen) half, H = 2*base*new/(base+new); fewshot (CoOp paper) trains and
tests on all classes; crossdataset trains on all classes with the method's transfer recipe, for
--eval-only --load on other datasets. One run = one seed; the papers average seeds 1, 2, 3.

The procedure, in main(): configuration (config.py: the command line over the method file's
recipe), set-up (DDP, the output folder: runs.py), data (data.py), one model per class half, the
training loop (train), evaluation of each half (evaluate), results.
"""
import datetime
import math
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

import clip
import cocoop
import config
import coop
import data
import finetune
import ivlp
import kgcoop
import linearprobe
import maple
import promptsrc
import runs
import zeroshot
from runs import UsageError


@dataclass(frozen=True)
class Method:
    """A method as train.py runs it: its model class and its file's recipe."""
    model: type  # obeys the model contract below
    defaults: dict  # the file's DEFAULTS: run settings (lr, epochs, ...) and model options
    protocols: dict = field(default_factory=dict)  # the file's PROTOCOLS: changes per protocol
    epochs_for: Optional[Callable] = None  # CoOp: epochs by shot count and dataset


METHODS = {
    "zeroshot": Method(zeroshot.ZeroShot, zeroshot.DEFAULTS),
    "coop": Method(coop.CoOp, coop.DEFAULTS, coop.PROTOCOLS, coop.epochs_for),
    "cocoop": Method(cocoop.CoCoOp, cocoop.DEFAULTS),
    "maple": Method(maple.MaPLe, maple.DEFAULTS, maple.PROTOCOLS),
    "kgcoop": Method(kgcoop.KgCoOp, kgcoop.DEFAULTS, kgcoop.PROTOCOLS),
    "promptsrc": Method(promptsrc.PromptSRC, promptsrc.DEFAULTS, promptsrc.PROTOCOLS),
    **{name: Method(ivlp.IVLP, recipe) for name, recipe in ivlp.VARIANTS.items()},
    "finetune": Method(finetune.FineTune, finetune.DEFAULTS),
    "linearprobe": Method(linearprobe.LinearProbe, linearprobe.DEFAULTS),
}
# The model contract: every model class above obeys it (tests/test_contract.py checks each), and
# train.py uses these names only.
#   Model(clip_model, classnames, **options)   options: the recipe's keys that RUN lacks
#   model.clip_model      the frozen CLIP; the rest of model.state_dict() is what the method
#                         learned (checkpoint.pt, learned.pt)
#   model.per_class       True when a learned tensor has one row per training class: it fits
#                         those classes only (refused for base2new and for other classes)
#   model(images) -> logits (B, n_cls)
# and where the method needs them:
#   model.text_features() -> (n_cls, E)   image-independent class features: evaluation computes
#                         them once and passes them to every model(images, text_features)
#   model.fit(train_loader, val_loader)   closed-form training instead of the SGD loop
#   model.loss_terms() -> {name: scalar}  the method's own loss terms for the last training
#                         forward, added to the cross-entropy
#   model.end_epoch(epoch, epochs)        after each training epoch, before the checkpoint
parser = config.make_parser(METHODS, __doc__)


def get_lr(epoch, lr, epochs, warmup_lr=1e-5):
    """Learning rate of `epoch` (0-based), constant within the epoch: Dassl's scheduler stack for
    the official configs (a constant warm-up epoch at 1e-5, WARMUP_RECOUNT, around a cosine with
    T_max = epochs stepped per epoch; Dassl:dassl/optim/lr_scheduler.py). The cosine starts at
    the full lr in epoch 1, one epoch late, so it never reaches 0."""
    if epoch == 0:
        return warmup_lr
    return 0.5 * lr * (1 + math.cos(math.pi * (epoch - 1) / epochs))


def build_model(cfg, clip_model, ds):
    """The method's model for the classes of dataset `ds`, on cfg["device"]."""
    options = {k: cfg[k] for k in cfg["model_options"]}
    if options.get("template", "") is None:  # zeroshot, finetune: the dataset's own template
        # NOTE(official code): zero-shot ensembling adds it to its 7, except on ImageNet.
        options["template"] = None if options.get("ensemble") and ds.name == "imagenet" \
            else ds.template
    try:
        model = METHODS[cfg["method"]].model(clip_model, ds.classnames, **options)
    except ValueError as e:  # an option that does not fit this model or a class: name its flag
        flags = [f"--{k.replace('_', '-')}" for k in config.MODEL_FLAGS
                 if k in options and k in str(e)]
        raise UsageError(f"{e} ({', '.join(flags)})" if flags else str(e)) from None
    return model.to(cfg["device"])


@torch.no_grad()
def evaluate(model, loader, cfg, amp):
    """Top-1 accuracy in percent (Dassl's Classification evaluator)."""
    model.eval()
    with amp:  # image-independent class features: once, not once per test batch
        kwargs = {"text_features": model.text_features()} if hasattr(model, "text_features") \
            else {}
    correct = total = 0
    for images, labels in loader:
        with amp:
            logits = model(images.to(cfg["device"]), **kwargs)  # (B, 3, H, W) -> (B, n_cls)
        correct += (logits.argmax(dim=-1).cpu() == labels).sum().item()
        total += len(labels)
    if cfg["world_size"] > 1:  # DDP: each rank evaluated every world-th image; add them up
        counts = torch.tensor([correct, total], device=cfg["device"])
        dist.all_reduce(counts)
        correct, total = counts.tolist()
    if total == 0:
        raise data.DataError("no readable test images: every one was skipped as unreadable")
    return 100.0 * correct / total


def train(model, loader, cfg, amp, evaluate_now=None):
    """SGD on the trainable parameters, get_lr per epoch, cross-entropy plus the model's own
    loss terms, a resumable checkpoint after each epoch; every cfg["eval_every"] epochs a point
    of the learning curve, evaluate_now()'s accuracies. -> (epochs completed, the curve)."""
    params = [p for p in model.parameters() if p.requires_grad]
    # Momentum 0.9 and weight decay 5e-4 are Dassl's defaults; no official config changes them.
    optimizer = torch.optim.SGD(params, lr=cfg["lr"], momentum=0.9, weight_decay=5e-4)
    # DDP: each rank's share of the batch through the same model; backward averages the ranks'
    # gradients, which for equal shares is the gradient of the whole batch
    step_model = torch.nn.parallel.DistributedDataParallel(model) if cfg["world_size"] > 1 \
        else model
    ckpt_path, epochs = os.path.join(cfg["out"], "checkpoint.pt"), cfg["epochs"]
    # the epochs done and the learning curve so far: [{"epoch", "base", "new", "hm", "seconds"}]
    start, curve = resume(ckpt_path, model, optimizer) if cfg["resume"] else (0, [])
    last = min(epochs, cfg["stop_after_epoch"] or epochs)  # --stop-after-epoch: tests
    n, t0 = len(loader), time.time()
    for epoch in range(start, last):
        # An epoch's randomness depends on (seed, epoch) only, so a resumed run repeats exactly
        # what the uninterrupted run did: the image order and each image's crop and flip ...
        loader.set_epoch(cfg["seed"], epoch)
        torch.manual_seed(cfg["seed"] * 1000 + epoch)  # ... and whatever a model draws (dropout)
        lr = get_lr(epoch, cfg["lr"], epochs)
        for group in optimizer.param_groups:
            group["lr"] = lr
        step_model.train()  # NOTE(official code): each model keeps its frozen CLIP in eval mode
        for i, (images, labels) in enumerate(loader):
            images, labels = images.to(cfg["device"]), labels.to(cfg["device"])
            with amp:
                logits = step_model(images)  # (B, n_cls); DDP: (B / world_size, n_cls)
            terms = model.loss_terms() if hasattr(model, "loss_terms") else {}
            loss = F.cross_entropy(logits.float(), labels) + sum(terms.values())
            if (i + 1) % cfg["print_freq"] == 0 or n < cfg["print_freq"] or \
                    not torch.isfinite(loss):
                acc = 100.0 * (logits.argmax(dim=-1) == labels).float().mean().item()
                done = (epoch - start) * n + i + 1
                eta = (time.time() - t0) / done * ((epochs - start) * n - done)
                print(f"epoch [{epoch + 1}/{epochs}] batch [{i + 1}/{n}] loss {loss.item():.4f} "
                      + "".join(f"{k} {v.item():.4f} " for k, v in terms.items()) +
                      f"acc {acc:.1f} lr {lr:.4e} eta {datetime.timedelta(seconds=round(eta))}")
            if not torch.isfinite(loss):  # as Dassl: stop, do not train on
                raise FloatingPointError(
                    f"the loss is {loss.item()} at epoch {epoch + 1}/{epochs}, batch {i + 1}/{n}:"
                    f" start again with --overwrite and a lower --lr (now {cfg['lr']})" +
                    (" or --precision fp32" if cfg["precision"] != "fp32" else ""))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        if hasattr(model, "end_epoch"):
            model.end_epoch(epoch, epochs)
        if evaluate_now and cfg["eval_every"] and ((epoch + 1) % cfg["eval_every"] == 0 or
                                                   epoch + 1 == epochs):
            t = time.time()  # a learning-curve point: the seeds above keep it out of training
            curve.append({"epoch": epoch + 1, **evaluate_now(),
                          "seconds": round(time.time() - t, 2)})
        if runs.rank() == 0:
            runs.save(ckpt_path, learned=runs.learned_state(model),
                      optimizer=optimizer.state_dict(), epoch=epoch + 1, config=cfg, curve=curve)
    return max(start, last), curve


def resume(ckpt_path, model, optimizer):
    """Load an interrupted run's checkpoint (its settings were checked by runs.prepare) into
    `model` and `optimizer` -> (the epochs it completed, its learning curve)."""
    ckpt = runs.read(ckpt_path, keys=("learned", "config", "optimizer", "epoch"))
    runs.load_learned(model, ckpt["learned"], ckpt_path)
    try:
        optimizer.load_state_dict(ckpt["optimizer"])
    except (ValueError, KeyError, TypeError, RuntimeError) as e:  # another run's optimiser
        raise UsageError(f"{ckpt_path}: its optimizer state does not fit this run ({e}); start "
                         "again with --overwrite") from None
    print(f"resumed from {ckpt_path} after epoch {ckpt['epoch']}")
    return ckpt["epoch"], ckpt.get("curve", [])


def build_models(cfg, halves):
    """The frozen CLIP and one model per class half on it (a --load'ed run's learned tensors in
    the first); every class's prompt is built, so checked, before any training."""
    torch.manual_seed(cfg["seed"])  # the global generator: the prompts' initialisation
    clip_model, _ = clip.load(cfg["backbone"], cfg["device"], fp16=cfg["precision"] == "fp16")
    config.check_vocabulary(clip_model, cfg["backbone"])  # the prompts' ids must fit
    for block in clip_model.transformer.resblocks:  # opt-in, see clip/model.py
        block.checkpoint = cfg["checkpointing"]
    models = {name: build_model(cfg, clip_model, half) for name, half in halves.items()}
    first = next(iter(models.values()))
    saved = runs.read_run(cfg["load"]) if cfg["load"] else None
    check_classes(first, cfg, halves, saved and saved["classnames"])
    if saved:  # --eval-only --load: the training run's learned tensors
        runs.load_learned(first, saved["learned"], cfg["load"])
    return clip_model, models


def evaluate_halves(model, models, loaders, cfg, amp):
    """The accuracy of each half's model with `model`'s learned tensors (base2new: the new
    half's model gets the base half's prompts), and H = 2*B*N/(B+N)."""
    accuracy = {}
    for name, half_model in models.items():
        runs.load_learned(half_model, runs.learned_state(model), "the trained model")
        accuracy[name] = evaluate(half_model, loaders[name], cfg, amp)
    if "new" in accuracy:  # harmonic mean
        b, n = accuracy["base"], accuracy["new"]
        accuracy["hm"] = 2 * b * n / (b + n) if b + n else 0.0
    return accuracy


def main(argv=None):
    cfg = config.resolve(parser.parse_args(argv), METHODS)
    # ---- set-up: DDP under torchrun (one process per GPU, or per CPU slot), the output folder
    if cfg["world_size"] > 1:
        cuda = cfg["device"].startswith("cuda")
        dist.init_process_group("nccl" if cuda else "gloo")
        if cuda:
            cfg["device"] = f"cuda:{os.environ['LOCAL_RANK']}"
            torch.cuda.set_device(cfg["device"])
    command = " ".join([runs.COMMAND, *(sys.argv[1:] if argv is None else argv)])
    with runs.run_folder(cfg, command):  # rank 0: refuses what is not its to replace; log.txt
        print("config:", *(f"  {k}: {v}" for k, v in cfg.items()), sep="\n")
        if cfg["load"] and cfg["dataset"] == runs.read_run(cfg["load"])["config"]["dataset"]:
            print(f"evaluating on {cfg['dataset']}, the dataset of --load {cfg['load']} "
                  "(--dataset for another)")
        # ---- data: the training classes first (base, or all), then the new half
        ds = data.load(cfg["dataset"], cfg["root"], cfg["shots"], cfg["seed"])
        halves = data.halves(ds, cfg["protocol"])  # {"base": .., "new": ..} or {"all": ..}
        trained = next(iter(halves.values()))  # the half the method learns from
        print(*halves.values(), f"few-shot images: {ds.source}", sep="\n")
        recipe = METHODS[cfg["method"]]
        fits, sgd = hasattr(recipe.model, "fit"), "lr" in recipe.defaults  # closed form, SGD
        learns = (fits or sgd) and not cfg["eval_only"]
        data.check(halves, train=learns, val=fits)
        # ---- model: one per half, built now, so that every class's prompt is checked
        clip_model, models = build_models(cfg, halves)
        model = next(iter(models.values()))  # the one that learns: the first half's
        runs.replace_run(cfg)  # --overwrite: every check has passed, the old run goes now
        amp = torch.autocast(torch.device(cfg["device"]).type, dtype=torch.bfloat16,
                             enabled=cfg["precision"] == "amp")

        def loader(items, batch_size, train):
            return data.make_loader(items, clip_model.visual.input_resolution, batch_size, train,
                                    cfg["workers"], runs.rank(), cfg["world_size"],
                                    cfg["print_freq"])
        # ---- train, then evaluate the last epoch's model (Dassl TEST.FINAL_MODEL "last_step")
        trainable = [(k, p) for k, p in model.named_parameters() if p.requires_grad]
        print("trainable parameters:", ", ".join(f"{k} {tuple(p.shape)}" for k, p in
              trainable[:8]), "..." * (len(trainable) > 8),
              f"= {sum(p.numel() for _, p in trainable):,}")
        tests = {name: loader(half.test, cfg["eval_batch_size"], train=False)
                 for name, half in halves.items()}
        loaders, curve, t0 = list(tests.values()), [], time.time()
        if learns and fits:  # closed form, on un-augmented images (lpclip)
            loaders += [loader(trained.train, cfg["eval_batch_size"], train=False),
                        loader(trained.val, cfg["eval_batch_size"], train=False)]
            with amp:
                model.fit(*loaders[-2:])
        elif learns:
            loaders.append(loader(trained.train, cfg["batch_size"], train=True))
            done, curve = train(model, loaders[-1], cfg, amp,
                                lambda: evaluate_halves(model, models, tests, cfg, amp))
            if done < cfg["epochs"]:  # --stop-after-epoch
                print(f"stopped after epoch {done}; --resume continues")
                return None
        train_seconds = time.time() - t0
        if learns and runs.rank() == 0:  # what was learned, and how to rebuild its model
            runs.save(os.path.join(cfg["out"], "learned.pt"), learned=runs.learned_state(model),
                      config=cfg, classnames=trained.classnames)
        accuracy = evaluate_halves(model, models, tests, cfg, amp)
        print(*(f"* {name} accuracy: {a:.2f}%" for name, a in accuracy.items()), sep="\n")
        return report(cfg, accuracy, curve, train_seconds, loaders, ds.source)


def report(cfg, accuracy, curve, train_seconds, loaders, fewshot_source):
    """results.json and the summary line (rank 0 writes); -> the results dict."""
    skipped = sorted(set().union(*(ld.skipped for ld in loaders)))
    results = {k: cfg[k] for k in ("method", "dataset", "backbone", "shots", "seed", "protocol")}
    results.update(accuracy=accuracy, train_seconds=round(train_seconds, 1),
                   skipped_images=len(skipped), fewshot_source=fewshot_source, config=cfg)
    if curve:  # --eval-every: the learning curve, and what its evaluations cost
        results["curve"] = curve
        print("learning curve (accuracy % after the epoch):", *(
            f"epoch {p['epoch']}: " + " ".join(f"{k} {p[k]:.1f}" for k in accuracy) +
            f" ({p['seconds']:.1f} s to evaluate)" for p in curve), sep="\n  ")
    if runs.rank() == 0:
        runs.save_json(os.path.join(cfg["out"], "results.json"), results)
    print(f"{cfg['method']} | {cfg['dataset']} | " + " ".join(
        f"{k} {v:.2f}" for k, v in accuracy.items()) + f" | train {train_seconds:.0f}s | "
        f"skipped images {len(skipped)} | {cfg['out']}")
    return results


def check_classes(model, cfg, halves, learned_for):
    """Learned tensors with one row per training class (model.per_class) fit only those
    classes: refuse the new half (base2new), or other classes than a --load'ed run learned."""
    names = next(iter(halves.values())).classnames
    why = f"--method {cfg['method']}{' --csc' * bool(cfg.get('csc'))} learns one tensor per " \
        "training class, which fits only those classes"
    if model.per_class and "new" in halves:
        raise UsageError(f"{why}: use --protocol fewshot (all classes)")
    if model.per_class and learned_for is not None and list(learned_for) != names:
        raise UsageError(f"--load {cfg['load']}: {why}. It learned {len(learned_for)} classes "
                         f"({', '.join(learned_for[:3])}, ...), not the {len(names)} of --dataset "
                         f"{cfg['dataset']}: evaluate it on the classes it learned")


if __name__ == "__main__":
    runs.run_cli(main)
