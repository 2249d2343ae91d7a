"""Benchmark: our speed-ups against the straightforward, reference-style computation.

    python bench.py                  # CPU, ViT-B/16 size, random weights, 100 classes
    python bench.py --device cuda
    python bench.py --model toy      # the default toy run's model, classes and batch sizes
    python bench.py --quick          # a tiny smoke configuration (used by a test)

Ours (what train.py runs): the text encoder runs only the first max(EOT)+1 positions
(clip/model.py encode_text_embeddings); class features once per evaluation; CoCoOp's B*n_cls
prompts in one batched pass; the frozen image encoder under no_grad. Every prompt is built by
its method's PromptLearner.forward, as the paper writes it.
The reference re-states what the official code computes: all 77 positions, CoCoOp's loop over
images, text features per test batch, the image encoder inside the recorded forward (frozen
weights: autograd records nothing there anyway). Both paths run on the same weights and
inputs; their logits, losses and prompt gradients are compared.
KgCoOp and PromptSRC rows measure what their regularisers cost instead: "ours" is their training
step (cross-entropy plus their loss terms), the "reference" CoOp's or IVLP's step on the same
prompts (so the speed-up is below 1, and the logits must be equal).
Timing: per case, one fresh process runs the reference and ours step after step (at least
--steps, more until one path has run --min-seconds), and the speed-up is the ratio of their
median times. Read the ratios: absolute speed depends on the machine (and drifts on a shared
one), a ratio of neighbouring steps much less.
Memory: the peak during a step above what the process held before it (model, inputs): CUDA
max_memory_allocated; CPU the peak resident set size (getrusage), a high-water mark, so the
reference's is taken where it runs first and ours in a process of its own.
"""
import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

import cocoop
import coop
import ivlp
import kgcoop
import maple
import promptsrc
from clip.model import CLIP

# Caltech101's 100 classes as CoOp's split names them: realistic, 1-3 BPE tokens each.
CALTECH101 = (
    "face leopard motorbike accordion airplane anchor ant barrel bass beaver binocular bonsai "
    "brain brontosaurus buddha butterfly camera cannon car_side ceiling_fan cellphone chair "
    "chandelier cougar_body cougar_face crab crayfish crocodile crocodile_head cup dalmatian "
    "dollar_bill dolphin dragonfly electric_guitar elephant emu euphonium ewer ferry flamingo "
    "flamingo_head garfield gerenuk gramophone grand_piano hawksbill headphone hedgehog "
    "helicopter ibis inline_skate joshua_tree kangaroo ketch lamp laptop llama lobster lotus "
    "mandolin mayfly menorah metronome minaret nautilus octopus okapi pagoda panda pigeon pizza "
    "platypus pyramid revolver rhino rooster saxophone schooner scissors scorpion sea_horse "
    "snoopy soccer_ball stapler starfish stegosaurus stop_sign strawberry sunflower tick "
    "trilobite umbrella watch water_lilly wheelchair wild_cat windsor_chair wrench yin_yang"
).split()
VIT_B16 = dict(embed_dim=512, image_resolution=224, vision_layers=12, vision_width=768,
               vision_patch_size=16, context_length=77, vocab_size=49408, transformer_width=512,
               transformer_heads=8, transformer_layers=12)
TINY = dict(VIT_B16, embed_dim=32, image_resolution=32, vision_layers=2, vision_width=64,
            vision_patch_size=8, transformer_width=64, transformer_heads=1, transformer_layers=2)


# ---------------------------------------------------------------------------------------------
# The reference path: what the official code computes, written out plainly.

def ref_encode_text(clip_model, prompts, tokens):
    """The official TextEncoder, prompts (N, L, D) -> (N, E), over all 77 positions. Our
    learners keep L <= 77 positions; the official ones keep 77, the rest being the embedding of
    the padding token 0, which is appended here."""
    N, L, _ = prompts.shape
    zeros = torch.zeros(N, clip_model.context_length - L, dtype=torch.long, device=tokens.device)
    prompts = torch.cat([prompts, clip_model.token_embedding(zeros).to(prompts.dtype)], 1)
    x = prompts + clip_model.positional_embedding.to(prompts.dtype)  # (N, 77, D)
    x = clip_model.ln_final(clip_model.transformer(x))  # causal blocks, every position
    eot = torch.cat([tokens, zeros], 1).argmax(dim=-1)  # (N,)
    return x[torch.arange(N, device=x.device), eot] @ clip_model.text_projection  # (N, E)


def ref_image_features(clip_model, images):
    # No no_grad, as in the official forward (the frozen weights make autograd record nothing).
    return F.normalize(clip_model.encode_image(images), dim=-1)  # (B, E)


def ref_coop_logits(model, images):
    """CoOp's CustomCLIP.forward: image features, every class's text features, cosine logits."""
    pl, f = model.prompt_learner, ref_image_features(model.clip_model, images)  # f (B, E)
    g = F.normalize(ref_encode_text(model.clip_model, pl(), pl.tokenized_prompts), dim=-1)
    return model.clip_model.logit_scale.exp() * f @ g.t()  # (B, n_cls)


def ref_cocoop_logits(model, images):
    """CoCoOp's CustomCLIP.forward: one text-encoder pass per image over all its prompts."""
    pl, f = model.prompt_learner, ref_image_features(model.clip_model, images)  # f (B, E)
    logits = []
    for prompts_i, f_i in zip(pl(f), f):  # (n_cls, L, D), (E,)
        g = ref_encode_text(model.clip_model, prompts_i, pl.tokenized_prompts)  # (n_cls, E)
        logits.append(model.clip_model.logit_scale.exp() * f_i @ F.normalize(g, dim=-1).t())
    return torch.stack(logits)  # (B, n_cls)


def ref_maple_logits(model, images):
    """MaPLe's CustomCLIP.forward: the deep-prompted text encoder over all 77 positions (the
    official TextEncoder and forked blocks), then the prompted image encoder."""
    m, pl = model.clip_model, model.prompt_learner
    prompts, deep, vision, deep_vision = pl()
    N, L, _ = prompts.shape
    zeros = torch.zeros(N, m.context_length - L, dtype=torch.long, device=prompts.device)
    x = torch.cat([prompts, m.token_embedding(zeros)], 1) + m.positional_embedding  # (N, 77, D)
    for i, block in enumerate(m.transformer.resblocks):
        if 1 <= i <= len(deep):  # blocks 1..J-1 replace the context slots with P_i
            p = deep[i - 1].expand(N, -1, -1)  # (N, n_ctx, D)
            x = torch.cat([x[:, :1], p, x[:, 1 + pl.n_ctx:]], dim=1)  # (N, 77, D)
        x = block(x)
    x = m.ln_final(x)[torch.arange(N, device=x.device), pl.tokenized_prompts.argmax(-1)]  # (N, D)
    g = x @ m.text_projection  # (N, E)
    f = F.normalize(model.encode_image(images, vision, deep_vision), dim=-1)  # (B, E), as ours
    return m.logit_scale.exp() * f @ F.normalize(g, dim=-1).t()  # (B, n_cls)


# ---------------------------------------------------------------------------------------------
# The cases. A step returns what both paths must agree on.

def train_step(model, logits_fn, images, labels):
    for p in model.prompt_learner.parameters():
        p.grad = None
    logits = logits_fn(images)  # (B, n_cls)
    loss = F.cross_entropy(logits, labels)
    loss.backward()
    grads = {k: p.grad.clone() for k, p in model.prompt_learner.named_parameters()}
    return dict(logits=logits.detach(), loss=loss.detach(), grads=grads)


def method_step(model, base, images, labels):
    """The extra cost of a regularised method over the method it regularises (KgCoOp over CoOp,
    PromptSRC over IVLP): `model`'s training step, its own loss terms included, or (model None)
    `base`'s plain cross-entropy step on the same prompts. Their logits must agree."""
    if model is None:
        return dict(logits=train_step(base, base, images, labels)["logits"])
    for p in model.prompt_learner.parameters():
        p.grad = None
    logits = model(images)  # (B, n_cls); training mode: the loss terms are computed too
    loss = F.cross_entropy(logits, labels) + sum(model.loss_terms().values())
    loss.backward()
    return dict(logits=logits.detach())


def base_of(model, names, ctx_init):
    """CoOp or IVLP with the same prompts as KgCoOp or PromptSRC `model` (classes `names`)."""
    pl = model.prompt_learner
    if isinstance(model, kgcoop.KgCoOp):
        base = coop.CoOp(model.clip_model, names, n_ctx=pl.n_ctx, ctx_init=ctx_init)
    else:
        base = ivlp.IVLP(model.clip_model, names, pl.n_ctx_text, pl.n_ctx_vision,
                         pl.text_depth, pl.vision_depth, ctx_init=ctx_init)
    base.prompt_learner.load_state_dict(pl.state_dict())  # the same learned prompts
    return base.to(pl.ctx.device).train()


@torch.no_grad()
def eval_ours(model, batches):
    g = model.text_features()  # (n_cls, E), once for the whole test set
    return dict(logits=torch.cat([model(b, text_features=g) for b in batches]))


@torch.no_grad()
def eval_ref(model, batches):
    return dict(logits=torch.cat([ref_coop_logits(model, b) for b in batches]))


def settings(args):
    """CLIP config, class names, batch sizes and each method's options for the chosen model."""
    methods = dict(coop=coop, cocoop=cocoop, maple=maple, kgcoop=kgcoop, promptsrc=promptsrc)
    options = {m: {k: v for k, v in module.DEFAULTS.items() if k in (
        "n_ctx", "ctx_init", "csc", "class_token_position", "prompt_depth", "w", "n_ctx_text",
        "n_ctx_vision", "text_depth", "vision_depth", "text_loss_weight", "image_loss_weight",
        "gpa_mean", "gpa_std")}  # paper defaults
        for m, module in methods.items()}
    if args.quick:  # the tiny CLIP has 2 layers per tower
        options["maple"]["prompt_depth"] = 2
        options["promptsrc"].update(text_depth=2, vision_depth=2)
        return TINY, CALTECH101[:10], dict(coop=4, cocoop=2, maple=2, kgcoop=4, promptsrc=2,
                                           eval=8), options
    if args.model == "toy":  # the default toy run (train.py with no arguments) of each method
        import config
        import train
        from toy import pretrain, world
        cfg = {m: config.resolve(train.parser.parse_args(["--method", m]), train.METHODS)
               for m in methods}
        base = world.TASK["classes"][:(len(world.TASK["classes"]) + 1) // 2]  # the base half
        return (pretrain.CONFIG, base, dict({m: c["batch_size"] for m, c in cfg.items()},
                                            eval=cfg["coop"]["eval_batch_size"]),
                {m: {k: c[k] for k in c["model_options"]} for m, c in cfg.items()})
    names = (CALTECH101 * (args.classes // 100 + 1))[:args.classes]  # cycled beyond 100
    return VIT_B16, names, dict(coop=32, cocoop=4, maple=4, kgcoop=128, promptsrc=4,
                                eval=100), options


def build_case(args, case):
    """-> (model, step, ours, ref, inputs): step(fn, inputs) runs one step of path fn."""
    config, names, batch, options = settings(args)
    torch.manual_seed(0)  # the same weights, prompts and inputs in every process
    clip_model = CLIP(**config).to(args.device)
    method, evaluation = case.split("-")[0], case.startswith("coop-eval")
    B = batch["eval" if evaluation else method]
    if case.endswith("-big"):  # ImageNet's 1000 classes
        names = (CALTECH101 * (args.big_classes // 100 + 1))[:args.big_classes]
    if case in ("coop-big", "cocoop-b1"):  # CoOp #12 (ImageNet OOM at batch 1); CoCoOp's paper
        B = 1
    model_class = dict(coop=coop.CoOp, cocoop=cocoop.CoCoOp, maple=maple.MaPLe,
                       kgcoop=kgcoop.KgCoOp, promptsrc=promptsrc.PromptSRC)[method]
    model = model_class(clip_model, names, **options[method]).to(args.device).train()
    n, gen = config["image_resolution"], torch.Generator().manual_seed(1)
    if evaluation:
        batches = [torch.randn(B, 3, n, n, generator=gen).to(args.device)
                   for _ in range(1 if case.endswith("-big") else args.eval_batches)]
        return model, lambda fn, x: fn(model, x), eval_ours, eval_ref, batches
    images = torch.randn(B, 3, n, n, generator=gen).to(args.device)  # (B, 3, H, W)
    labels = torch.randint(len(names), (B,), generator=gen).to(args.device)  # (B,)
    if method in ("kgcoop", "promptsrc"):  # "reference": CoOp or IVLP, the same prompts
        base = base_of(model, names, options[method]["ctx_init"])
        return (model, lambda fn, x: fn(*x), lambda *x: method_step(model, base, *x),
                lambda *x: method_step(None, base, *x), (images, labels))
    ref = dict(coop=ref_coop_logits, cocoop=ref_cocoop_logits, maple=ref_maple_logits)[method]
    return (model, lambda fn, x: train_step(model, fn, *x), model,
            lambda images: ref(model, images), (images, labels))


# ---------------------------------------------------------------------------------------------
# Running: every job (case, "both" | "ours" | "ours-ckpt") in a fresh process; main() collects
# and prints.

def memory_mb():
    """This process's peak resident set size so far, MB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10


def run_job(args, case, job, out):
    """One case in this process, results and outputs saved to `out`. job "both": the reference
    then ours, alternating step by step (a ratio of neighbouring steps in one process is steadier
    than one across processes); the reference runs first, so its peak memory is its own. job
    "ours" / "ours-ckpt": ours alone (with checkpointing), for its own peak memory."""
    model, step, ours, ref, inputs = build_case(args, case)
    for block in model.clip_model.transformer.resblocks:
        block.checkpoint = job == "ours-ckpt"  # what train.py --checkpointing does
    paths = dict(ref=ref, ours=ours) if job == "both" else {"ours": ours}
    cuda = args.device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else lambda: None
    big = case.endswith("-big")  # 1000 classes: no warm-up and one timed step (minutes on a CPU)
    small = [inputs[0][:1]] if case.startswith("coop-eval") else (inputs[0][:1], inputs[1][:1])
    res = {path: dict(seconds=[], cpu_seconds=[]) for path in paths}
    timed, i = job == "both" and not big, 0  # the speed-ups come from the "both" jobs
    while i == 0 or timed and not enough(args, res, i):
        for path, fn in paths.items():
            r = res[path]
            if i == 0:  # memory above what the process holds now (model, inputs)
                sync()
                if cuda:
                    torch.cuda.reset_peak_memory_stats()
                r["base_mb"] = torch.cuda.memory_allocated() / 2**20 if cuda else memory_mb()
                if not big:
                    step(fn, small)  # warm-up on one image
            sync()
            t0, c0 = time.perf_counter(), time.process_time()
            result = step(fn, inputs)
            sync()
            r["seconds"].append(time.perf_counter() - t0)
            r["cpu_seconds"].append(time.process_time() - c0)  # this process, all threads
            if i == 0:  # CPU: peak RSS, a high-water mark, hence the first path's own only
                r["step_mb"] = (torch.cuda.max_memory_allocated() / 2**20 if cuda else
                                memory_mb()) - r["base_mb"]
                r["outputs"] = to_cpu(result)
        i += 1
    for r in res.values():
        r["seconds"], r["cpu_seconds"] = (statistics.median(r[k]) for k in ("seconds",
                                                                           "cpu_seconds"))
    o = res["ours"]
    print(f"  {case}: reference {res['ref']['seconds']:.3g} s, {res['ref']['step_mb']:.0f} MB; "
          f"ours {o['seconds']:.3g} s; median of {i} step(s)" if job == "both" else
          f"  {case}, {job}: {o['seconds']:.3g} s, {o['step_mb']:.0f} MB", flush=True)
    torch.save(res, out)


def enough(args, res, steps):
    """Timed enough? At least --steps steps, then more (at most 10) until one path has run
    --min-seconds in all: one CPU step of seconds varies by 10-30% on a shared machine."""
    return steps >= args.steps and (steps >= 10 or max(
        sum(r["seconds"]) for r in res.values()) >= args.min_seconds)


def to_cpu(x):
    return {k: to_cpu(v) for k, v in x.items()} if isinstance(x, dict) else x.cpu()


def run_jobs(args, jobs, tmp):
    """{(case, job): {path: result}}. One job per fresh process, one at a time, so that memory
    is the job's own and timings do not interfere; --quick (a smoke test, its numbers mean nothing)
    runs all jobs in one process, to import torch once."""
    for group in [jobs] if args.quick else [[job] for job in jobs]:
        cmd = [sys.executable, os.path.abspath(__file__), *sys.argv[1:], "--worker", tmp,
               *(f"{case}:{path}" for case, path in group)]
        if subprocess.run(cmd, cwd=os.path.dirname(os.path.abspath(__file__))).returncode:
            sys.exit(f"error: benchmark job(s) {group} failed (see above)")
    return {job: torch.load(os.path.join(tmp, "%s_%s.pt" % job), weights_only=False)
            for job in jobs}


def max_diffs(a, b):
    """Max |a - b| of logits, loss and (over every prompt parameter) gradients."""
    d = {k: (a[k] - b[k]).abs().max().item() for k in ("logits", "loss") if k in a}
    if "grads" in a:
        d["grad"] = max((a["grads"][k] - b["grads"][k]).abs().max().item() for k in a["grads"])
    return d


def main(args):
    _, names, batch, _ = settings(args)
    print(f"bench: {args.device}, {'tiny' if args.quick else args.model} CLIP (random weights), "
          f"{len(names)} classes, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"load average {os.getloadavg()[0]:.1f}; medians of at least {args.steps} step(s) "
          f"after a warm-up, more (up to 10) until one path has run {args.min_seconds:g} s",
          flush=True)
    cases = {"coop": f"CoOp step (batch {batch['coop']})",
             "cocoop": f"CoCoOp step (batch {batch['cocoop']})",
             "cocoop-b1": "CoCoOp step (batch 1)",  # the paper's: no per-image loop to save
             "maple": f"MaPLe step (batch {batch['maple']})",
             "kgcoop": f"KgCoOp step (batch {batch['kgcoop']})",
             "promptsrc": f"PromptSRC step (batch {batch['promptsrc']})",
             "coop-eval": f"CoOp eval ({args.eval_batches}x{batch['eval']} images)"}
    if args.big_classes:  # ImageNet-size evaluation, where the per-batch text pass is costly
        cases["coop-eval-big"] = f"  {args.big_classes} classes (1x{batch['eval']})"
    big = [("coop-big", p) for p in ("ours", "ours-ckpt")] if args.big_classes else []
    with tempfile.TemporaryDirectory() as tmp:
        res = run_jobs(args, [(c, job) for c in cases for job in ("both", "ours")] + big, tmp)
    head = (f"{'case':<27}{'ours s':>8}{'ref s':>8}{'speed-up':>9}{'(cpu)':>7}{'ours MB':>8}"
            f"{'ref MB':>8}{'mem ratio':>10}{'max |diff|':>11}")
    print(f"\n{head}\n{'-' * len(head)}")
    diffs = {}
    for case, label in cases.items():
        o, r = res[case, "both"]["ours"], res[case, "both"]["ref"]  # timed side by side
        o_mb = res[case, "ours"]["ours"]["step_mb"]  # ours alone in its process
        diffs[label] = max_diffs(o["outputs"], r["outputs"])
        print(f"{label:<27}{o['seconds']:>8.3g}{r['seconds']:>8.3g}"
              f"{r['seconds'] / o['seconds']:>8.2f}x{r['cpu_seconds'] / o['cpu_seconds']:>6.2f}x"
              f"{o_mb:>8.0f}{r['step_mb']:>8.0f}"
              + (f"{r['step_mb'] / o_mb:>9.2f}x" if o_mb >= 1 else f"{'-':>10}")  # < 1 MB: noise
              + f"{max(diffs[label].values()):>11.1e}")
    print(f"\nevaluation throughput, images/s (class features once vs once per test batch of "
          f"{batch['eval']}):")
    for case, n in (("coop-eval", args.eval_batches * batch["eval"]), ("coop-eval-big", batch[
            "eval"])):
        if (case, "both") in res:
            t = res[case, "both"]
            print(f"  {len(names) if case == 'coop-eval' else args.big_classes} classes: ours "
                  f"{n / t['ours']['seconds']:.1f}, reference {n / t['ref']['seconds']:.1f}")
    extra = {case: res[case, "both"] for case in ("kgcoop", "promptsrc")}
    print("extra cost of the regularisers (a training step's time; their 'ref' is CoOp's or "
          "IVLP's step on the same prompts, whose logits must be equal): KgCoOp "
          f"{extra['kgcoop']['ours']['seconds'] / extra['kgcoop']['ref']['seconds']:.2f}x "
          "CoOp's, PromptSRC "
          f"{extra['promptsrc']['ours']['seconds'] / extra['promptsrc']['ref']['seconds']:.2f}x "
          "IVLP's")
    print("max |diff| by output: " + "; ".join(f"{label}: " + ", ".join(
        f"{k} {v:.1e}" for k, v in d.items()) for label, d in diffs.items()))
    how = "CUDA max_memory_allocated" if args.device.startswith("cuda") else "CPU peak RSS"
    print(f"speed-up: wall clock; (cpu): process CPU time, steadier on a shared machine. MB: peak "
          f"memory of the steps above the loaded model and inputs ({how}; CoOp's process held "
          f"{res['coop', 'ours']['ours']['base_mb']:.0f} MB before them)")
    for job in big:
        r = res[job]["ours"]
        print(f"CoOp, {args.big_classes} classes, batch 1, ours"
              f"{' + checkpointing' if job[1] == 'ours-ckpt' else ''}: {r['seconds']:.1f} s, "
              f"{r['step_mb']:.0f} MB")
    if big:
        print("(the reference is not run with that many classes: it keeps the activations of "
              "all 77 positions of every prompt)")


parser = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
parser.add_argument("--model", default="vit-b16", choices=["vit-b16", "toy"],
                    help="ViT-B/16 sizes, or the toy CLIP with the default toy run's settings")
parser.add_argument("--classes", type=int, default=100, help="classes (vit-b16; default 100)")
parser.add_argument("--steps", type=int, help="at least this many timed steps per case, the "
                    "median is reported "
                    "(default: 1 for vit-b16 on the CPU, 20 for toy (milliseconds each), else 5)")
parser.add_argument("--min-seconds", type=float, default=30, help="time steps until one path "
                    "has run this long in total (at most 10 steps; default 30)")
parser.add_argument("--eval-batches", type=int, default=2, help="test batches (default 2)")
parser.add_argument("--big-classes", type=int, default=1000, help="CoOp evaluation and a CoOp "
                    "step's memory with and without checkpointing at this many classes (default "
                    "1000, ImageNet's); 0 skips them")
parser.add_argument("--quick", action="store_true", help="tiny smoke configuration")
parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)  # DIR CASE:PATH ...

if __name__ == "__main__":
    args = parser.parse_args()
    args.big_classes = 0 if args.quick else args.big_classes
    if args.steps is None:
        args.steps = 1 if args.quick or (args.model == "vit-b16" and args.device == "cpu") else \
            20 if args.model == "toy" else 5
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit(f"error: --device {args.device}, but torch finds no CUDA GPU; use cpu")
    if args.worker:  # DIR CASE:PATH ...: run those jobs here, results to DIR/CASE_PATH.pt
        for job in args.worker[1:]:
            run_job(args, *job.split(":"), os.path.join(args.worker[0], "%s_%s.pt" % tuple(
                job.split(":"))))
    else:
        main(args)
