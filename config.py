"""The run's configuration: the command line (--help explains every option), the layers it is
resolved from, and the checks that refuse, before any work, what cannot mean what the user
wants. train.py calls `resolve(parser.parse_args(argv), METHODS)`; the result is one flat dict,
printed at the start of the run and saved with its results and learned tensors.

The layers, each overriding the one before: RUN below; the method file's recipe (DEFAULTS, its
PROTOCOLS entry, CoOp's epochs_for); the toy run's (toy/world.py RECIPES, when dataset and
backbone are both toy: the default); a --load'ed run's settings; the command line.
"""
import argparse
import functools
import hashlib
import math
import os

import torch

import clip
import data
import runs
from runs import UsageError
from toy import world

# Run-level defaults. A key of a method's recipe that is not one of these is a model option.
RUN = dict(
    method="coop", dataset="toy", root="./data", backbone="ViT-B/16", shots=16, seed=1,
    protocol="base2new", lr=0.002, epochs=10, batch_size=32,
    print_freq=5,  # CoOp configs TRAIN.PRINT_FREQ (CoCoOp and MaPLe: 20)
    eval_batch_size=100,  # CoOp configs TEST.BATCH_SIZE
    workers=4 if torch.cuda.is_available() else 0,  # data-loading processes
    device="cuda" if torch.cuda.is_available() else "cpu",
    precision=None,  # None: amp on a GPU with bf16, else fp32
    out=None, eval_only=False, load=None, resume=False, overwrite=False, stop_after_epoch=None,
    checkpointing=False,
    eval_every=None)  # learning curves: evaluate both halves every N epochs (None: at the end)
# Above these, a typo, not a plan: each worker is a process, started at once; the papers train
# 2 to 200 epochs, and 2**64 epochs overflow the time estimates, 2**64 images a batch the loader
MAX_WORKERS, MAX_EPOCHS, MAX_BATCH = 256, 1_000_000, 1_000_000
MODEL_FLAGS = ("n_ctx", "ctx_init", "csc", "class_token_position", "prompt_depth",
               "finetune_part", "template", "ensemble")


# ---- the command line
def number(kind, low=0, high=None, also=(), what=None):
    """An argparse type: a number of `kind` greater than `low` (and below `high`), or one of
    `also` (e.g. -1 for all shots); `what` describes the valid values in the error."""
    def parse(text):
        what_is = what or f"must be greater than {low}"
        try:
            value = kind(text)
        except ValueError:  # argparse would say "invalid parse value"
            raise argparse.ArgumentTypeError(f"{what_is}, got {text!r} (not a "
                                             f"{'whole ' * (kind is int)}number)") from None
        if kind is float and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
        if value not in also and not (value > low and (high is None or value < high)):
            too_high = what is None and value > low
            raise argparse.ArgumentTypeError(
                f"{f'must be at most {high - 1:,}' if too_high else what_is}, got {text}")
        return value
    return parse


def template(text):
    """An argparse type: a prompt template, one {} for the class name (clip.check_template)."""
    try:
        return clip.check_template(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def words(text):
    """An argparse type: context words for --ctx-init (clip.check_words)."""
    try:
        return clip.check_words(text, "context words")
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _defaults(methods, key):
    """For --help: "coop 16, cocoop 4 ..." from the method files, other protocols in brackets."""
    return ", ".join(f"{m} {r.defaults[key]!r}" + "".join(
        f" ({p} {o[key]!r})" for p, o in r.protocols.items() if key in o)
        for m, r in methods.items() if key in r.defaults)


def make_parser(methods, description):
    """The command line of train.py; `methods`: train.METHODS (their recipes fill --help)."""
    parser = argparse.ArgumentParser(description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    d = functools.partial(_defaults, methods)  # "coop 16, cocoop 4 ..." for an option's help
    run = parser.add_argument_group("run").add_argument
    run("--method", choices=list(methods), help="what to run (default: coop)")
    run("--seed", type=number(int, -1, 2**32, what="a whole number from 0 to 2^32-1"),
        help="few-shot sample, initialisation, order (default: 1)")
    run("--out", help="output folder: new, empty or a run's own (default: out/DATASET/METHOD/"
        "BACKBONE_<shots>shots_PROTOCOL/seed<seed>; with --load: LOAD/eval_DATASET_PROTOCOL)")
    run("--eval-only", action="store_true", default=None, help="evaluate, do not train")
    run("--load", metavar="DIR", help="with --eval-only: a training run's output folder, whose "
        "method, backbone, method options and (without --dataset) dataset are used")
    run("--resume", action="store_true", default=None, help="continue an interrupted run from "
        "the checkpoint in --out (same result as an uninterrupted run)")
    run("--overwrite", action="store_true", default=None, help="replace the run already in "
        "--out, eval_* folders included")
    run("--device", help=f"cpu, cuda or cuda:N (default: {RUN['device']})")
    run("--precision", choices=["amp", "fp32", "fp16"], help="amp: bf16 autocast, fp32 weights "
        "(default on a GPU); fp32 (default on the CPU); fp16: the official pure fp16, known to "
        "give NaN losses")
    run("--workers", type=number(int, -1, MAX_WORKERS + 1, what=f"0 to {MAX_WORKERS}"),
        help=f"data-loading processes (default: {RUN['workers']})")
    run("--eval-every", type=number(int), metavar="N", help="evaluate both halves every N "
        "epochs too (and after the last): a learning curve, printed at the end and saved in "
        "results.json; each point costs one evaluation (default: off)")
    run("--checkpointing", action="store_true", default=None, help="recompute the text encoder "
        "in backward: bounded memory with many classes, ~1/3 more text compute")
    run("--stop-after-epoch", type=number(int), help=argparse.SUPPRESS)  # tests: interruptions
    dat = parser.add_argument_group("data").add_argument
    dat("--dataset", choices=list(data.DATASETS), metavar="DATASET",
        help=f"{', '.join(data.DATASETS)} (default: toy)")
    dat("--root", help="data root; for 'folder' the image folder itself (default: ./data)")
    dat("--shots", type=number(int, also=(-1,), what="a positive number of images per class, or "
                               "-1 for all of them"),
        help="training images per class, -1 all (default: 16)")
    dat("--protocol", choices=["base2new", "fewshot", "crossdataset"], help="base2new: train on "
        "the base classes, test base and new; fewshot: all classes; crossdataset: all classes "
        "with the method's transfer recipe, then --eval-only --load on other datasets (default: "
        "base2new)")
    dat("--backbone", help=f"{', '.join(clip.available_models())} or a checkpoint file "
        "(default: ViT-B/16; toy with the toy dataset)")
    opt = parser.add_argument_group("method (defaults: each method file's DEFAULTS; the toy run: "
                                    "toy/world.py RECIPES)").add_argument
    opt("--n-ctx", type=number(int), help=f"context tokens M ({d('n_ctx')})")
    opt("--ctx-init", type=words, help=f"initial context words: the first n_ctx tokens are "
        f"learned, the rest stay fixed ({d('ctx_init')}); '' for random N(0, 0.02)")
    opt("--csc", action="store_true", default=None, help="coop: class-specific context")
    opt("--class-token-position", choices=["end", "middle", "front"], help="coop (end)")
    opt("--prompt-depth", type=number(int), help=f"maple ({d('prompt_depth')})")
    opt("--finetune-part", help="finetune: all (default), image, or last:N (the image encoder's "
        "last N blocks and head)")
    opt("--template", type=template, help="zeroshot, finetune: e.g. 'a blurry photo of a {}.' "
        "(default: the dataset's, CoOp's CUSTOM_TEMPLATES)")
    opt("--ensemble", action="store_true", default=None, help="zeroshot: prompt ensembling over "
        "7 ImageNet templates and the dataset's")
    opt("--epochs", type=number(int, high=MAX_EPOCHS + 1), help=f"({d('epochs')}; coop by "
        "shots: 1 -> 50, 2-4 -> 100, 8-16 -> 200, ImageNet 50)")
    opt("--lr", type=number(float), help=f"SGD learning rate ({d('lr')})")
    opt("--batch-size", type=number(int, high=MAX_BATCH + 1), help=f"({d('batch_size')})")
    return parser


def resolve(args, methods):
    """The run's configuration, one flat dict: the layers of the module docstring, merged.
    `args`: make_parser's parsed command line; `methods`: train.METHODS."""
    given = {k: v for k, v in vars(args).items() if v is not None}  # set on the command line
    saved = {}
    if "load" in given:  # the training run's method, backbone, protocol and options
        cfg = check_saved(runs.read_run(given["load"])["config"], methods,
                          os.path.join(given["load"], "learned.pt"))
        saved = {k: cfg[k] for k in ("method", "backbone", "protocol", "dataset", "root",
                                     *cfg["model_options"]) if k in cfg}
        saved["backbone_id"] = cfg.get("backbone_id") or backbone_id(cfg["backbone"])
        if "dataset" in given:  # another dataset: its own root
            del saved["dataset"], saved["root"]
    method = given.get("method", saved.get("method", RUN["method"]))
    recipe = methods[method]
    protocol = given.get("protocol", saved.get("protocol", recipe.defaults.get(
        "protocol", RUN["protocol"])))
    shots = given.get("shots", RUN["shots"])
    dataset = given.get("dataset", saved.get("dataset", RUN["dataset"]))
    options = {**recipe.defaults, **recipe.protocols.get(protocol, {})}
    if recipe.epochs_for:  # CoOp: epochs by shot count, 50 on ImageNet
        options["epochs"] = recipe.epochs_for(shots, dataset)
    cfg = {**RUN, **options}
    if dataset == "toy" and given.get("backbone", "toy") == "toy" and not saved:
        cfg.update(world.RECIPES.get(method, {}), backbone="toy")  # the tiny model's settings
    cfg.update(saved)
    cfg.update(given, method=method, protocol=protocol)
    cfg["model_options"] = [k for k in options if k not in RUN]  # the model's constructor args
    cfg["world_size"] = int(os.environ.get("WORLD_SIZE", 1))  # processes: torchrun's, or 1
    check(cfg, given, saved, methods[method])
    cfg["backbone_id"] = saved.get("backbone_id") or backbone_id(cfg["backbone"])
    if cfg["precision"] is None:  # bf16 autocast needs no loss scaling (fp16 autocast would)
        cuda = cfg["device"].startswith("cuda")
        cfg["precision"] = "amp" if cuda and torch.cuda.is_bf16_supported() else "fp32"
    if cfg["out"] is None:
        cfg["out"] = os.path.join(cfg["load"], f"eval_{cfg['dataset']}_{protocol}") if \
            cfg["load"] else folder("out", cfg["dataset"], method, cfg["backbone"], cfg["shots"],
                                    protocol, cfg["seed"])
    return cfg


def check(cfg, given, saved, recipe):
    """Refuse what cannot mean what the user wants, before any work. `given`: the command
    line's settings; `saved`: a --load'ed run's; `recipe`: the method (train.Method)."""
    m = cfg["method"]
    if saved and m != saved["method"]:
        raise UsageError(f"--method {m}, but --load {cfg['load']} holds a {saved['method']} run: "
                         f"drop --method (or load a {m} run)")
    for key in MODEL_FLAGS:
        if key in given and key not in cfg["model_options"]:
            raise UsageError(f"--{key.replace('_', '-')} is not an option of --method {m}")
    learns = "lr" in recipe.defaults or hasattr(recipe.model, "fit")
    if not learns and {"epochs", "lr", "resume", "load"} & set(given):
        raise UsageError(f"--method {m} learns nothing: drop --epochs/--lr/--resume/--load")
    if learns and cfg["eval_only"] != bool(cfg["load"]):
        raise UsageError("--eval-only and --load DIR (a training run's output folder) go "
                         f"together for --method {m}")
    if saved and "backbone" in given and backbone_id(given["backbone"]) != saved["backbone_id"]:
        raise UsageError(f"--backbone {given['backbone']} is not the backbone {cfg['load']} was "
                         f"trained with ({saved['backbone']}): learned tensors work only with it")
    device = check_device(cfg["device"])
    if cfg["precision"] not in (None, "fp32") and device.type != "cuda":
        raise UsageError(f"--precision {cfg['precision']} needs a GPU; on the CPU use fp32")
    world_size = cfg["world_size"]
    if learns and not cfg["eval_only"] and cfg["batch_size"] % world_size:
        raise UsageError(f"--batch-size {cfg['batch_size']} is the global batch, split over "
                         f"{world_size} processes: pass a multiple of {world_size}, or run on "
                         "fewer processes")


def folder(root, dataset, method, backbone, shots, protocol, seed):
    """train.py's default output folder: ROOT/DATASET/METHOD/BACKBONE_<shots>shots_PROTOCOL/
    seed<seed>, with the backbone's name ('ViT-B-16') or its checkpoint's file or folder name."""
    bb = backbone.replace("/", "-") if backbone in clip.available_models() else \
        os.path.splitext(os.path.basename(os.path.normpath(backbone)))[0]
    return os.path.join(root, dataset, method, f"{bb}_{shots}shots_{protocol}", f"seed{seed}")


def check_saved(cfg, methods, source):
    """A saved run's configuration (learned.pt's, results.json's) as train.py and tools/ read it
    back: the run's strings and counts of their types, a method of `methods`, its model options
    those of the method's recipe, each of the recipe's type -> cfg; else UsageError naming
    `source`."""
    if not isinstance(cfg, dict):
        raise UsageError(f"{source} holds {str(cfg)[:40]} where train.py saves the run's "
                         "configuration; pass a training run's output folder")
    options = cfg.get("model_options")
    wrong = [k for k in ("method", "protocol", "backbone", "dataset", "root")
             if not isinstance(cfg.get(k), str)] + \
        [k for k in ("seed", "shots", "epochs", "eval_batch_size") if type(cfg.get(k)) is not int]
    if wrong or not (isinstance(options, list) and all(isinstance(k, str) and k in cfg
                                                       for k in options)):
        k = (wrong or ["model_options"])[0]
        raise UsageError(f"{source}: its configuration's {k} is {cfg.get(k, 'missing')!r:.40}; "
                         "pass a training run's output folder, or train again")
    recipe = methods.get(cfg["method"])
    if recipe is None:
        raise UsageError(f"{source} holds a run of the method {cfg['method']!r}, which this "
                         f"train.py does not have ({', '.join(methods)})")
    defaults = {**recipe.defaults, **recipe.protocols.get(cfg["protocol"], {})}
    wrong = [f"{k}={cfg[k]!r:.40}" for k in cfg["model_options"] if k not in defaults or (
        type(cfg[k]) not in (str, type(None)) if defaults[k] is None
        else type(cfg[k]) is not type(defaults[k]))]
    if wrong:
        raise UsageError(f"{source}: its model options {', '.join(wrong)} are not those of "
                         f"--method {cfg['method']}; pass a training run's output folder, or "
                         "train again")
    return cfg


def check_vocabulary(clip_model, backbone):
    """The prompts (train.py's and the tools') are tokenized with OpenAI's BPE: a CLIP with
    another vocabulary (a Hugging Face model's own) has no rows for their ids."""
    if clip_model.vocab_size != clip.tokenizer.EOT_TOKEN + 1:
        raise UsageError(f"--backbone {backbone} has a vocabulary of {clip_model.vocab_size:,} "
                         "tokens; the prompts are tokenized with OpenAI's BPE "
                         f"({clip.tokenizer.EOT_TOKEN + 1:,} tokens): pass a CLIP trained with "
                         "it")


def check_device(name):
    """--device `name` (train.py's and the tools'), a device of this machine -> torch.device;
    else UsageError."""
    try:
        device = torch.device(name)
    except RuntimeError:  # not a device string torch knows
        device = None
    gpus = torch.cuda.device_count()
    if device is None or device.type not in ("cpu", "cuda") or \
            device.type == "cuda" and (device.index or 0) >= gpus:
        raise UsageError(f"--device {name}: torch finds {gpus} GPU(s) here; use cpu"
                         f"{f' or cuda:0 .. cuda:{gpus - 1}' if gpus else ''}")
    return device


def backbone_id(backbone):
    """The backbone's identity: its name, or a fingerprint of its checkpoint's bytes (the size,
    the first and the last MiB), so a moved file is the same backbone and another is not."""
    if backbone in clip.available_models() or not os.path.isfile(backbone) and \
            not os.path.isdir(backbone):
        return backbone  # a name, or a path clip.load will report
    h = hashlib.sha256()
    try:
        for path in [backbone] if os.path.isfile(backbone) else sorted(
                e.path for e in os.scandir(backbone) if e.is_file()):
            with open(path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                h.update(str(size).encode() + f.read(1 << 20))
                f.seek(max(size - (1 << 20), 0))
                h.update(f.read())
    except OSError:  # unreadable: clip.load will say so
        return backbone
    return "sha256:" + h.hexdigest()[:16]
