"""The command-line fuzz's generator (tests/fuzz.py runs what it draws): for train.py and each
tool, a valid base command on the tiny fixtures of fuzz_world.py, then options of the script's
own parser (parser._actions: a new flag is drawn without a change here) with values of the kind
its type or name says: valid, boundary (0, -1, 2**31, 2**64, 1e308, nan, inf, -0), of the
wrong type ("abc", "", "1.5"), absurd (5,000 characters, unicode, "{}", "{x}", a file where a
folder is expected and the reverse, /dev/null, /proc/..., a damaged learned.pt, checkpoint.pt,
results.json, split JSON or few-shot cache); sometimes a conflicting pair of options.
Everything a vector may write is its own copy, in its scratch folder.
"""
import contextlib
import inspect
import io
import os

import config
import data
import train
from tools import (conditioning, distortion, interpret, predict, reproduce, summarise,
                   templates, toy_check)
import fuzz_world
from fuzz_world import PT_DAMAGES, RESULTS_DAMAGES, SPLIT_DAMAGES, damage

TARGETS = {"train": train, "predict": predict, "interpret": interpret, "summarise": summarise,
           "reproduce": reproduce, "templates": templates, "toy_check": toy_check,
           "distortion": distortion, "conditioning": conditioning}
WEIGHTS = {"train": 60, "predict": 12, "interpret": 8, "summarise": 7, "reproduce": 6,
           "templates": 5, "toy_check": 2, "distortion": 4, "conditioning": 3}
INTS = ["0", "-1", "-2", "2147483648", "4294967295", "4294967296", "18446744073709551616",
        "abc", "", "1.5", "1e3", "0x10", "+1", "-0", " 7", "٣", "1_0"]
FLOATS = ["0", "-0", "-0.0", "1e308", "1e309", "nan", "inf", "-inf", "abc", "", "5e-324",
          "0x1p-3", "1e-5", "٣"]
VALID = {"seed": [0, 1, 2, 4294967295], "shots": [1, 2, -1], "epochs": [1, 2],
         "batch_size": [1, 2, 4, 32], "n_ctx": [1, 2, 4, 16], "prompt_depth": [1, 2, 9, 12],
         "workers": [0, 1], "stop_after_epoch": [1], "topk": [1, 3], "max_classes": [1, 3],
         "seeds": [1, 2], "lr": [0.002, 1e-5, 0.5], "eval_batch_size": [2, 100]}
TEXT = ["", " ", "a", "{}", "{x}", "{0}", "{", "}", "%s %d", "x" * 5000, "猫 🐱 ü", "\t\n",
        "-x", "--", "<|endoftext|>", "a_b_c d", ",", "cat,cat", "a photo of a",
        "X " * 100, "last:1", "last:0", "last:-1", "last:²", "last:99999999999999999999",
        "image", "all", "outline,sketch", "cat,dog,red fox", "\u202eevil"]
TEMPLATES = ["a photo of a {}.", "{} texture.", "{}", "", "no braces", "{}{}", "{x}", "{0}",
             "{", "}", "{{}}", "%s", "a " * 100 + "{}", "一张{}的照片", "a {} {"]
DEVICES = ["cpu", "cuda", "cuda:0", "cuda:1", "cuda:-1", "cpu:0", "cpu:-1", "meta", "mps",
           "xla", "abc", "", "CPU", "cuda:99999999999999999999", " cpu"]
HINTS = {"out": "out", "load": "run", "prompts": "run", "runs": "run", "folder": "runs",
         "root": "root", "json": "file_out", "plot": "file_out",
         "backbone": "backbone", "classes_file": "text_file", "words": "text_file",
         "templates": "text_file", "images": "images", "device": "device", "method": "method",
         "dataset": "dataset", "datasets": "dataset", "methods": "method"}
PAIRS = {  # conflicting options; {run}: a copy of a run, {bb}: another backbone, {fruit}: other
    # classes, {classes}: a class-names file
    "train": [["--eval-only"], ["--load", "{run}"], ["--resume", "--overwrite"],
              ["--eval-only", "--load", "{run}", "--method", "cocoop"],
              ["--csc", "--protocol", "base2new"], ["--eval-only", "--load", "{run}", "--resume"],
              ["--template", "a {}.", "--method", "coop"], ["--prompt-depth", "2"],
              ["--precision", "fp16"], ["--eval-only", "--load", "{run}", "--backbone", "{bb}"],
              ["--eval-only", "--load", "{run}", "--dataset", "folder", "--root", "{fruit}"],
              ["--method", "zeroshot", "--epochs", "2"], ["--ensemble", "--method", "coop"],
              ["--n-ctx", "8", "--ctx-init", "a photo"], ["--eval-only", "--load", "{run}",
                                                          "--csc"]],
    "predict": [["--classes", "a,b", "--classes-file", "{classes}"], ["--method", "coop"],
                ["--template", "a {}.", "--load", "{run}"], ["--subset", "new"],
                ["--method", "zeroshot", "--load", "{run}"]],
}
LEARNED = ["coop_fewshot", "coop_b2n", "coop_csc", "cocoop_b2n", "maple_b2n", "linearprobe"]


class Draw:
    """One vector's drawing: its random generator, the world, its scratch folder."""

    def __init__(self, rng, world, scratch, target):
        self.rng, self.world, self.scratch, self.target = rng, world, scratch, target
        self.notes, self.made = [], 0

    def choice(self, seq):
        return self.rng.choice(seq)

    def pick(self, *options):
        """One of `options`; a callable one is called only when picked (it may write files)."""
        x = self.rng.choice(options)
        return x() if callable(x) else x

    def new_path(self, name="new"):
        self.made += 1  # a new name every time: copies are never shared within a vector
        return os.path.join(self.scratch, f"{name}{self.made}")

    def run(self, which=None, intact=False):
        """A copy of a fixture run folder, its learned.pt damaged one time in four."""
        which = which or self.choice(LEARNED + ["zeroshot_b2n", "interrupted"])
        path = self.world.copy(which, self.scratch, os.path.basename(self.new_path(which)))
        learned = os.path.join(path, "learned.pt")
        if os.path.isfile(learned) and self.rng.random() < 0.25 and not intact:
            self.notes.append(f"learned.pt of {which}: {damage(learned, PT_DAMAGES, self.rng)}")
        return path

    def absurd_path(self):
        w = self.world
        return self.pick(
            lambda: self.new_path("missing") + "/x", w.tiny, w.path("text.txt"),
            lambda: self.dataset_root("pets"),
            "/dev/null", "/proc/self/status", "/proc/nonexistent", "", "x" * 300,
            os.path.join(self.scratch, "ünï çødé 猫"), w.path("json.json"), w.path("empty"),
            os.path.join(w.tiny, "below"), self.scratch, ".")

    def value(self, kind, dest):
        """A value for a flag of `kind` (see kind_of); valid about half the time."""
        w, valid = self.world, self.rng.random() < 0.5
        if kind in ("int", "float"):
            return str(self.choice(VALID.get(dest, [1, 2]))) if valid else \
                self.choice(INTS if kind == "int" else FLOATS)
        if kind == "template":
            return self.choice(TEMPLATES)
        if kind == "device":
            return "cpu" if valid else self.choice(DEVICES)
        if kind == "file_out" or kind == "out" and self.target == "predict":
            return self.pick(lambda: self.new_path() + ".csv", lambda: self.new_path() + ".json",
                             lambda: self.new_path() + ".png",
                             lambda: self.new_path() + ".txt", self.scratch + "/a/b.csv",
                             "/proc/x.csv", self.scratch, lambda: self.folder(".csv"),
                             lambda: self.run("coop_fewshot") + "/results.json")
        if kind == "out" and self.target == "toy_check" and not valid:
            return self.toy_check_out()
        if kind == "out":
            return self.new_path("out") if valid else self.pick(
                self.run, lambda: self.run("interrupted"), self.absurd_path, self.user_folder)
        if kind in ("run", "runs"):
            return (self.run() if kind == "run" else self.run_tree()) if valid else self.pick(
                lambda: self.damaged("learned.pt"), lambda: self.damaged("checkpoint.pt"),
                self.absurd_path, lambda: self.run() + "/learned.pt")
        if kind == "root":
            return self.dataset_root() if valid else self.absurd_path()
        if kind == "backbone":
            return self.choice([w.tiny, w.tiny2, "toy"]) if valid else self.pick(
                *(os.path.join(w.fixtures, f) for f in ("tiny_vit.pt", "tiny_rn.pt",
                                                        "hf_clip_tiny")),
                "vit-b/16", "ViT-B/17", "toy.pt", self.absurd_path,
                lambda: self.damaged_file(w.tiny, fuzz_world.CLIP_DAMAGES))
        if kind == "text_file":
            return w.path(self.choice(["classes.txt", "words.txt", "templates.txt",
                                       "templates_bad.txt", "latin1.txt", "empty", "json.json",
                                       "tiny.pt", "pets"])) if valid else self.absurd_path()
        if kind == "images":
            pets = w.path("pets")
            return self.pick(f"{pets}/cat", f"{pets}/dog/1.png", f"{pets}/*/0.png",
                             f"{pets}/**/*.png", pets, "'*.png'", w.tiny, w.path("text.txt"),
                             "/dev/null", "/proc/self/status", self.new_path, "*", "[",
                             w.path("empty"))
        if kind in ("method", "dataset"):
            names = list(train.METHODS) if kind == "method" else list(data.DATASETS)
            if self.target == "toy_check":
                names = ["zeroshot"]  # the others train for minutes on the toy
            return self.choice(names) if valid else self.choice(["nope", "", "COOP", "a b"])
        return self.choice(TEXT) if self.rng.random() < 0.8 else self.absurd_path()

    def folder(self, suffix=""):
        path = self.new_path() + suffix
        os.makedirs(path)
        return path

    def toy_check_out(self):
        """A toy_check --out whose zeroshot seed-1 run is there, its results.json damaged."""
        out = self.folder()
        run = self.world.copy("zeroshot_b2n", out, "zeroshot")
        os.rename(run, os.path.join(out, "seed1"))
        os.makedirs(run)
        os.rename(os.path.join(out, "seed1"), os.path.join(run, "seed1"))
        path = os.path.join(run, "seed1", "results.json")
        self.notes.append(f"{path}: {damage(path, RESULTS_DAMAGES, self.rng)}")
        return out

    def user_folder(self):
        """A folder holding a file train.py did not write."""
        path = self.new_path("mine")
        os.makedirs(path)
        with open(os.path.join(path, "notes.txt"), "w") as f:
            f.write("mine")
        return path

    def damaged(self, name):
        """A run folder whose `name` (learned.pt, checkpoint.pt) is damaged."""
        path = self.run("interrupted" if name == "checkpoint.pt" else self.choice(LEARNED), True)
        self.notes.append(f"{name}: {damage(os.path.join(path, name), PT_DAMAGES, self.rng)}")
        return path

    def damaged_file(self, src, table):
        dst = self.new_path("damaged") + os.path.splitext(src)[1]
        with open(src, "rb") as f, open(dst, "wb") as g:
            g.write(f.read())
        self.notes.append(f"{os.path.basename(src)}: {damage(dst, table, self.rng)}")
        return dst

    def run_tree(self, damaged=0.5):
        """A folder of run copies for summarise, one results.json damaged half the time."""
        tree = self.new_path("runs")
        os.makedirs(tree)
        for which in self.rng.sample(["coop_fewshot", "coop_b2n", "linearprobe",
                                      "zeroshot_b2n", "maple_b2n"], self.rng.randint(1, 3)):
            self.world.copy(which, tree)
        if self.rng.random() < damaged:
            results = sorted(os.path.join(d, "results.json") for d, _, f in os.walk(tree)
                             if "results.json" in f)
            path = self.choice(results)
            self.notes.append(f"{path}: {damage(path, RESULTS_DAMAGES, self.rng)}")
        return tree

    def dataset_root(self, name=None, damaged=0.5):
        """A copy of a dataset folder; a dtd copy has a damaged split or cache at times."""
        name = name or self.choice(["pets", "pets", "fruit", "odd", "dtd_root"])
        path = self.world.copy(name, self.scratch, os.path.basename(self.new_path(name)))
        if name == "dtd_root" and self.rng.random() < damaged:
            d = os.path.join(path, "dtd")
            if self.rng.random() < 0.5:
                split = os.path.join(d, fuzz_world.DTD_SPLIT)
                self.notes.append(f"split: {damage(split, SPLIT_DAMAGES, self.rng)}")
            else:
                self.notes.append("cache: " + fuzz_world.write_cache(d, 2, 1, self.rng))
        return path


def kind_of(action):
    """How to draw values for a parser action: switch, choice, int, float, template, or a
    HINTS kind by its name ("text" for a flag this file does not know)."""
    if action.nargs == 0:
        return "switch"
    if action.choices:
        return "choice"
    t = action.type
    if getattr(t, "__qualname__", "").startswith("number."):
        return "float" if inspect.getclosurevars(t).nonlocals["kind"] is float else "int"
    if t in (int, float):
        return t.__name__
    if t is config.template:
        return "template"
    return HINTS.get(action.dest, "text")


# ---- vectors: a valid base for each target, then drawn flags
def base(g):
    """A valid command line for g.target on a tiny dataset and CLIP (sometimes the toy)."""
    w, r = g.world, g.rng
    if g.target == "train":
        scene = g.choice(["pets"] * 6 + ["dtd_root", "odd", "fruit", "toy", "bare"])
        if scene == "bare":
            return []
        argv = ["--root", w.toy_root, "--shots", "1", "--epochs", "1"] if scene == "toy" else [
            "--dataset", "dtd" if scene == "dtd_root" else "folder", "--root",
            g.dataset_root(scene), "--backbone", w.tiny, "--shots", str(r.choice([1, 2])),
            "--epochs", "1", "--batch-size", "4", "--device", "cpu"]
        if r.random() < 0.15:  # evaluate a finished run
            return argv[:-2 if scene == "toy" else None] + ["--eval-only", "--load", g.run()]
        argv += ["--method", g.choice(list(train.METHODS))] * (r.random() < 0.8)
        argv += ["--protocol", g.choice(["base2new", "fewshot", "crossdataset"])] * (
            r.random() < 0.5)
        return argv + ["--out", g.new_path("out")] * (r.random() < 0.9)
    if g.target == "predict":
        images = [f"{w.path('pets')}/cat", f"{w.path('pets')}/dog/0.png"][:r.randint(1, 2)]
        if r.random() < 0.7:
            return [*images, "--load", g.run(g.choice(LEARNED)), "--device", "cpu"]
        return [*images, "--method", "zeroshot", "--backbone", w.tiny, "--classes",
                "cat,dog", "--device", "cpu"]
    if g.target == "interpret":
        return [g.run(g.choice(LEARNED))]
    if g.target in ("distortion", "conditioning"):
        which = g.choice(LEARNED + ["zeroshot_b2n"]) if g.target == "distortion" else \
            "cocoop_b2n"
        return [g.run(which), "--device", "cpu"]
    if g.target == "summarise":
        return [g.run_tree()]
    if g.target == "reproduce":
        return ["--protocol", g.choice(["base2new", "fewshot", "crossdataset", "domaingen"]),
                "--root", g.new_path("data"), "--out", g.new_path("out")]
    if g.target == "templates":
        return [] if r.random() < 0.15 else [
            "--dataset", "folder", "--root", g.dataset_root("pets"), "--backbone", w.tiny,
            "--device", "cpu", "--batch-size", "8"]
    return ["--methods", "zeroshot", "--seeds", "1", "--out", g.new_path("check")]


def damaged_base(g):
    """A valid command line for g.target but for one file it reads, damaged; None for a
    target that reads no file of train.py's."""
    w = g.world
    tiny = ["--dataset", "folder", "--root", w.path("pets"), "--backbone", w.tiny, "--shots",
            "2", "--batch-size", "4", "--device", "cpu"]  # the fixture runs' settings
    if g.target == "train":
        return g.pick(lambda: tiny + ["--eval-only", "--load", g.damaged("learned.pt")],
                      lambda: tiny + ["--method", "coop", "--protocol", "fewshot", "--epochs",
                                      "2", "--resume", "--out", g.damaged("checkpoint.pt")],
                      lambda: ["--dataset", "dtd", "--root", g.dataset_root("dtd_root", 1),
                               *tiny[4:], "--epochs", "1"],
                      lambda: tiny[:4] + ["--backbone", g.damaged_file(
                          w.tiny, fuzz_world.CLIP_DAMAGES), *tiny[6:], "--epochs", "1"])
    if g.target in ("predict", "interpret", "distortion", "conditioning"):
        run = g.damaged("learned.pt")
        return [f"{w.path('pets')}/cat", "--load", run] if g.target == "predict" else [run]
    if g.target == "summarise":
        return [g.run_tree(damaged=1)]
    return ["--methods", "zeroshot", "--seeds", "1", "--out", g.toy_check_out()] if \
        g.target == "toy_check" else None


def flag(g, parser):
    """One drawn option of `parser` with a drawn value -> argv words."""
    a = g.choice([a for a in parser._actions if a.option_strings and a.dest != "help"])
    opt, kind = g.choice(a.option_strings), kind_of(a)
    if kind == "switch":
        return [opt]
    if g.target == "toy_check" and a.dest in ("methods", "seeds"):
        kind = "method" if a.dest == "methods" else kind  # one cheap run at most
    if kind == "choice":
        values = [g.choice(list(a.choices))] if g.rng.random() < 0.7 else \
            [g.choice(["nope", "", str(list(a.choices)[0]).upper()])]
    else:
        many = a.nargs in ("+", "*") and g.target != "toy_check"
        values = [g.value(kind, a.dest) for _ in range(g.rng.randint(1, 3) if many else 1)]
    if len(values) == 1 and (values[0].startswith("-") or g.rng.random() < 0.3):
        return [f"{opt}={values[0]}"]  # argparse reads "--opt -x" as two options
    return [opt, *values]


def positional(g, parser):
    """A drawn value for the positional argument of a tool, if it has one."""
    for a in parser._actions:
        if not a.option_strings:
            return [g.value(HINTS.get(a.dest, "text"), a.dest)]
    return None


def draw(rng, world, scratch, target=None):
    """One vector -> (target, argv, notes): the base, 1-4 drawn flags, maybe a pair; or, three
    times in ten, a valid command but for one damaged file."""
    target = target or rng.choices(list(WEIGHTS), list(WEIGHTS.values()))[0]
    g = Draw(rng, world, scratch, target)
    parser = TARGETS[target].parser
    if rng.random() < 0.3 and target not in ("reproduce", "templates"):  # the files it reads
        return target, cap(target, damaged_base(g)), g.notes
    argv = base(g)
    if rng.random() < 0.15 and positional(g, parser):  # replace the positional argument
        first_opt = next((i for i, x in enumerate(argv) if x.startswith("--")), len(argv))
        argv = positional(g, parser) + argv[first_opt:]
    for _ in range(min(1 + int(rng.expovariate(1.0)), 4)):
        argv += flag(g, parser)
    if target in PAIRS and rng.random() < 0.25:
        fill = dict(run=g.run, bb=lambda: world.tiny2, fruit=lambda: g.dataset_root("fruit"),
                    classes=lambda: world.path("classes.txt"))
        argv += [fill[x[1:-1]]() if x.startswith("{") else x for x in g.choice(PAIRS[target])]
    if target == "reproduce":
        argv = argv + ["--dry-run"] if "--" not in argv else argv
        if rng.random() < 0.2:  # arguments for every train.py command
            argv += ["--dry-run", "--", *flag(Draw(rng, world, scratch, "train"), train.parser)]
    return target, cap(target, argv), g.notes


def quiet_parse(parser, argv):
    """parser.parse_args(argv), or None where it refuses."""
    with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
        try:
            return parser.parse_args(argv)
        except SystemExit:
            return None


def cap(target, argv):
    """Cut training to at most two epochs of a few images: what a drawn --epochs, --shots or
    --batch-size would make long is cut by flags appended last (they win)."""
    if target != "train":
        return argv
    ns = quiet_parse(train.parser, argv)
    if ns is None:
        return argv
    if (ns.epochs or 99) > 2 and (ns.stop_after_epoch or 99) > 2:
        argv = argv + ["--stop-after-epoch", "1"]
    if ns.dataset in (None, "toy") and (ns.shots in (None, -1) or ns.shots > 2 or
                                        (ns.batch_size or 32) < 8):
        argv = argv + ["--shots", "2", "--batch-size", "32"]  # the toy: 576 train images
    return argv
