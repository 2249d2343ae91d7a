"""Train and evaluate zero-shot CLIP, CoOp, CoCoOp, MaPLe, and the baselines the notes argue
against (full fine-tuning, the linear probe). Examples (README.md has more):

    python train.py                                    # CoOp on the toy world, CPU, ~20 s
    python train.py --method cocoop --dataset dtd --root ~/data    # base -> new, ViT-B/16
    torchrun --nproc_per_node=4 train.py --method coop --dataset imagenet --root ~/data

Protocols: base2new (CoCoOp/MaPLe papers) trains on the first half of the classes and tests on
the base and the new (unseen) half, H = 2*base*new/(base+new); fewshot (CoOp paper) trains and
tests on all classes; crossdataset trains on all classes with the method's transfer recipe, for
--eval-only --load on other datasets. One run = one seed; the papers average seeds 1, 2, 3.

Configuration (resolve_config), each layer overriding the one before: RUN below; the method
file's recipe (DEFAULTS, its PROTOCOLS entry, CoOp's epochs_for); the toy run's (toy/world.py
RECIPES, when dataset and backbone are both toy: the default); a --load'ed run's method
settings; the command line. It is printed, and saved with the results and the learned tensors.
"""
import argparse
import datetime
import functools
import math
import os
import sys
import time
import types

import torch
import torch.distributed as dist
import torch.nn.functional as F

import clip
import cocoop
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
from toy import world

# name -> (method file, model class). A model's forward(images) gives logits (B, n_cls); what it
# learns is its state minus the frozen clip_model (learned_state).
METHODS = {"zeroshot": (zeroshot, zeroshot.ZeroShot), "coop": (coop, coop.CoOp),
           "cocoop": (cocoop, cocoop.CoCoOp), "maple": (maple, maple.MaPLe),
           "kgcoop": (kgcoop, kgcoop.KgCoOp), "promptsrc": (promptsrc, promptsrc.PromptSRC),
           "finetune": (finetune, finetune.FineTune),
           "linearprobe": (linearprobe, linearprobe.LinearProbe)}
METHODS.update({m: (types.SimpleNamespace(DEFAULTS=d), ivlp.IVLP)
                for m, d in ivlp.VARIANTS.items()})
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
    out=None, eval_only=False, load=None, resume=False, overwrite=False, stop_after_epoch=None,
    checkpointing=False)
MODEL_FLAGS = ("n_ctx", "ctx_init", "csc", "class_token_position", "prompt_depth",
               "finetune_part", "template", "ensemble")


def _defaults(key):
    """For --help: "coop 16, cocoop 4 ..." from the method files, other protocols in brackets."""
    return ", ".join(f"{m} {mod.DEFAULTS[key]!r}" + "".join(
        f" ({p} {o[key]!r})" for p, o in getattr(mod, "PROTOCOLS", {}).items() if key in o)
        for m, (mod, _) in METHODS.items() if key in mod.DEFAULTS)


parser = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
g = parser.add_argument_group("run")
g.add_argument("--method", choices=list(METHODS), help="what to run (default: coop)")
g.add_argument("--seed", type=int, help="few-shot sample, init, order (default: 1)")
g.add_argument("--out", help="output folder (default: out/DATASET/METHOD/BACKBONE_<shots>shots_"
               "PROTOCOL/seed<seed>; with --load: LOAD/eval_DATASET_PROTOCOL)")
g.add_argument("--eval-only", action="store_true", default=None, help="evaluate, do not train")
g.add_argument("--load", metavar="DIR", help="with --eval-only: a training run's output folder, "
               "whose method, backbone and method options are used (any --dataset)")
g.add_argument("--resume", action="store_true", default=None, help="continue an interrupted run "
               "from the checkpoint in --out (same result as an uninterrupted run)")
g.add_argument("--overwrite", action="store_true", default=None, help="replace the run already in "
               "--out (without it, a finished or interrupted run there is refused)")
g.add_argument("--device", help=f"cpu or cuda (default: {RUN['device']})")
g.add_argument("--precision", choices=["amp", "fp32", "fp16"], help="amp: bf16 autocast, fp32 "
               "weights (default on a GPU); fp32 (default on the CPU); fp16: the official pure "
               "fp16, known to give NaN losses")
g.add_argument("--workers", type=int, help=f"data-loading processes (default: {RUN['workers']})")
g.add_argument("--checkpointing", action="store_true", default=None, help="recompute the text "
               "encoder in backward: bounded memory with many classes, ~1/3 more text compute")
g.add_argument("--stop-after-epoch", type=int, help=argparse.SUPPRESS)  # tests: an interruption
g = parser.add_argument_group("data")
g.add_argument("--dataset", help=f"{', '.join(data.DATASETS)} (default: toy)")
g.add_argument("--root", help="data root; for 'folder' the folder itself (default: ./data)")
g.add_argument("--shots", type=runs.shots, help="training images per class, -1 all (default: 16)")
g.add_argument("--protocol", choices=["base2new", "fewshot", "crossdataset"], help="base2new: "
               "train on the base classes, test base and new; fewshot: all classes; "
               "crossdataset: all classes with the method's transfer recipe, then --eval-only "
               "--load on other datasets (default: base2new)")
g.add_argument("--backbone", help=f"{', '.join(clip.available_models())} or a checkpoint file "
               "(default: ViT-B/16; toy with the toy dataset)")
g = parser.add_argument_group("method (defaults: each method file's DEFAULTS; the toy run: "
                              "toy/world.py RECIPES)")
g.add_argument("--n-ctx", type=runs.positive(int), help=f"context tokens M "
               f"({_defaults('n_ctx')})")
g.add_argument("--ctx-init", help=f"initial context words ({_defaults('ctx_init')}); '' for "
               "random N(0, 0.02)")
g.add_argument("--csc", action="store_true", default=None, help="coop: class-specific context")
g.add_argument("--class-token-position", choices=["end", "middle", "front"], help="coop (end)")
g.add_argument("--prompt-depth", type=runs.positive(int), help=f"maple "
               f"({_defaults('prompt_depth')})")
g.add_argument("--finetune-part", help="finetune: all (default), image, or last:N (the image "
               "encoder's last N blocks and head)")
g.add_argument("--template", help="zeroshot, finetune: e.g. 'a blurry photo of a {}.' (default: "
               "the dataset's, CoOp's CUSTOM_TEMPLATES)")
g.add_argument("--ensemble", action="store_true", default=None, help="zeroshot: prompt "
               "ensembling over 7 ImageNet templates and the dataset's")
g.add_argument("--epochs", type=runs.positive(int), help=f"({_defaults('epochs')}; coop by "
               "shots: 1 -> 50, 2-4 -> 100, 8-16 -> 200, ImageNet 50)")
g.add_argument("--lr", type=runs.positive(float), help=f"SGD learning rate ({_defaults('lr')})")
g.add_argument("--batch-size", type=runs.positive(int), help=f"({_defaults('batch_size')})")


def resolve_config(args):
    """The run's configuration, one flat dict: the layers of the module docstring, merged."""
    given = {k: v for k, v in vars(args).items() if v is not None}  # set on the command line
    saved = runs.method_settings(given["load"]) if "load" in given else {}
    method = given.get("method", saved.get("method", RUN["method"]))
    module = METHODS[method][0]
    protocol = given.get("protocol", saved.get("protocol", module.DEFAULTS.get(
        "protocol", RUN["protocol"])))
    shots, dataset = given.get("shots", RUN["shots"]), given.get("dataset", RUN["dataset"])
    recipe = {**module.DEFAULTS, **getattr(module, "PROTOCOLS", {}).get(protocol, {})}
    if hasattr(module, "epochs_for"):  # CoOp: epochs by shot count, 50 on ImageNet
        recipe["epochs"] = module.epochs_for(shots, dataset)
    cfg = {**RUN, **recipe}
    if dataset == "toy" and given.get("backbone", "toy") == "toy" and not saved:
        cfg.update(world.RECIPES.get(method, {}), backbone="toy")  # the tiny model's settings
    cfg.update(saved)
    cfg.update(given, method=method, protocol=protocol)
    cfg["model_options"] = [k for k in recipe if k not in RUN]  # the model's constructor args
    cfg["world_size"] = int(os.environ.get("WORLD_SIZE", 1))  # processes: torchrun's, or 1
    runs.check_config(cfg, given, MODEL_FLAGS, module)
    if cfg["precision"] is None:  # bf16 autocast needs no loss scaling (fp16 autocast would)
        cuda = cfg["device"].startswith("cuda")
        cfg["precision"] = "amp" if cuda and torch.cuda.is_bf16_supported() else "fp32"
    if cfg["out"] is None:
        cfg["out"] = os.path.join(cfg["load"], f"eval_{cfg['dataset']}_{protocol}") if \
            cfg["load"] else runs.folder("out", cfg["dataset"], method, cfg["backbone"],
                                         cfg["shots"], protocol, cfg["seed"])
    return cfg


def get_lr(epoch, lr, epochs, warmup_lr=1e-5):
    """Learning rate of `epoch` (0-based), constant within the epoch: Dassl's scheduler stack for
    the official configs (a constant warm-up epoch at 1e-5, WARMUP_RECOUNT, around a cosine with
    T_max = epochs stepped per epoch; Dassl:dassl/optim/lr_scheduler.py). The cosine starts at
    the full lr in epoch 1, one epoch late, so it never reaches 0."""
    if epoch == 0:
        return warmup_lr
    return 0.5 * lr * (1 + math.cos(math.pi * (epoch - 1) / epochs))


def build_model(cfg, clip_model, ds, learned=None):
    """The method's model for the classes of dataset `ds`; `learned`: tensors to load."""
    options = {k: cfg[k] for k in cfg["model_options"]}
    if options.get("template", "") is None:  # zeroshot, finetune: the dataset's own template
        # NOTE(official code): zero-shot ensembling adds it to its 7, except on ImageNet.
        options["template"] = None if options.get("ensemble") and ds.name == "imagenet" \
            else ds.template
    try:
        model = METHODS[cfg["method"]][1](clip_model, ds.classnames, **options)
    except ValueError as e:  # an option that does not fit this model or class: name its flag
        flags = [f"--{k.replace('_', '-')}" for k in options if k in str(e) and k in MODEL_FLAGS]
        raise ValueError(f"{e} ({', '.join(flags)})" if flags else str(e)) from None
    model = model.to(cfg["device"])
    if learned is not None:
        runs.load_learned(model, learned)
    return model


@torch.no_grad()
def evaluate(model, loader, cfg, amp):
    """Top-1 accuracy in percent (Dassl's Classification evaluator)."""
    model.eval()
    with amp:  # image-independent class features: once, not once per test batch
        g = {"text_features": model.text_features()} if hasattr(model, "text_features") else {}
    correct = total = 0
    t0 = time.time()
    for i, (images, labels) in enumerate(loader):
        with amp:
            logits = model(images.to(cfg["device"]), **g)  # (B, 3, H, W) -> (B, n_cls)
        correct += (logits.argmax(dim=-1).cpu() == labels).sum().item()
        total += len(labels)
        runs.progress("evaluate", i, len(loader), total * cfg["world_size"], t0, cfg)
    if cfg["world_size"] > 1:  # DDP: each rank evaluated every world-th image; add them up
        counts = torch.tensor([correct, total], device=cfg["device"])
        dist.all_reduce(counts)
        correct, total = counts.tolist()
    if total == 0:
        raise data.DataError("no readable test images: every one was skipped as unreadable")
    return 100.0 * correct / total


def train(model, loader, cfg, amp):
    """SGD on the trainable parameters, get_lr per epoch, cross-entropy, a resumable checkpoint
    after each epoch. Returns False when --stop-after-epoch stopped it early."""
    params = [p for p in model.parameters() if p.requires_grad]
    # Momentum 0.9 and weight decay 5e-4 are Dassl's defaults; no official config changes them.
    optimizer = torch.optim.SGD(params, lr=cfg["lr"], momentum=0.9, weight_decay=5e-4)
    # DDP: each rank's share of the batch through the same model; backward averages the ranks'
    # gradients, which for equal shares is the gradient of the whole batch
    step_model = torch.nn.parallel.DistributedDataParallel(model) if cfg["world_size"] > 1 \
        else model
    ckpt_path = os.path.join(cfg["out"], "checkpoint.pt")
    start = runs.resume(ckpt_path, model, optimizer, cfg) if cfg["resume"] else 0
    E, n, t0 = cfg["epochs"], len(loader), time.time()
    for epoch in range(start, E):
        # The randomness of an epoch (order, crops, flips) depends on (seed, epoch) only, so a
        # resumed run repeats exactly what the uninterrupted run did.
        torch.manual_seed(cfg["seed"] * 1000 + epoch)
        loader.generator.manual_seed(cfg["seed"] * 1000 + epoch)  # the order of the images
        loader.dataset.seed = cfg["seed"] * 1000 + epoch  # and each image's augmentation
        lr = get_lr(epoch, cfg["lr"], E)
        for group in optimizer.param_groups:
            group["lr"] = lr
        step_model.train()  # NOTE(official code): each model keeps its frozen CLIP in eval mode
        for i, (images, labels) in enumerate(loader):
            images, labels = images.to(cfg["device"]), labels.to(cfg["device"])
            with amp:
                logits = step_model(images)  # (B, n_cls); DDP: (B / world_size, n_cls)
            loss = F.cross_entropy(logits.float(), labels)
            # the method's own loss terms for this batch (KgCoOp, PromptSRC), already weighted
            terms = model.loss_terms() if hasattr(model, "loss_terms") else {}
            loss = loss + sum(terms.values())
            if (i + 1) % cfg["print_freq"] == 0 or n < cfg["print_freq"] or \
                    not torch.isfinite(loss):
                acc = 100.0 * (logits.argmax(dim=-1) == labels).float().mean().item()
                done = (epoch - start) * n + i + 1
                eta = (time.time() - t0) / done * ((E - start) * n - done)
                print(f"epoch [{epoch + 1}/{E}] batch [{i + 1}/{n}] loss {loss.item():.4f} "
                      + "".join(f"{k} {v.item():.4f} " for k, v in terms.items()) +
                      f"acc {acc:.1f} lr {lr:.4e} eta {datetime.timedelta(seconds=round(eta))}")
            if not torch.isfinite(loss):  # as Dassl: stop, do not train on
                raise FloatingPointError(runs.non_finite(loss, epoch, i, n, cfg, ckpt_path))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        if hasattr(model, "end_epoch"):  # the method's end-of-epoch step (PromptSRC's GPA)
            model.end_epoch(epoch, E)
        if runs.rank() == 0:
            runs.save(ckpt_path, learned=runs.learned_state(model),
                      optimizer=optimizer.state_dict(), epoch=epoch + 1, config=cfg)
        if epoch + 1 == cfg["stop_after_epoch"]:
            return False
    return True


def main(argv=None):
    args = parser.parse_args(argv)
    cfg = resolve_config(args)
    runs.start_processes(cfg)  # DDP under torchrun: one process per GPU, or per CPU slot
    with runs.run_folder(cfg):  # rank 0 only: refuses to replace a run; log.txt; Ctrl-C
        print(" ".join(["python train.py", *(sys.argv[1:] if argv is None else argv)]),
              "config:", *(f"  {k}: {v}" for k, v in cfg.items()), sep="\n")
        # ---- data: the training classes first (base, or all), then the new half
        torch.manual_seed(cfg["seed"])  # the context initialisation
        ds = data.load(cfg["dataset"], cfg["root"], cfg["shots"], cfg["seed"])
        halves = data.halves(ds, cfg["protocol"])  # {"base": .., "new": ..} or {"all": ..}
        print(*halves.values(), f"few-shot images: {ds.source}", sep="\n")
        fits = hasattr(METHODS[cfg["method"]][1], "fit")  # the linear probe: val shots too
        runs.check_data(halves, train=not cfg["eval_only"] and cfg["method"] != "zeroshot",
                        val=fits)
        # ---- model: one per half, built now, so every class's prompt is checked before training
        clip_model, _ = clip.load(cfg["backbone"], cfg["device"], fp16=cfg["precision"] == "fp16")
        for block in clip_model.transformer.resblocks:  # opt-in, see clip/model.py
            block.checkpoint = cfg["checkpointing"]
        models = {k: build_model(cfg, clip_model, d) for k, d in halves.items()}
        model, shots = next(iter(models.values())), next(iter(halves.values()))
        loaded = runs.read(cfg["load"]) if cfg["load"] else {}
        runs.check_classes(model, cfg, halves, loaded.get("classnames"))
        runs.check_context_length(model, cfg, args.n_ctx)
        if loaded:  # --eval-only --load: the training run's learned tensors
            runs.load_learned(model, loaded["learned"])
        amp = torch.autocast(torch.device(cfg["device"]).type, dtype=torch.bfloat16,
                             enabled=cfg["precision"] == "amp")
        loader = functools.partial(data.make_loader, n_px=clip_model.visual.input_resolution,
                                   num_workers=cfg["workers"], rank=runs.rank(),
                                   world=cfg["world_size"])
        # ---- train, then evaluate the last epoch's model (Dassl TEST.FINAL_MODEL "last_step")
        t0 = time.time()
        loaders = [] if cfg["eval_only"] else learn(model, shots, loader, cfg, amp)
        if loaders is None:
            print(f"stopped after epoch {cfg['stop_after_epoch']}; --resume continues")
            return None
        train_seconds = time.time() - t0
        if loaders and runs.rank() == 0:  # what was learned, and how to rebuild its model
            runs.save(os.path.join(cfg["out"], "learned.pt"), learned=runs.learned_state(model),
                      config=cfg, classnames=shots.classnames)
        accuracy = {}
        for name, half in halves.items():
            runs.load_learned(models[name], runs.learned_state(model))  # the new half's too
            loaders.append(loader(half.test, batch_size=cfg["eval_batch_size"], train=False))
            accuracy[name] = evaluate(models[name], loaders[-1], cfg, amp)
            print(f"* {name} accuracy: {accuracy[name]:.2f}%")
        if "new" in accuracy:  # harmonic mean H = 2*B*N/(B+N)
            b, n = accuracy["base"], accuracy["new"]
            accuracy["hm"] = 2 * b * n / (b + n) if b + n else 0.0
        return runs.save_results(cfg, accuracy, train_seconds, loaders, ds.source)


def learn(model, shots, loader, cfg, amp):
    """Train on the training half's shots (`loader` makes data.make_loader's loaders); the linear
    probe: fit in closed form on un-augmented images. -> the loaders used, None when
    --stop-after-epoch stopped training early."""
    trainable = [(k, p) for k, p in model.named_parameters() if p.requires_grad]
    print("trainable parameters:", ", ".join(f"{k} {tuple(p.shape)}" for k, p in trainable[:8]),
          "..." * (len(trainable) > 8), f"= {sum(p.numel() for _, p in trainable):,}")
    if hasattr(model, "fit"):
        loaders = [loader(s, batch_size=cfg["eval_batch_size"], train=False)
                   for s in (shots.train, shots.val)]
        with amp:
            model.fit(*loaders)
        return loaders
    if not trainable:  # zero-shot CLIP: nothing to learn
        return []
    loaders = [loader(shots.train, batch_size=cfg["batch_size"], train=True, seed=cfg["seed"])]
    return loaders if train(model, loaders[0], cfg, amp) else None


if __name__ == "__main__":
    runs.run_cli(main)
