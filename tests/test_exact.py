"""The speed shortcuts change no output: our path equals the straightforward reference path.

The reference functions are bench.py's own, so the benchmark's reference is tested here too: 77
positions through the text encoder, CoCoOp's loop over images, text features per test batch.
Tiny random CLIP, CPU, seconds."""
import contextlib
import os
import re
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import bench
import clip
import cocoop
import coop
import maple
import train
from conftest import labelled_batch, make_tiny_clip, resolve

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Prompts of different lengths (1 to 5 class-name tokens), so EOT positions differ per class.
NAMES = ["cat", "sea_lion", "golden retriever", "electric guitar", "yin yang", "dollar_bill"]
TOL = dict(atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def clip_model():
    return make_tiny_clip()


@pytest.fixture(scope="module")
def batch():
    return labelled_batch(len(NAMES))


def assert_same_step(model, ref, batch):
    """Logits, loss and every prompt parameter's gradient: our forward == the reference."""
    ours = bench.train_step(model, model, *batch)
    theirs = bench.train_step(model, lambda x: ref(model, x), *batch)
    torch.testing.assert_close(ours["logits"], theirs["logits"], **TOL)
    torch.testing.assert_close(ours["loss"], theirs["loss"], **TOL)
    assert ours["grads"].keys() == theirs["grads"].keys()
    for name, grad in ours["grads"].items():
        assert grad.abs().max() > 0, f"{name} got no gradient"
        torch.testing.assert_close(grad, theirs["grads"][name], **TOL, msg=name)
    return ours


def test_reference_text_encoder_is_clips_own(clip_model):
    tokens = clip.tokenize([f"a photo of a {n.replace('_', ' ')}." for n in NAMES])  # (n, 77)
    with torch.no_grad():
        ref = bench.ref_encode_text(clip_model, clip_model.token_embedding(tokens), tokens)
        torch.testing.assert_close(ref, clip_model.encode_text(tokens), **TOL)
        # and shorter prompts are padded to 77 positions with the padding token, as officially
        short = tokens[:, :12]
        torch.testing.assert_close(
            bench.ref_encode_text(clip_model, clip_model.token_embedding(short), short), ref,
            **TOL)


@pytest.mark.parametrize("options", [dict(), dict(csc=True),
                                     dict(n_ctx=4, ctx_init="a photo of a"),
                                     dict(class_token_position="middle"),
                                     dict(class_token_position="front")])
def test_coop_step_equals_reference(clip_model, batch, options):
    torch.manual_seed(0)
    model = coop.CoOp(clip_model, NAMES, **options).train()
    n = int(model.prompt_learner.tokenized_prompts.argmax(-1).max()) + 1
    assert n < 30, "the shortcut should run far fewer than 77 positions here"
    assert_same_step(model, bench.ref_coop_logits, batch)


@pytest.mark.parametrize("chunk_size", [None, 4])  # one batched pass; chunks (checkpointed)
def test_cocoop_step_equals_per_image_loop(clip_model, batch, chunk_size):
    torch.manual_seed(0)
    model = cocoop.CoCoOp(clip_model, NAMES, chunk_size=chunk_size).train()
    assert_same_step(model, bench.ref_cocoop_logits, batch)


@pytest.mark.parametrize("depth", [1, 2])
def test_maple_step_equals_reference(clip_model, batch, depth):
    torch.manual_seed(0)
    model = maple.MaPLe(clip_model, NAMES, prompt_depth=depth).train()
    assert_same_step(model, bench.ref_maple_logits, batch)


def test_evaluation_with_text_features_once_equals_per_batch(clip_model, batch):
    torch.manual_seed(0)
    model = coop.CoOp(clip_model, NAMES).eval()
    batches = [batch[0], batch[0].flip(0)[:2]]
    torch.testing.assert_close(bench.eval_ours(model, batches)["logits"],
                               bench.eval_ref(model, batches)["logits"], **TOL)
    mp = maple.MaPLe(clip_model, NAMES, prompt_depth=2).eval()
    with torch.no_grad():
        torch.testing.assert_close(mp(batch[0], text_features=mp.text_features()),
                                   bench.ref_maple_logits(mp, batch[0]), **TOL)


def test_train_evaluate_computes_text_features_once(clip_model, batch, monkeypatch):
    torch.manual_seed(0)
    model = coop.CoOp(clip_model, NAMES)
    calls = []
    text_features = model.text_features
    monkeypatch.setattr(model, "text_features", lambda: calls.append(1) or text_features())
    loader = [batch, (batch[0][:1], batch[1][:1]), batch]
    cfg = dict(device="cpu", print_freq=5, world_size=1)
    accuracy = train.evaluate(model, loader, cfg, contextlib.nullcontext())
    assert len(calls) == 1
    with torch.no_grad():
        hits = sum((bench.ref_coop_logits(model, x).argmax(-1) == y).sum().item()
                   for x, y in loader)
    assert accuracy == pytest.approx(100.0 * hits / 7)


def saved_bytes(fn):
    """Bytes of the tensors autograd keeps for backward while fn() runs."""
    sizes = []

    def pack(t):
        sizes.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(sizes), out


@pytest.mark.parametrize("method", ["coop", "cocoop", "maple"])
def test_checkpointing_gives_the_same_gradients_and_saves_less(clip_model, batch, method):
    torch.manual_seed(0)
    model = dict(coop=lambda: coop.CoOp(clip_model, NAMES),
                 cocoop=lambda: cocoop.CoCoOp(clip_model, NAMES),
                 maple=lambda: maple.MaPLe(clip_model, NAMES, prompt_depth=2))[method]().train()
    plain_bytes, plain = saved_bytes(lambda: bench.train_step(model, model, *batch))
    blocks = clip_model.transformer.resblocks
    try:
        for block in blocks:
            block.checkpoint = True
        ckpt_bytes, ckpt = saved_bytes(lambda: bench.train_step(model, model, *batch))
    finally:
        for block in blocks:
            block.checkpoint = False
    torch.testing.assert_close(ckpt["logits"], plain["logits"], **TOL)
    for name, grad in plain["grads"].items():
        torch.testing.assert_close(ckpt["grads"][name], grad, **TOL, msg=name)
    assert ckpt_bytes < plain_bytes  # the text blocks' activations are not kept
    if method == "coop":  # CoOp's saved activations are all in the text encoder
        assert ckpt_bytes < plain_bytes / 4


def test_train_py_checkpointing_reaches_the_blocks(toy_root, tmp_path, monkeypatch):
    calls, real = [], torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    common = ["--root", toy_root, "--epochs", "1", "--shots", "1", "--device", "cpu"]
    train.main([*common, "--out", str(tmp_path / "off")])
    assert calls == [] and resolve()["checkpointing"] is False
    train.main([*common, "--checkpointing", "--out", str(tmp_path / "on")])
    assert len(calls) == 4  # the toy's 4 text blocks, in the one training step


def test_bench_quick_prints_the_table():
    run = subprocess.run([sys.executable, "bench.py", "--quick"], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    out = run.stdout
    assert re.search(r"case +ours s +ref s +speed-up +\(cpu\) +ours MB +ref MB +mem ratio "
                     r"+max \|diff\|", out), out
    num = r" +([\d.e+-]+)"
    rows = re.findall(rf"^(CoOp step|CoCoOp step|MaPLe step|CoOp eval) \(.*?\){num}{num}{num}x"
                      rf"{num}x{num}{num} +(?:[\d.]+x|-) +(\S+)$", out, flags=re.M)
    assert [r[0] for r in rows] == ["CoOp step", "CoCoOp step", "CoCoOp step", "MaPLe step",
                                    "CoOp eval"], out
    for row in rows:  # timings were measured, and the outputs are identical
        assert min(float(x) for x in row[1:7]) >= 0 and float(row[1]) > 0, row
        assert float(row[7]) < 1e-4, row
    assert re.search(r"evaluation throughput, images/s .*\n  10 classes: ours [\d.]+, reference "
                     r"[\d.]+", out), out


@pytest.mark.parametrize("method", ["kgcoop", "promptsrc"])
def test_bench_rows_step_against_their_reference_on_the_same_prompts(method):
    """bench.py's kgcoop / promptsrc rows (--quick sizes): the step and CoOp's / IVLP's give the
    same logits, and the step adds the method's loss terms (the extra cost the row measures)."""
    args = bench.parser.parse_args(["--quick"])
    model, step, ours, ref, inputs = bench.build_case(args, method)
    theirs = step(ref, inputs)["logits"]
    assert torch.equal(step(ours, inputs)["logits"], theirs)
    grads = [p.grad.clone() for p in model.prompt_learner.parameters()]
    for p in model.prompt_learner.parameters():
        p.grad = None
    images, labels = inputs
    (F.cross_entropy(model(images), labels) + sum(model.loss_terms().values())).backward()
    for g, p in zip(grads, model.prompt_learner.parameters()):
        torch.testing.assert_close(g, p.grad)  # the step's loss is L_ce + the terms


def test_bench_toy_settings_are_the_default_toy_runs():
    """bench.py --model toy times each method's default toy run: its batch sizes and options."""
    _, names, batch, options = bench.settings(bench.parser.parse_args(["--model", "toy"]))
    assert len(names) == 6 and batch["coop"] == 32 and batch["cocoop"] == 1
    assert options["maple"]["prompt_depth"] == 3 and options["coop"]["n_ctx"] == 4
