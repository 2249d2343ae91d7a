"""Linear probe on frozen CLIP image features: the CoOp paper's few-shot baseline.

The other classic way to adapt a pretrained encoder: freeze it, and fit a logistic-regression
classifier (one weight vector w_k and bias b_k per class) on the features of the few labelled
images. It uses the images only: no text encoder, no class names, no prompt. Two consequences
that prompt learning is built to avoid:
- with 1-2 shots each w_k is estimated from 1-2 images, while zero-shot CLIP's classifier is
  the text feature of the class name, a prior learnt from 400M image-text pairs; the CoOp paper
  (main few-shot figure) finds the probe needs about 4 shots to match zero-shot on average,
  and CoOp beats it in the low-shot regime;
- it is a closed-set classifier: there is one w_k per training class and nothing
  to score a class it never saw, so base -> new (the new classes, 未见类别) is impossible by
  construction. CoOp keeps the text encoder as the generator of the classifier, so any class
  name gets a weight (notes: "什么是上下文"), except with class-specific context (csc), which
  holds one context per training class and is tied to those classes like the probe.

    p(y = k | x) = softmax_k(w_k · f(x) + b_k),   f(x) = the L2-normalised image feature
    min_{W,b}  (1/n) Σ_i CE(W f(x_i) + b, y_i) + ‖W‖² / (2 C n)

This is sklearn's LogisticRegression objective (C · Σ CE + ‖W‖²/2, bias unpenalised) divided
by C·n: the same minimiser, better scaled. Protocol (CoOp:lpclip/linear_probe.py):
L-BFGS with at most 1000 iterations; C from {1e6, 1e4, 1e2, 1, 1e-2, 1e-4, 1e-6} by validation
accuracy, then 8 steps of log-space bisection around the best C; the last step's model is used.

Symbol -> code: w_k, b_k <-> head.weight[k], head.bias[k];  f(x) <-> normalised
clip_model.encode_image(x);  C <-> inverse regularisation strength, chosen by fit().
Shape legend: n feature rows, B images, n_cls classes, E joint embedding dim.
Run: python train.py --method linearprobe     (all classes: the fewshot protocol by default)
"""
import math

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import clip

DEFAULTS = dict(
    protocol="fewshot",  # closed-set: the all-class protocol (see per_class)
    normalize=True,  # L2-normalise the features (as every method here; see NOTE in features())
    c_grid=(1e6, 1e4, 1e2, 1.0, 1e-2, 1e-4, 1e-6),  # CoOp:lpclip/linear_probe.py search_list
    search_steps=8,  # lpclip/linear_probe.py --num_step 8 (bisection steps)
    max_iter=1000,  # lpclip/linear_probe.py LogisticRegression(max_iter=1000)
)


def fit_logistic(x, y, n_cls, C, max_iter=1000):
    """Multinomial L2 logistic regression by full-batch L-BFGS, in float64.
    x (n, E) features, y (n,) labels -> weight (n_cls, E), bias (n_cls,)."""
    x, y = x.double(), y.long().to(x.device)
    weight = torch.zeros(n_cls, x.shape[1], dtype=x.dtype, device=x.device,
                         requires_grad=True)  # (n_cls, E)
    bias = torch.zeros(n_cls, dtype=x.dtype, device=x.device, requires_grad=True)  # (n_cls,)
    # history_size 10 and the strong-Wolfe line search: scipy's L-BFGS-B (sklearn's solver)
    # keeps 10 corrections and also searches for a step satisfying the Wolfe conditions.
    opt = torch.optim.LBFGS([weight, bias], lr=1, max_iter=max_iter, history_size=10,
                            tolerance_grad=1e-6, tolerance_change=1e-12,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(x @ weight.t() + bias, y) + \
            weight.pow(2).sum() / (2 * C * len(y))  # the objective in the docstring
        loss.backward()
        return loss

    opt.step(closure)  # one call runs up to max_iter L-BFGS iterations
    return weight.detach(), bias.detach()


def accuracy(weight, bias, x, y):
    return ((x.to(weight) @ weight.t() + bias).argmax(dim=-1) == y.to(x.device)).float().mean()


def fit(train_x, train_y, val_x, val_y, n_cls, c_grid=DEFAULTS["c_grid"],
        search_steps=DEFAULTS["search_steps"], max_iter=DEFAULTS["max_iter"]):
    """Choose C on the validation features and fit: -> (weight (n_cls, E), bias (n_cls,), C).
    Grid search, then the official bisection: each step fits both ends of a log-space interval
    (first [C*/10, 10 C*] around the best grid value C*), keeps the better end (the lower one
    on a tie) and halves the interval towards it."""
    if len(val_y) == 0 or len(train_y) == 0:
        raise ValueError("the linear probe needs training and validation images (C is chosen "
                         f"on validation); got {len(train_y)} and {len(val_y)}")

    def trial(C):
        weight, bias = fit_logistic(train_x, train_y, n_cls, C, max_iter)
        return accuracy(weight, bias, val_x, val_y).item(), weight, bias, C

    # Thousands of L-BFGS steps on a (shots x E) problem: one thread, because waking a pool of
    # threads costs more than the arithmetic (and stalls badly on a busy CPU).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        results = [trial(C) for C in c_grid]
        best = max(results, key=lambda r: r[0])  # first maximum, as np.argmax
        lo, hi = math.log10(best[3]) - 1, math.log10(best[3]) + 1
        for _ in range(search_steps):
            left, right = trial(10 ** lo), trial(10 ** hi)
            # NOTE(official code): the last step's better end is the result, even if an
            # earlier C scored higher on validation.
            if left[0] < right[0]:
                best, lo = right, (lo + hi) / 2
            else:
                best, hi = left, (lo + hi) / 2
    finally:
        torch.set_num_threads(threads)
    return best[1], best[2], best[3]


class LinearProbe(nn.Module):
    """Frozen CLIP image encoder + a linear head fitted by fit(): forward(images) -> logits."""

    def __init__(self, clip_model, classnames, normalize=True, c_grid=DEFAULTS["c_grid"],
                 search_steps=DEFAULTS["search_steps"], max_iter=DEFAULTS["max_iter"]):
        super().__init__()
        clip_model.requires_grad_(False)
        self.clip_model = clip_model
        self.classnames = list(classnames)  # only for printing: the probe never reads them
        self.normalize, self.c_grid = normalize, tuple(c_grid)
        self.search_steps, self.max_iter = search_steps, max_iter
        self.head = nn.Linear(clip_model.visual.output_dim, len(self.classnames))  # (n_cls, E)
        # Fitted in closed form by fit() (train.py calls it instead of its SGD loop): nothing
        # requires grad.
        self.head.requires_grad_(False)
        self.C = None

    # One weight vector per training class: a closed-set classifier that cannot score other
    # classes (train.py refuses base -> new and another dataset's classes for it).
    per_class = True

    def train(self, mode=True):
        super().train(mode)
        self.clip_model.eval()  # frozen, BatchNorm statistics included
        return self

    @torch.no_grad()
    def features(self, images):
        f = self.clip_model.encode_image(images).float()  # (B, E)
        # NOTE(departure): CoOp's lpclip/feat_extractor.py fits on raw clip_model.visual
        # features; we normalise, as CLIP and every prompt method here compare cosines.
        return F.normalize(f, dim=-1) if self.normalize else f

    @torch.no_grad()
    def extract(self, loader):
        """Features and labels of a loader of (images, labels): (n, E), (n,). Use test-time
        transforms: lpclip extracts every split without augmentation. Under DDP (torchrun),
        each process reads every world-th image: the features are gathered back into the
        one-process order, so that every process fits the same head."""
        device = self.head.weight.device
        out = [(self.features(images.to(device)).cpu(), labels)  # (B, E), (B,)
               for images, labels in loader]
        x, y = torch.cat([f for f, _ in out]), torch.cat([y for _, y in out])  # (n, E), (n,)
        if dist.is_available() and dist.is_initialized():
            parts = [None] * dist.get_world_size()
            dist.all_gather_object(parts, (x, y))
            W, n = len(parts), sum(len(p[1]) for p in parts)  # item j was read by rank j % W
            x = torch.stack([parts[j % W][0][j // W] for j in range(n)])  # (n, E)
            y = torch.stack([parts[j % W][1][j // W] for j in range(n)])  # (n,)
        return x, y

    def fit(self, train_loader, val_loader):
        """Extract features once, choose C and fit the head; prints and returns (C, val
        accuracy %). The loaders must give un-augmented (test-transformed) images: lpclip
        extracts every split without augmentation."""
        train_x, train_y = self.extract(train_loader)
        val_x, val_y = self.extract(val_loader)
        weight, bias, self.C = fit(train_x, train_y, val_x, val_y, len(self.classnames),
                                   self.c_grid, self.search_steps, self.max_iter)
        self.head.weight.copy_(weight)
        self.head.bias.copy_(bias)
        val_acc = 100.0 * accuracy(weight, bias, val_x, val_y).item()
        print(f"linear probe: C {self.C:.3g}, validation accuracy {val_acc:.1f}%")
        return self.C, val_acc

    def forward(self, images):
        f = self.features(images)  # (B, E)
        return self.head(f.to(self.head.weight.dtype))  # (B, n_cls)


if __name__ == "__main__":
    # Self-check: a tiny random CLIP's probe, then a fit on 4 well-separated feature clusters.
    torch.manual_seed(0)
    tiny = clip.CLIP(embed_dim=32, image_resolution=32, vision_layers=2, vision_width=64,
                     vision_patch_size=8, context_length=77, vocab_size=49408,
                     transformer_width=64, transformer_heads=1, transformer_layers=2)
    probe = LinearProbe(tiny, ["cat", "dog", "red fox", "golden_retriever", "airplane"])
    n_train = sum(p.numel() for p in probe.parameters() if p.requires_grad)
    print(f"logits {tuple(probe(torch.randn(2, 3, 32, 32)).shape)}, trainable parameters "
          f"{n_train} (the head's {probe.head.weight.numel() + probe.head.bias.numel()} "
          "values are fitted by L-BFGS, not by SGD)")
    means = F.normalize(torch.randn(4, 32), dim=-1)  # (n_cls, E)
    y = torch.arange(4).repeat(8)  # (n,)
    x = F.normalize(means[y] + 0.05 * torch.randn(len(y), 32), dim=-1)  # (n, E)
    weight, bias, C = fit(x[:16], y[:16], x[16:], y[16:], 4, max_iter=100)
    print(f"separable clusters: C {C:.3g}, validation accuracy "
          f"{accuracy(weight, bias, x[16:], y[16:]).item():.2f}")
