"""Full fine-tuning (全参数微调) of CLIP on few shots: what prompt learning argues against.

The obvious way to adapt CLIP to a downstream task: keep its zero-shot classifier (the text
features of "a photo of a {class}." for every class) and train the encoders themselves, by
cross-entropy on the few labelled images. The notes ("Clip的缺点") give two reasons why the
CoOp line does not do this, and this file lets you watch both happen:
- overfitting (过拟合): ~150M free parameters (ViT-B/16) against a few hundred images fit the
  shots, backgrounds and all (the notes' student who memorises ten answers);
- catastrophic forgetting (灾难性遗忘): every gradient comes from the base classes, so nothing
  tells the encoders to keep what pre-training taught about other concepts. The notes fine-tune
  on cats vs. dogs and then "a photo of an airplane" stops working. Here the new classes play
  the airplane: they are scored with the same fine-tuned encoders and their own names.
Prompt learning (coop.py, cocoop.py, maple.py) freezes both encoders and trains only its prompt
parameters (thousands for CoOp, 3.55M for MaPLe) instead. On the toy base -> new run (seeds
1-3, zero-shot 77.3 / 85.4) 10 epochs help both halves (base 89.5, new 95.1): the shots teach
the outline style that the new classes share. Train longer and the notes' picture appears, as
a trend rather than on every seed: new-class accuracy falls to 88.0 after 25 epochs and 82.5
after 50 (below zero-shot on two of three seeds: forgetting), while base accuracy sinks back
to 84.0 (overfitting to the shots and their scenes).

    logits_i(x) = exp(logit_scale) * cos(f_θ(x), g_φ(t_i)),   t_i = "a photo of a {class_i}."
    θ (and φ with "all") <- SGD on cross-entropy over the base shots; logit_scale stays frozen.

What is trained (`finetune_part`):
    "all"     both towers: clip_model.visual, token_embedding, positional_embedding,
              transformer, ln_final, text_projection (everything but logit_scale)
    "image"   the image encoder clip_model.visual only; the text features stay zero-shot's
    "last:N"  the image encoder's last N blocks and its head (ViT: ln_post, proj; ResNet: the
              last N bottlenecks of layer1..layer4 in order, then attnpool)

Memory: "all" on ViT-B/16 trains ~150M parameters: weights, gradients and SGD momentum
take ~1.8 GB in fp32, plus the activations of both towers (the text tower runs all n_cls
prompts with gradients in every step). Checkpoints hold the whole trained part: ~600 MB for
"all" (checkpoint.pt with momentum twice that), instead of CoOp's kilobytes.

Shape legend: B images, n_cls classes, L text positions (77), E joint embedding dim.
Notes: prompt-learning-notes.md, "Clip的缺点" (2.1 overfitting, 2.2 forgetting).
Run: python train.py --method finetune     (toy base -> new; compare with --method zeroshot)
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

import clip

# No official configuration exists: the CoOp, CoCoOp and MaPLe papers argue against full
# fine-tuning and report no run of it. These are our choices, kept inside train.py's loop (SGD,
# momentum 0.9, weight decay 5e-4, one warm-up epoch at 1e-5, then cosine).
DEFAULTS = dict(
    finetune_part="all",  # the notes' "full fine-tuning"; "image" / "last:N" to compare
    template=None,  # the classifier to start from: None = the dataset's zero-shot template
    # SGD, not AdamW (the usual optimiser for fine-tuning CLIP): one loop for every method.
    # SGD's step scales with the gradient, so the rate must be small for pretrained weights:
    # 1e-4, 20x below CoOp's 0.002. Measured on the toy only (3e-4 and 1e-3 damage both
    # halves within 10 epochs); a starting point for the OpenAI backbones, not a tuned value.
    lr=1e-4,
    epochs=10,  # our choice; on the toy 10 epochs help both halves, 50 overfit and forget
    batch_size=32,  # CoOp's (configs/trainers/CoOp/rn50.yaml)
    print_freq=5,  # CoOp's (rn50.yaml TRAIN.PRINT_FREQ)
)

TEXT_TOWER = ["token_embedding", "positional_embedding", "transformer", "ln_final",
              "text_projection"]


def trained_names(clip_model, part):
    """CLIP attribute paths (checkpoint names) of the modules/parameters that `part` trains."""
    if part == "all":
        return ["visual"] + TEXT_TOWER
    if part == "image":
        return ["visual"]
    visual = clip_model.visual
    if hasattr(visual, "transformer"):  # ViT: resblocks, then ln_post on the class token, proj
        blocks = [f"visual.transformer.resblocks.{i}"
                  for i in range(len(visual.transformer.resblocks))]
        head = ["visual.ln_post", "visual.proj"]
    else:  # ModifiedResNet: bottlenecks of layer1..4, then the attention pooling
        blocks = [f"visual.layer{k}.{i}" for k in (1, 2, 3, 4)
                  for i in range(len(getattr(visual, f"layer{k}")))]
        head = ["visual.attnpool"]
    n = part[len("last:"):] if isinstance(part, str) and part.startswith("last:") else ""
    if not n.isdigit() or not 1 <= int(n) <= len(blocks):
        raise ValueError(f"finetune_part must be 'all', 'image' or 'last:N' with N from 1 to "
                         f"{len(blocks)} (the image encoder's blocks), got {part!r}")
    return blocks[-int(n):] + head


def freeze_batchnorm(module):
    """Keep every BatchNorm (RN50 backbones) in eval mode: it normalises with its pretrained
    running statistics. In train mode it would normalise with the statistics of 32 few-shot
    images and overwrite the running ones, which are buffers, not parameters: requires_grad
    does not protect them, so even frozen layers would change. Its affine weights still train.
    CLIP has no dropout, so after this, train and eval mode compute the same function."""
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eval()


class TrainedPart(nn.Module):
    """The trained part of CLIP under CLIP's own names: its state_dict keys are a subset of the
    checkpoint's ("visual.transformer.resblocks.11.attn.in_proj_weight", "text_projection"),
    so saving it saves exactly what fine-tuning changed and loading it writes into CLIP.
    It holds the same Parameter objects as the CLIP model (no copy)."""

    def __init__(self, clip_model, names):
        super().__init__()
        for name in names:
            *path, leaf = name.split(".")
            owner, source = self, clip_model
            for step in path:  # mirror CLIP's nesting with empty container modules
                source = getattr(source, step)
                if step not in owner._modules:
                    owner.add_module(step, nn.Module())
                owner = owner._modules[step]
            obj = getattr(source, leaf)
            if isinstance(obj, nn.Parameter):
                owner.register_parameter(leaf, obj)  # shared with clip_model
            else:
                owner.add_module(leaf, obj)  # shared with clip_model


class FineTune(nn.Module):
    """CLIP with its zero-shot classifier, the part `finetune_part` trainable.

    Fine-tunes `clip_model` in place (no copy: it is large). `trained_part` holds the trained
    tensors under CLIP's names; train.py saves the model's state minus `clip_model`, which is
    exactly that part. Loading it into a FineTune built for other class names evaluates the
    fine-tuned encoders on those classes."""

    def __init__(self, clip_model, classnames, finetune_part="all", template=clip.PHOTO):
        super().__init__()
        names = trained_names(clip_model, finetune_part)  # checks finetune_part first
        clip.check_template(template)  # one {} for the class name
        clip_model.requires_grad_(False)  # logit_scale and whatever `part` leaves out
        # Registered before clip_model, so named_parameters() reports "trained_part.visual...".
        self.trained_part = TrainedPart(clip_model, names).requires_grad_(True)
        self.clip_model = clip_model
        self.train_text = finetune_part == "all"
        self.per_class = False  # fine-tuned encoders score any classes
        prompts = [template.format(c.replace("_", " ")) for c in classnames]
        # The class prompts' ids depend on the class names: not saved (persistent=False).
        try:
            tokens = clip.tokenize(prompts, clip_model.context_length)  # (n_cls, L)
        except RuntimeError as e:  # a class name and its template over the context length
            raise ValueError(f"{e} Shorten the class name or the template.") from None
        self.register_buffer("tokens", tokens.to(clip_model.logit_scale.device), persistent=False)

    def train(self, mode=True):
        super().train(mode)
        freeze_batchnorm(self)
        return self

    def text_features(self):
        """Normalised class features g_φ(t_i) (n_cls, E): the classifier, recomputed from the
        (fine-tuned) text tower, or without gradients when the text tower is frozen."""
        with torch.set_grad_enabled(self.train_text and torch.is_grad_enabled()):
            g = self.clip_model.encode_text(self.tokens)  # (n_cls, E)
        return F.normalize(g, dim=-1)

    def forward(self, images, text_features=None):
        # Frozen early blocks ("last:N") need no autograd graph and get none: autograd starts
        # recording at the first block whose parameters require gradients.
        f = F.normalize(self.clip_model.encode_image(images), dim=-1)  # (B, E)
        g = self.text_features() if text_features is None else text_features  # (n_cls, E)
        return self.clip_model.logit_scale.exp() * f @ g.t()  # (B, n_cls)


if __name__ == "__main__":
    # Self-check with a tiny random CLIP: one SGD step per part, then what changed.
    for part in ("all", "image", "last:1"):
        torch.manual_seed(0)
        tiny = clip.CLIP(embed_dim=32, image_resolution=32, vision_layers=2, vision_width=64,
                         vision_patch_size=8, context_length=77, vocab_size=49408,
                         transformer_width=64, transformer_heads=1, transformer_layers=2)
        before = {k: v.clone() for k, v in tiny.state_dict().items()}
        model = FineTune(tiny, ["cat", "dog", "red fox", "golden_retriever", "airplane"],
                         finetune_part=part).train()
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.SGD(params, lr=DEFAULTS["lr"], momentum=0.9, weight_decay=5e-4)
        logits = model(torch.randn(2, 3, 32, 32))  # (B, n_cls)
        F.cross_entropy(logits, torch.tensor([0, 3])).backward()
        opt.step()
        changed = {".".join(k.split(".")[:2 if k.startswith("visual.") else 1])
                   for k, v in tiny.state_dict().items() if not torch.equal(v, before[k])}
        print(f"{part}: logits {tuple(logits.shape)}, trainable parameters "
              f"{sum(p.numel() for p in params):,}, saved tensors "
              f"{len(model.trained_part.state_dict())}, changed {sorted(changed)}")
