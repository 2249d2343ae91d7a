"""A procedural image world for the embedded toy CLIP (numpy + PIL, deterministic given a seed).

Every image is one object on a background scene. The object has a shape (14), a colour (8), a
size (2), a drawing style (solid, outline, striped) and a position (a nuisance, never named);
the scene is a procedural texture (grass, sand, water, snow, brick, night).

Pretraining (`sample_pretraining_batch`): every shape in every style, colour and scene, with a
caption composed from the attributes in varied phrasings ("an outline of a small blue star on
the beach.", "a photo of a striped heart.", "a red ring."). Like alt-text on the web, a caption
names the unusual: an outline drawing is always called one, a solid shape mostly is not. So to
this CLIP "a photo of a circle." means a solid circle, and among solid shapes the thin hollow
ones (ring, frame) look the most like a line drawing.

The downstream Toy task (`ensure_dataset`): "which shape?" on images all drawn as outlines,
named with CoOp's hand-written template "a photo of a {}.", which does not say "outline".
Zero-shot CLIP gets most shapes right but takes outlined circles and hearts for rings and
outlined diamonds for bolts: a gap between template and images that learned context can close
(notes: what is a context, 上下文). With "an outline of a {}." the same model is perfect.
The first half of TASK["classes"] are the base classes (few-shot training), the rest the new.
In the base classes' TRAIN split each class mostly sits on "its" scene (circle on grass, ...),
like the notes' cats indoors and dogs outdoors; val and test scenes are random. A static prompt
(静态提示) tuned on these shots fits the base classes and may distort the new ones (prototype
distortion, 原型扭曲).

Run `python -m toy.world --grid docs/toy_world.png` to draw sample images.
"""
import argparse
import hashlib
import json
import math
import os
import shutil

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

RES = 32  # image side in pixels
TEMPLATE = "a photo of a {}."  # the hand-written template (CoOp's default for generic datasets)

SHAPES = ["circle", "ring", "square", "frame", "triangle", "star", "heart", "cross", "diamond",
          "moon", "arrow", "house", "bolt", "drop"]
COLOURS = {"red": (220, 40, 40), "orange": (245, 140, 20), "yellow": (240, 220, 40),
           "green": (40, 175, 60), "blue": (40, 90, 230), "purple": (150, 60, 200),
           "white": (250, 250, 250), "black": (20, 20, 20)}
SIZES = {"small": 8.5, "large": 13.0}  # object radius in pixels
STYLES = ["solid", "outline", "striped"]
SCENES = ["grass", "sand", "water", "snow", "brick", "night"]
CLASH = {"grass": {"green"}, "sand": {"yellow", "orange"}, "water": {"blue"},
         "snow": {"white", "yellow"}, "brick": {"red", "orange"},
         "night": {"black", "blue", "purple"}}  # colours hard to see on a scene

# The downstream Toy task. Labels follow `classes`, so the standard base/new split (the first
# ceil(n/2) labels are base) gives the first half as base classes and the second half as new
# (star and drop appear only in pretraining). `spurious`: the share of each base class's train
# images on "its" scene. What this task shows, seed by seed: `python tools/toy_check.py` (README, "The
# toy world"). The learned context moves towards the words "sketch", "outline", "line" and
# fixes the base classes; the new classes' errors are moon and arrow taken for bolt, a whole
# class at a time, so their accuracy moves by ~17 points from seed to seed; the spurious scenes
# and random crops that miss the object make those collapses likelier, not consistent.
TASK = dict(classes=["circle", "ring", "square", "frame", "triangle", "heart",
                     "cross", "diamond", "moon", "arrow", "house", "bolt"],
            style="outline", n_train=48, n_val=16, n_test=80, spurious=0.9, seed=2024)


# The toy run's recipes (train.py applies them when dataset and backbone are both "toy", the
# default): the papers' settings except where the tiny model needs otherwise (README, "The toy
# world"; measured on the toy).
RECIPES = {
    # CoOp: none; the paper's base-to-new recipe as coop.py has it (200 epochs for 16 shots, 4
    # tokens from "a photo of a"). The 50 epochs this toy used before hid the base-class
    # overfitting: new 93.8 / 97.1 / 79.2 on seeds 1-3 after 50 epochs, 75.2 / 89.6 / 73.5 after
    # 200 (zero-shot: 85.4).
    # the paper's depth 9 of 12 text layers is 3 of the toy's 4; depth 4 (every layer) lost the
    # new classes in 4 of 10 seeds, depth 3 in 1 (README, "The toy world")
    "maple": dict(prompt_depth=3, lr=0.002),
    # MaPLe's ablations (ivlp.py): the official depth 12 (every layer) scaled to MaPLe's toy
    # depth 3 in each prompted tower (of the toy's 4 text and 6 vision layers), the official lr.
    # Every layer did worse here, as for MaPLe (H over seeds 1-3): ivlp_text at text depth 4
    # 57-84 (depth 3: 92-97), ivlp at depths 4 and 6 34-63 (3 and 3: 88-92), vpt at vision
    # depth 6 59-64 and 4 68-69 (3: 70-73).
    "vpt": dict(vision_depth=3),
    "ivlp_text": dict(text_depth=3),
    "ivlp": dict(text_depth=3, vision_depth=3),
    # PromptSRC's depth 9 of 12 in both towers, scaled like MaPLe's and IVLP's: 3 of the toy's 4
    # text and 6 vision layers; the official 20 epochs, lr and GPA (mean 15, std 1).
    "promptsrc": dict(text_depth=3, vision_depth=3),
    "finetune": dict(epochs=50),  # long enough to see forgetting (10 epochs still help)
}


def spurious_scenes():
    """Base class -> the scene most of its TRAIN images sit on (one scene per base class)."""
    base = TASK["classes"][:math.ceil(len(TASK["classes"]) / 2)]
    return dict(zip(base, SCENES))


# ---------------------------------------------------------------- shapes as alpha templates
def _regular(k, r=1.0, phase=90.0, dy=0.0):
    a = np.deg2rad(phase + 360.0 * np.arange(k) / k)
    return list(zip(r * np.cos(a), r * np.sin(a) + dy))


def _star(k=5, r1=1.0, r2=0.42):
    a = np.deg2rad(90.0 + 180.0 * np.arange(2 * k) / k)
    r = np.where(np.arange(2 * k) % 2 == 0, r1, r2)
    return list(zip(r * np.cos(a), r * np.sin(a) - 0.08))


def _heart():
    t = np.linspace(0, 2 * np.pi, 80)
    x = 16 * np.sin(t) ** 3
    y = 13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t)
    return list(zip(x / 16.5, y / 16.5 + 0.12))


def _drop():
    t = np.linspace(0, 2 * np.pi, 80)
    return list(zip(0.62 * np.sin(t) * np.sin(t / 2) ** 1.2, np.cos(t) * 0.95))


POLYGONS = {  # unit coordinates, y up, object inside the unit disc
    "square": [(-0.78, -0.78), (0.78, -0.78), (0.78, 0.78), (-0.78, 0.78)],
    "triangle": _regular(3, 1.05, dy=-0.2),
    "star": _star(),
    "heart": _heart(),
    "cross": [(-0.3, -0.9), (0.3, -0.9), (0.3, -0.3), (0.9, -0.3), (0.9, 0.3), (0.3, 0.3),
              (0.3, 0.9), (-0.3, 0.9), (-0.3, 0.3), (-0.9, 0.3), (-0.9, -0.3), (-0.3, -0.3)],
    "diamond": [(0, 1.0), (0.6, 0), (0, -1.0), (-0.6, 0)],
    "arrow": [(-0.95, -0.22), (0.15, -0.22), (0.15, -0.6), (0.95, 0), (0.15, 0.6),
              (0.15, 0.22), (-0.95, 0.22)],
    "house": [(-0.7, -0.85), (0.7, -0.85), (0.7, 0.15), (0.95, 0.15), (0, 0.95),
              (-0.95, 0.15), (-0.7, 0.15)],
    "bolt": [(0.15, 0.95), (-0.6, -0.1), (-0.05, -0.1), (-0.25, -0.95), (0.6, 0.15),
             (0.05, 0.15), (0.4, 0.95)],
    "drop": _drop(),
}


def _templates(t=128, outline=0.2, stripe=0.4):
    """Rasterise every (style, shape) once at t x t: alpha maps (3, n_shapes, t, t)."""
    out = np.zeros((len(STYLES), len(SHAPES), t, t), np.float32)
    px = lambda pts: [((x + 1) * (t - 1) / 2, (1 - y) * (t - 1) / 2) for x, y in pts]
    u = np.linspace(-1, 1, t)
    stripes = ((u[None, :] + u[:, None]) / stripe) % 1.0 < 0.5  # diagonal stripes
    for k, name in enumerate(SHAPES):
        img = Image.new("L", (t, t), 0)
        d = ImageDraw.Draw(img)
        if name in ("circle", "ring"):
            d.ellipse(px([(-0.9, 0.9), (0.9, -0.9)]), fill=255)
            if name == "ring":  # a thick band: drawn as an outline it stays the same band
                d.ellipse(px([(-0.56, 0.56), (0.56, -0.56)]), fill=0)
        elif name == "frame":
            d.rectangle(px([(-0.78, 0.78), (0.78, -0.78)]), fill=255)
            d.rectangle(px([(-0.46, 0.46), (0.46, -0.46)]), fill=0)
        elif name == "moon":  # a disc minus a shifted disc
            d.ellipse(px([(-0.9, 0.9), (0.9, -0.9)]), fill=255)
            d.ellipse(px([(-0.45, 1.05), (1.15, -0.55)]), fill=0)
        else:
            d.polygon(px(POLYGONS[name]), fill=255)
        # The outline is the fill minus its erosion: one rule that works for every shape.
        inner = img.filter(ImageFilter.MinFilter(2 * int(outline * t / 2) + 1))
        fill = np.asarray(img, np.float32) / 255
        line = fill - np.asarray(inner, np.float32) / 255
        out[:, k] = fill, line, np.maximum(line, fill * stripes)  # solid, outline, striped
    out[..., [0, -1], :] = out[..., :, [0, -1]] = 0  # a blank border: outside samples hit it
    return out


_TEMPLATES = None


def _shape_alpha(shape, style, radius, cx, cy, angle, ss=2):
    """Coverage (N, RES, RES) of each object: sample its template on an ss x ss supersampled
    grid (inverse mapping: output pixel -> template pixel, nearest) and average the ss x ss
    samples of each pixel, which anti-aliases the edges."""
    global _TEMPLATES
    if _TEMPLATES is None:
        _TEMPLATES = _templates()
    t = _TEMPLATES.shape[-1]
    g = (np.arange(RES * ss, dtype=np.float32) + 0.5) / ss  # sample centres in pixels
    dx = g[None, None, :] - cx[:, None, None]  # (N, 1, S)
    dy = g[None, :, None] - cy[:, None, None]  # (N, S, 1)
    k = (t - 1) / 2 / radius[:, None, None]  # template pixels per output pixel
    c, s = np.cos(angle)[:, None, None] * k, np.sin(angle)[:, None, None] * k
    # rotate each sample into the object's frame, then scale and shift to template pixels
    iu = np.clip(np.rint(c * dx + s * dy + (t - 1) / 2), 0, t - 1).astype(np.int32)  # (N,S,S)
    iv = np.clip(np.rint(c * dy - s * dx + (t - 1) / 2), 0, t - 1).astype(np.int32)
    base = ((style * len(SHAPES) + shape) * t * t).astype(np.int32)[:, None, None]
    alpha = np.take(_TEMPLATES, base + iv * t + iu)  # (N, S, S)
    return alpha.reshape(len(shape), RES, ss, RES, ss).mean(axis=(2, 4))  # (N, RES, RES)


# ---------------------------------------------------------------- scenes as textures
def _scenes(scene, rng):
    """Background images (N, RES, RES, 3) in [0, 255] for scene indices `scene`: a base colour
    plus a per-scene pattern (N, RES, RES) scaled per channel."""
    y, x = np.mgrid[0:RES, 0:RES].astype(np.float32)
    noise = lambda n: rng.normal(size=(n, RES, RES)).astype(np.float32)
    uni = lambda n, hi: rng.uniform(0, hi, size=(n, 1, 1)).astype(np.float32)
    patterns = {  # name: (base colour, pattern(n), channel amplitudes)
        "grass": ((70, 150, 60), lambda n: 0.5 * noise(n) + rng.normal(size=(n, 1, RES)),
                  (-10, 28, -8)),  # vertical blades
        "sand": ((215, 190, 135), noise, (14, 13, 10)),  # fine grain
        "water": ((45, 100, 180), lambda n: np.sin(y / 1.2 + 1.5 * np.sin(x / 5 + uni(n, 7))
                                                   + uni(n, 7)), (18, 26, 30)),  # waves
        "snow": ((232, 238, 245), noise, (6, 6, 5)),
        "brick": ((165, 75, 55), lambda n: 5.0 * ((y % 6 < 1) | (
            (x + np.floor(uni(n, 10)) + 5 * (y // 6 % 2)) % 10 < 1)) + 0.3 * noise(n),
                  (14, 24, 26)),  # mortar lines
        "night": ((15, 20, 55), lambda n: 9.0 * (noise(n) > 2.2), (20, 20, 18)),  # stars
    }
    out = np.zeros((len(scene), RES, RES, 3), np.float32)
    for i, name in enumerate(SCENES):
        m = np.flatnonzero(scene == i)
        base, pattern, amp = patterns[name]
        out[m] = np.asarray(base, np.float32) + pattern(len(m))[..., None] * np.asarray(amp)
    return out


# ---------------------------------------------------------------- attributes -> images, text
def sample_attributes(rng, n, shapes=None, styles=None, scenes=None):
    """Draw n objects. shapes/styles/scenes: optional index arrays (or ints) to fix them."""
    pick = lambda given, k: (np.broadcast_to(given, (n,)).copy() if given is not None
                             else rng.integers(0, k, size=n))
    a = dict(shape=pick(shapes, len(SHAPES)), style=pick(styles, len(STYLES)),
             scene=pick(scenes, len(SCENES)), colour=rng.integers(0, len(COLOURS), size=n),
             size=rng.integers(0, len(SIZES), size=n))
    clash = np.array([[c in CLASH[s] for c in COLOURS] for s in SCENES])  # (scenes, colours)
    for _ in range(10):  # redraw colours that would vanish into the scene
        bad = clash[a["scene"], a["colour"]]
        if not bad.any():
            break
        a["colour"][bad] = rng.integers(0, len(COLOURS), size=bad.sum())
    radius = np.array(list(SIZES.values()), np.float32)[a["size"]]
    room = np.minimum(RES / 2 - radius - 1.5, 5.0)  # small objects wander more
    a["cx"], a["cy"] = (RES / 2 + rng.uniform(-1, 1, size=(2, n)) * room).astype(np.float32)
    a["angle"] = rng.uniform(-0.25, 0.25, size=n).astype(np.float32)  # radians, about +-14 deg
    return a


def render(a, rng):
    """Images (N, RES, RES, 3) uint8 for the attribute dict `a` from `sample_attributes`."""
    radius = np.array(list(SIZES.values()), np.float32)[a["size"]]
    alpha = _shape_alpha(a["shape"], a["style"], radius, a["cx"], a["cy"], a["angle"])
    colour = np.array(list(COLOURS.values()), np.float32)[a["colour"]]  # (N, 3)
    img = _scenes(a["scene"], rng)
    img = img * (1 - alpha[..., None]) + colour[:, None, None, :] * alpha[..., None]
    img *= rng.uniform(0.85, 1.1, size=(len(img), 1, 1, 1)).astype(np.float32)  # lighting
    img += 4 * rng.standard_normal(size=img.shape, dtype=np.float32)  # sensor noise
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


_SCENE_WORDS = {"grass": ["on grass", "on the grass"], "sand": ["on sand", "on the beach"],
                "water": ["on water", "in the water"], "snow": ["in the snow", "on snow"],
                "brick": ["on a brick wall", "in front of a brick wall"],
                "night": ["at night", "in the night sky"]}
_OPENERS = ["a photo of {}", "a picture of {}", "an image of {}", "{}", "a photo of {}",
            "there is {}"]  # "a photo of" twice: the most common opener, as on the web
_OUTLINE = ["an outline of {}", "a line drawing of {}", "a sketch of {}", "the outline of {}"]


def _a(phrase):
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def caption(shape, colour, size, style, scene, rng):
    """One caption for one object (all arguments are attribute names). The shape is always
    named; colour, size and scene often; "outline" always, "striped" mostly, "solid" rarely."""
    words = [w for w, p in ((size, 0.4), (colour, 0.7)) if rng.random() < p]
    if style == "striped" and rng.random() < 0.9:
        words.insert(0, "striped")
    if style == "solid" and rng.random() < 0.15:
        words.insert(0, "solid")
    obj = _a(" ".join(words + [shape]))
    if style == "outline":
        text = _OUTLINE[rng.integers(len(_OUTLINE))].format(obj)
    else:
        text = _OPENERS[rng.integers(len(_OPENERS))].format(obj)
    if rng.random() < 0.6:
        text += " " + _SCENE_WORDS[scene][rng.integers(2)]
    return text + "."


def sample_pretraining_batch(rng, n):
    """n fresh (image, caption) pairs from the whole world: (uint8 (n, RES, RES, 3), [str])."""
    a = sample_attributes(rng, n)
    caps = [caption(SHAPES[a["shape"][i]], list(COLOURS)[a["colour"][i]],
                    list(SIZES)[a["size"][i]], STYLES[a["style"][i]], SCENES[a["scene"][i]],
                    rng) for i in range(n)]
    return render(a, rng), caps


# ---------------------------------------------------------------- the downstream Toy task
def task_split(split):
    """One split of the Toy task: images uint8 (N, RES, RES, 3), labels (N,) indexing
    TASK["classes"], scene indices (N,). Deterministic: the seed is fixed per split."""
    k = ["train", "val", "test"].index(split)
    rng = np.random.default_rng(TASK["seed"] + k)
    classes = TASK["classes"]
    labels = np.repeat(np.arange(len(classes)), TASK["n_" + split])
    scenes = rng.integers(0, len(SCENES), size=len(labels))
    if split == "train":  # the spurious correlation: base classes mostly sit on "their" scene
        for name, scene in spurious_scenes().items():
            m = (labels == classes.index(name)) & (rng.random(len(labels)) < TASK["spurious"])
            scenes[m] = SCENES.index(scene)
    shapes = np.array([SHAPES.index(c) for c in classes])[labels]
    a = sample_attributes(rng, len(labels), shapes=shapes, scenes=scenes,
                          styles=STYLES.index(TASK["style"]))
    return render(a, rng), labels, scenes


def ensure_dataset(root):
    """Render the Toy task under <root>/toy (only if missing or stale) and return that folder:
    images/<classname>/<split>_<i>.png and split_zhou_Toy.json in CoOp's split format."""
    out = os.path.join(root, "toy")
    stamp = os.path.join(out, "VERSION")
    with open(__file__, "rb") as f:  # any change to this file (or to TASK) renders again
        version = "toy-world " + hashlib.sha1(f.read() + repr(TASK).encode()).hexdigest()
    if os.path.exists(stamp) and open(stamp).read() == version:
        return out
    tmp = f"{out}.tmp{os.getpid()}"  # render aside, then swap in: never a half-written folder
    shutil.rmtree(tmp, ignore_errors=True)
    split = {}
    for name in ("train", "val", "test"):
        images, labels, _ = task_split(name)
        split[name] = []
        for i, (img, y) in enumerate(zip(images, labels)):
            cls = TASK["classes"][y]
            os.makedirs(os.path.join(tmp, "images", cls), exist_ok=True)
            Image.fromarray(img).save(os.path.join(tmp, "images", cls, f"{name}_{i:04d}.png"),
                                      compress_level=1)
            split[name].append([f"{cls}/{name}_{i:04d}.png", int(y), cls])
    with open(os.path.join(tmp, "split_zhou_Toy.json"), "w") as f:
        json.dump(split, f, indent=4)
    with open(os.path.join(tmp, "VERSION"), "w") as f:
        f.write(version)
    shutil.rmtree(out, ignore_errors=True)  # stale: replace the whole folder
    os.replace(tmp, out)
    return out


def save_grid(path, seed=0, scale=3):
    """A PNG of sample images: two rows of pretraining images (every shape, style and scene),
    then one image per Toy class: base classes from the train split (on their spurious scene),
    new classes from the test split."""
    rng = np.random.default_rng(seed)
    n = len(TASK["classes"])
    pre, _ = sample_pretraining_batch(rng, 2 * n)
    train, y_train, s_train = task_split("train")
    test, y_test, _ = task_split("test")
    spurious = spurious_scenes()
    task = []
    for c, name in enumerate(TASK["classes"]):
        if name in spurious:
            task.append(train[(y_train == c) & (s_train == SCENES.index(spurious[name]))][0])
        else:
            task.append(test[y_test == c][0])
    pad, cell, text = 4, RES * scale, 14
    grid = Image.new("RGB", (n * (cell + pad) + pad, 3 * (cell + pad) + pad + text), "white")
    for r, row in enumerate([pre[:n], pre[n:], task]):
        for c, img in enumerate(row):
            big = Image.fromarray(img).resize((cell, cell), Image.NEAREST)
            grid.paste(big, (pad + c * (cell + pad), pad + r * (cell + pad) + text * (r == 2)))
    ImageDraw.Draw(grid).text((pad, 2 * (cell + pad) + pad), "Toy task (outline style): "
                              "base classes, train split | new classes, test split", fill="black")
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    grid.save(path)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description="Draw sample images of the toy world.")
    p.add_argument("--grid", default="docs/toy_world.png", help="output PNG path")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    save_grid(args.grid, args.seed)
    rng = np.random.default_rng(args.seed)
    for cap in sample_pretraining_batch(rng, 8)[1]:
        print(cap)
    print("wrote", args.grid)
