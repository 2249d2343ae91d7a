"""How CLIP was trained, in miniature: contrastive pretraining of a tiny CLIP on the toy world.

CLIP (Radford et al. 2021, arXiv:2103.00020) learns an image encoder f and a text encoder g from
(image, caption) pairs alone. For a batch of B pairs it compares every image with every caption,

    logits[i, j] = exp(t) * <f(x_i)/|f(x_i)|, g(y_j)/|g(y_j)|>        (B, B)

and asks each image to pick its own caption among the B captions, and each caption its own
image: the symmetric InfoNCE loss, (CE(logits, I) + CE(logits^T, I)) / 2. The temperature is
learned as a log (t = logit_scale, initialised at log(1/0.07), clipped at log(100) as in the
paper, Sec. 2.5). Nothing else: no labels, no classes. Classes appear only later, when a
template such as "a photo of a {}." turns class names into captions (zero-shot transfer).

Here the "internet" is `toy.world`: every batch is freshly rendered, so the model never sees an
image twice. The model is `clip.model.CLIP` in OpenAI's layout (a ViT image tower, CLIP's real
BPE tokenizer and 49,408-token table), saved as a plain fp16 state dict that `clip.load` reads.

    python -m toy.pretrain --device cuda --seed 0     # the shipped weights: ~3 min on one H200
    python -m toy.pretrain --device cpu --steps 300 --batch-size 128 --out /tmp/t.pt  # a look

The default recipe (5,500 steps of 1,024 pairs, 5.6M pairs) is bound by rendering: ~31k pairs/s
with 14 rendering processes beside one H200. Zero-shot accuracy on the Toy task levels off after
about 2,000 steps. On a 2-core CPU the same recipe would take many hours.

Shape legend: B pairs in a batch, L text positions (77), E joint embedding dim, R image side.
"""
import argparse
import math
import os
import time

import numpy as np
import torch
import torch.nn.functional as F

import clip
from clip.model import CLIP
from toy import world

# The tiny CLIP. Widths are multiples of 64 because OpenAI's build_model infers heads = width//64.
# The text width is 64: the 49,408 x D token table dominates the file (6.3 MB in fp16 at D=64).
CONFIG = dict(embed_dim=128, image_resolution=world.RES, vision_layers=6, vision_width=128,
              vision_patch_size=4, context_length=77, vocab_size=49408, transformer_width=64,
              transformer_heads=1, transformer_layers=4)


class Pairs(torch.utils.data.IterableDataset):
    """An endless stream of batches (uint8 images (B, 3, R, R), tokens (B, L)). Each DataLoader
    worker renders its own batches from its own seed, so rendering runs beside training."""

    def __init__(self, batch_size, seed):
        self.batch_size, self.seed = batch_size, seed

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        rng = np.random.default_rng([self.seed, info.id if info else 0])
        while True:
            images, captions = world.sample_pretraining_batch(rng, self.batch_size)
            yield (torch.from_numpy(images).permute(0, 3, 1, 2),  # (B, R, R, 3) -> (B, 3, R, R)
                   clip.tokenize(captions))  # (B, L)


def normalize(images, device):
    """uint8 (B, 3, R, R) -> CLIP-normalised floats, as `clip.load`'s preprocess would give."""
    mean = torch.tensor(clip.MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(clip.STD, device=device).view(1, 3, 1, 1)
    return (images.to(device).float() / 255 - mean) / std


def clip_loss(model, images, tokens):
    """The symmetric InfoNCE loss over a batch of B matching pairs."""
    img = F.normalize(model.encode_image(images), dim=-1)  # (B, E)
    txt = F.normalize(model.encode_text(tokens), dim=-1)  # (B, E)
    logits = model.logit_scale.exp() * img @ txt.t()  # (B, B): image i vs caption j
    target = torch.arange(len(logits), device=logits.device)  # pair i matches caption i
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2


@torch.no_grad()
def zero_shot(model, device, template=world.TEMPLATE):
    """Zero-shot accuracy on the Toy task's test split: base classes among base classes, new
    among new, as in the base-to-new protocol. Returns (base %, new %)."""
    model.eval()
    images, labels, _ = world.task_split("test")
    classes = world.TASK["classes"]
    n_base = math.ceil(len(classes) / 2)
    accs = []
    for part in (np.arange(n_base), np.arange(n_base, len(classes))):
        m = np.isin(labels, part)
        x = normalize(torch.from_numpy(images[m]).permute(0, 3, 1, 2), device)  # (N, 3, R, R)
        tokens = clip.tokenize([template.format(classes[c]) for c in part]).to(device)
        img = F.normalize(model.encode_image(x).float(), dim=-1)  # (N, E)
        txt = F.normalize(model.encode_text(tokens).float(), dim=-1)  # (n_cls, E)
        pred = part[(img @ txt.t()).argmax(-1).cpu().numpy()]
        accs.append(100.0 * (pred == labels[m]).mean())
    model.train()
    return tuple(accs)


def make_optimizer(model, lr, weight_decay):
    """AdamW as CLIP used it (betas 0.9/0.98, eps 1e-6), decaying only weight matrices: not
    gains, biases, embeddings, or the temperature."""
    decay, rest = [], []
    for name, p in model.named_parameters():
        matrix = p.ndim >= 2 and "embedding" not in name
        (decay if matrix else rest).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.98), eps=1e-6)


def lr_at(progress, lr, warmup=0.05):
    """Linear warmup, then cosine decay to zero (CLIP's schedule); progress runs from 0 to 1."""
    if progress < warmup:
        return lr * progress / warmup
    return 0.5 * lr * (1 + math.cos(math.pi * (progress - warmup) / (1 - warmup)))


def save(model, path):
    """A plain OpenAI-layout state dict in fp16, readable by clip.load / clip.build_model."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    torch.save({k: v.detach().half().cpu() for k, v in model.state_dict().items()}, path)
    return os.path.getsize(path) / 2 ** 20


def build(overrides):
    """A freshly initialised CLIP of CONFIG, with "KEY=INT" overrides."""
    config = dict(CONFIG)
    for item in overrides:
        key, _, value = item.partition("=")
        if key not in CONFIG or not value.isdigit():
            raise SystemExit(f"--model {item!r}: expected KEY=INT with KEY one of {list(CONFIG)}")
        config[key] = int(value)
    config["transformer_heads"] = config["transformer_width"] // 64  # as build_model infers
    return CLIP(**config)


def train(model, args, device):
    """The training loop: fresh batches, InfoNCE, AdamW, cosine schedule, temperature clip."""
    opt = make_optimizer(model, args.lr, args.weight_decay)
    loader = torch.utils.data.DataLoader(Pairs(args.batch_size, args.seed), batch_size=None,
                                         num_workers=args.workers, pin_memory=device.type == "cuda",
                                         prefetch_factor=4 if args.workers else None)
    # bf16 autocast on the GPU (no loss scaling needed, unlike fp16); plain fp32 on the CPU.
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    t0, seen = time.time(), 0
    for step, (images, tokens) in enumerate(loader):
        progress = step / args.steps
        if args.time_limit:
            progress = max(progress, (time.time() - t0) / (60 * args.time_limit))
        if progress >= 1:
            return step, time.time() - t0
        for group in opt.param_groups:
            group["lr"] = lr_at(progress, args.lr)
        with autocast:
            loss = clip_loss(model, normalize(images, device), tokens.to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():  # CLIP clips the temperature so that exp(t) <= 100
            model.logit_scale.clamp_(0, math.log(100))
        seen += len(images)
        if step % 100 == 0 or step == args.steps - 1:
            print(f"step {step:6d}  loss {loss.item():.4f}  temperature "
                  f"1/{model.logit_scale.exp().item():.1f}  "
                  f"{seen / (time.time() - t0):.0f} pairs/s", flush=True)
        if (step + 1) % args.eval_every == 0:
            print("  zero-shot base %.1f%%  new %.1f%%" % zero_shot(model, device), flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--steps", type=int, default=5500)
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=0.2)
    p.add_argument("--time-limit", type=float, default=None, metavar="MINUTES",
                   help="end by then: the schedule follows max(step/steps, time/limit); "
                        "leave it out for a reproducible run")
    p.add_argument("--workers", type=int, default=max(1, min(14, (os.cpu_count() or 2) - 2)),
                   help="rendering processes (the GPU run is bound by rendering)")
    p.add_argument("--eval-every", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", nargs="*", default=[], metavar="KEY=INT",
                   help="override CONFIG entries, e.g. --model vision_layers=4 vision_width=192")
    p.add_argument("--out", default=os.path.join("clip", "weights", "toy-vit.pt"))
    args = p.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda was asked for, but PyTorch sees no GPU; use --device cpu")
    torch.manual_seed(args.seed)
    torch.backends.cuda.matmul.allow_tf32 = True
    model = build(args.model).to(device).train()
    n = sum(p.numel() for p in model.parameters())
    print(f"tiny CLIP: {n / 1e6:.2f}M parameters ({2 * n / 2 ** 20:.1f} MiB in fp16), "
          f"{args.workers} rendering workers, device {device}")
    if device.type == "cpu" and args.steps * args.batch_size > 1e6:
        print("note: on a CPU this takes hours (about 100-300 pairs/s on 2 cores); "
              "for a quick look: --steps 300 --batch-size 128", flush=True)
    steps, seconds = train(model, args, device)
    size = save(model, args.out)
    print(f"saved {args.out} ({size:.1f} MiB) after {steps} steps, {seconds:.0f} s")
    chance = 100 / math.ceil(len(world.TASK["classes"]) / 2)
    for template in (world.TEMPLATE, "an outline of a {}."):  # the gap context can close
        base, new = zero_shot(model, device, template)
        print(f"zero-shot on the Toy test split with {template!r}: base {base:.1f}%  "
              f"new {new:.1f}%  (chance {chance:.1f}%)")


if __name__ == "__main__":
    main()
