"""Zero-shot CLIP: hand-written prompts, nothing learned (the baseline every method starts from).

Alec Radford et al. Learning Transferable Visual Models From Natural Language Supervision.
ICML 2021. Prompts and ensembling as CoOp's trainers/zsclip.py evaluates them.

CLIP classifies an image by comparing it with one text per class, written from a hand-crafted
template (手写模板) such as "a photo of a {}.". No weight is trained: the class text features
are the classifier. The catch the notes point out is that the template is found by prompt
engineering (人肉调参): "a photo of a {}." and "a close-up photo of a {}." can differ by points
of accuracy, each dataset wants its own, and the only way to find one is to try sentences by
hand on validation data. CoOp and its successors replace the template's words by learned
vectors; this file is what they are compared with.

    g_i = normalise(text_encoder(template.format(class_i)))        one template
    g_i = normalise(mean_t normalise(text_encoder(t.format(class_i))))   prompt ensembling
    p(y = i | x) = exp(cos(f(x), g_i) / tau) / sum_j exp(cos(f(x), g_j) / tau)

Shape legend: B images, n_cls classes, T templates, L text positions (77), E joint dim.

Notes: prompt-learning-notes.md, "什么是上下文" (hand-crafted template) and "为什么不手动去调整
prompt" (prompt engineering).
Run: python train.py --method zeroshot --dataset oxford_pets --root DATA [--ensemble]
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

import clip

PHOTO = clip.PHOTO  # "a photo of a {}.": CLIP's and CoOp's default (datasets have their own)
# CoOp:trainers/zsclip.py IMAGENET_TEMPLATES_SELECT: 7 of CLIP's 80 ImageNet templates, the
# ensemble of `ensemble=True` (CoOp's ZeroshotCLIP2 adds the dataset's own template, except for
# ImageNet).
ENSEMBLE_TEMPLATES = ["itap of a {}.", "a bad photo of the {}.", "a origami {}.",
                      "a photo of the large {}.", "a {} in a video game.", "art of the {}.",
                      "a photo of the small {}."]


# train.py passes these to ZeroShot(...); template None: the dataset's own (CoOp:trainers/
# zsclip.py CUSTOM_TEMPLATES). Nothing is trained.
DEFAULTS = dict(template=None, ensemble=False)


class ZeroShot(nn.Module):
    """Frozen CLIP + hand-written prompts. forward(images) -> logits (B, n_cls). `template`: one
    template; `ensemble`: the 7 ENSEMBLE_TEMPLATES too (plus `template` unless it is None), the
    normalised text features averaged and normalised again (prompt ensembling)."""

    def __init__(self, clip_model, classnames, template=PHOTO, ensemble=False):
        super().__init__()
        templates = (ENSEMBLE_TEMPLATES if ensemble else []) + ([template] if template else [])
        if not templates:
            raise ValueError("no template: pass a template, or ensemble=True")
        for t in templates:
            clip.check_template(t)  # one {} for the class name
        self.clip_model = clip_model.requires_grad_(False)
        self.per_class = False  # nothing learned
        names = [c.replace("_", " ") for c in classnames]
        try:
            tokens = [clip.tokenize([t.format(c) for c in names], clip_model.context_length)
                      for t in templates]  # T x (n_cls, L)
        except RuntimeError as e:  # a class name and its template over the context length
            raise ValueError(f"{e} Shorten the class name or the template.") from None
        self.register_buffer("tokens", torch.stack(tokens).to(clip_model.logit_scale.device),
                             persistent=False)  # (T, n_cls, L)

    def text_features(self):
        """The classifier g (n_cls, E): it does not depend on the image, so evaluation computes
        it once for all test batches."""
        feats = torch.stack([F.normalize(self.clip_model.encode_text(t), dim=-1)
                             for t in self.tokens])  # (T, n_cls, E)
        return F.normalize(feats.mean(0), dim=-1)  # (n_cls, E)

    def forward(self, images, text_features=None):
        f = F.normalize(self.clip_model.encode_image(images), dim=-1)  # (B, E)
        g = self.text_features() if text_features is None else text_features  # (n_cls, E)
        return self.clip_model.logit_scale.exp() * f @ g.t()  # (B, n_cls)


if __name__ == "__main__":  # self-check on a tiny random CLIP: no weights, no data
    torch.manual_seed(0)
    tiny = clip.CLIP(embed_dim=32, image_resolution=32, vision_layers=2, vision_width=64,
                     vision_patch_size=8, context_length=77, vocab_size=49408,
                     transformer_width=64, transformer_heads=1, transformer_layers=2)
    names = ["cat", "dog", "sea_lion", "fox", "golden retriever"]
    model = ZeroShot(tiny.eval(), names, PHOTO, ensemble=True)
    with torch.no_grad():
        logits = model(torch.randn(2, 3, 32, 32))  # (B, 3, H, W) -> (B, n_cls)
    print("templates", len(model.tokens), "logits", tuple(logits.shape))
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"trainable parameters {n:,}")
