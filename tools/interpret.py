"""Interpret learned context: the nearest vocabulary tokens of each context vector.

    python tools/interpret.py out/toy/coop/toy_16shots_base2new/seed1
    python tools/interpret.py RUN/learned.pt --topk 5 --max-classes 3
    python tools/interpret.py RUN --words my_words.txt

The CoOp paper interprets each learned context vector [V]_m by the words whose token
embeddings are nearest by Euclidean distance (CoOp:interpret_prompt.py). The vectors
are continuous, so the nearest words are only a loose reading: a small distance says the vector
sits near a real word, a large one that it lives between words. Handled: CoOp unified `ctx`
(n_ctx, D) and class-specific `ctx` (n_cls, n_ctx, D), CoCoOp's `ctx` (before the per-image
meta-net shift), MaPLe's `ctx` and its deep prompts `compound_prompts_text.{i}` (those replace
the hidden states at text layer i+1, not the input embeddings: a looser reading still).

Toy CLIP: its captions use a few dozen words, so all the other rows of the 49,408-token table
were never trained and sit near their random initialisation (std 0.02), where an untrained
prompt vector also sits. Searching them finds noise, so for a toy run (the toy backbone, or the
toy dataset on a checkpoint file) the search is restricted to the toy world's caption words
(--all-tokens searches every token).

Shape legend: n_ctx context vectors, D text width, V tokens searched, k = --topk.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # repo root

import torch  # noqa: E402

import clip  # noqa: E402
import config  # noqa: E402
import runs  # noqa: E402
from runs import UsageError  # noqa: E402
from clip.tokenizer import SOT_TOKEN, encode, token_strings  # noqa: E402
from tools.predict import load_prompts  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("prompts", help="a training run's output folder or its learned.pt")
parser.add_argument("--topk", type=int, default=5, help="nearest tokens per vector (default 5)")
parser.add_argument("--max-classes", type=config.number(int), default=3, help="class-specific "
                    "context: show the first this many classes (default 3)")
parser.add_argument("--backbone", help="the run's backbone checkpoint, if moved elsewhere")
parser.add_argument("--show", metavar="WORDS", help="comma-separated words: print each "
                    "vector's distance to them and their rank, e.g. --show outline,sketch")
g = parser.add_mutually_exclusive_group()
g.add_argument("--words", metavar="FILE", help="search only the tokens of these words "
               "(whitespace-separated text)")
g.add_argument("--all-tokens", action="store_true", help="search all 49,408 tokens, also for "
               "a toy run")


def toy_words():
    """Every word of the toy world's captions: captions for every attribute combination, with
    several seeds so that every phrasing occurs (toy/world.py caption)."""
    import numpy as np  # noqa: PLC0415 - only the toy run needs them
    from toy import world  # noqa: PLC0415
    rng, words = np.random.default_rng(0), set()
    for shape in world.SHAPES:
        for colour in world.COLOURS:
            for style in world.STYLES:
                for scene in world.SCENES:
                    for size in list(world.SIZES) * 4:
                        words.update(world.caption(shape, colour, size, style, scene, rng)
                                     .rstrip(".").split())
    return sorted(words)


def vocabulary(args, cfg):
    """Token ids to search (None: all) and a note saying why."""
    if args.words:
        words = runs.read_text(args.words, "--words").split()
        why = f"only the tokens of the {len(words)} words in {args.words}"
    elif not args.all_tokens and (cfg["backbone"] == "toy" or cfg["dataset"] == "toy" and
                                  cfg["backbone"] not in clip.available_models()):
        words = toy_words()
        why = (f"only the {len(words)} words of the toy world's captions: the toy CLIP never "
               "trained the other token rows, which sit at their random init (--all-tokens)")
    else:
        return None, "all tokens"
    ids = sorted({i for w in words for i in encode(w)})
    if not ids:
        raise UsageError(f"{args.words} holds no words")
    return torch.tensor(ids), why


def context_vectors(state, D, classnames=None, max_classes=3):
    """Learned tensors in token-embedding space -> [(title, row labels, vectors (n, D))]."""
    groups = []
    for name, t in state.items():
        if not (name == "ctx" or name.startswith("compound_prompts_text.")) or t.shape[-1] != D:
            continue
        t = t.float()
        if t.dim() == 3:  # CoOp class-specific context (n_cls, n_ctx, D): one group per class
            for c in range(min(len(t), max_classes)):
                label = repr(classnames[c]) if classnames else f"class {c}"
                groups.append((f"{name}, {label}", list(range(1, t.shape[1] + 1)), t[c]))
        else:  # (n_ctx, D)
            groups.append((name, list(range(1, len(t) + 1)), t))
    return groups


def cdist(a, b):
    """Euclidean distances (n, V), computed directly: exact (a vector equal to a token is at 0),
    where torch's default matmul shortcut loses digits for near vectors."""
    return torch.cdist(a, b, compute_mode="donot_use_mm_for_euclid_dist")


def nearest(vectors, table, ids, topk):
    """Euclidean distances to the token rows -> [[(word, distance)] * k] per vector."""
    rows = table if ids is None else table[ids]  # (V, D)
    dist = cdist(vectors, rows)  # (n_ctx, V)
    d, j = dist.topk(min(topk, len(rows)), dim=-1, largest=False)  # (n_ctx, k)
    j = j if ids is None else ids[j]
    return [[(word(i), x) for i, x in zip(ji.tolist(), di.tolist())] for ji, di in zip(j, d)]


def word(i):
    """Token id -> readable text: 'photo</w>' -> 'photo'; a word piece (no </w>, it continues
    into the next token) gets a trailing '-': 'annihil-'."""
    text = clip.decode([i]).strip() or repr(clip.decode([i]))
    whole = token_strings()[i].endswith("</w>") or i >= SOT_TOKEN
    return text if whole else text + "-"


def main(argv=None):
    args = parser.parse_args(argv)
    if args.topk < 1:
        raise UsageError("--topk must be at least 1")
    state, cfg, path, _ = load_prompts(args.prompts)
    state = {k.removeprefix("prompt_learner."): v for k, v in state.items()}  # the learner's
    backbone = args.backbone or cfg["backbone"]
    clip_model = clip.load(backbone, "cpu")[0]
    config.check_vocabulary(clip_model, backbone)
    table = clip_model.token_embedding.weight.detach().float()  # (49408, D)
    names = None
    if any(t.dim() == 3 for t in state.values()):  # class-specific: label by class name
        try:
            from tools.predict import run_classes  # noqa: PLC0415
            names = run_classes(cfg)
        except UsageError:
            names = None  # data not here: label by index
    groups = context_vectors(state, table.shape[1], names, args.max_classes)
    if not groups and not any(k == "ctx" or k.startswith("compound_prompts_text.")
                              for k in state):
        raise UsageError(f"{path} holds no text context vectors (keys: {', '.join(state)}): "
                         f"this {cfg['method']} run learned no text context to read as words "
                         "(vision prompts are not token vectors)")
    if not groups:
        raise UsageError(f"{path} holds no context vectors of width {table.shape[1]} (keys: "
                         f"{', '.join(state)}); is {backbone!r} the run's backbone?")
    ids, why = vocabulary(args, cfg)
    print(f"{cfg['method']} prompts {path}, backbone {backbone}\nnearest tokens by Euclidean "
          f"distance, searching {why}")
    skipped = [k for k in state if k != "ctx" and not k.startswith("compound_prompts_text.")]
    if skipped:
        print(f"(not token vectors, skipped: {', '.join(skipped)})")
    show = [w.strip() for w in (args.show or "").split(",") if w.strip()]
    bad = [w for w in show if len(encode(w)) != 1]
    if bad:
        raise UsageError(f"--show {', '.join(bad)}: not one token each; pick single-token words")
    init = encode(cfg["ctx_init"].replace("_", " ")) if cfg.get("ctx_init") else []
    result = {}
    for title, labels, vectors in groups:
        result[title] = nearest(vectors, table, ids, args.topk)
        print(f"\n{title}  ({len(labels)} vectors)")
        for m, words in zip(labels, result[title]):
            print(f"  {m:>2}: " + "  ".join(f"{w} ({x:.3f})" for w, x in words))
        print("  read as words: " + " ".join(words[0][0] for words in result[title]))
        searched = table if ids is None else table[ids]  # (V, D)
        for w in show:  # distance to one word, and its rank among the searched tokens
            d = cdist(vectors, table[encode(w)])  # (n_ctx, 1)
            rank = (cdist(vectors, searched) < d).sum(dim=-1) + 1  # (n_ctx,)
            print(f"  distance to {w!r} (rank): " + "  ".join(
                f"{x:.3f} (#{r})" for x, r in zip(d[:, 0].tolist(), rank.tolist())))
        if title == "ctx" and vectors.dim() == 2 and len(init) >= len(vectors):
            # ctx_init runs: how far training moved each vector from its initial word
            moved = (vectors - table[init[:len(vectors)]]).norm(dim=-1)  # (n_ctx,)
            print("  moved from the init words: " + "  ".join(
                f"{word(i)} {x:.3f}" for i, x in zip(init, moved.tolist())))
    return result

if __name__ == "__main__":
    runs.run_cli(main)
