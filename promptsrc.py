"""PromptSRC: Prompting with Self-regulating Constraints.

Muhammad Uzair Khattak, Syed Talal Wasim, Muzammal Naseer, Salman Khan, Ming-Hsuan Yang, Fahad
Shahbaz Khan. "Self-regulating Prompts: Foundational Model Adaptation without Forgetting". ICCV
2023, arXiv:2307.06948. Official code: muzairkhattak/PromptSRC (trainers/promptsrc.py; its
prompts sit in the IVLP blocks of its forked clip/model.py).

Prompts trained by cross-entropy on a few shots fit those classes and lose what the frozen CLIP
knew: the prompted features drift from CLIP's (forgetting, 灾难性遗忘, now through the prompts),
the class prototypes towards what separates the base classes (prototype distortion, 原型扭曲).
PromptSRC learns IVLP's prompts (ivlp.py: independent deep prompts in both towers) and
regulates them three ways with the frozen CLIP they sit in: (a) mutual agreement: prompted
image and text features stay near the frozen CLIP's (L1), prompted logits near zero-shot
CLIP's (KL); (b) Gaussian-weighted prompt aggregation (GPA): the prompts kept are the prompts
after each epoch, averaged with Gaussian weights over the epochs; (c) textual diversity:
CLIP's text features average 60 templates per class. Model and logits are IVLP's: this file
differs from ivlp.py where the regularisers come in (TEMPLATES, gpa_weights, self_consistency,
end_epoch).

Equations (paper Sec. 3.2; "_p": prompted, none: the frozen CLIP; features normalised):
    f_p = x(image; P~),  g_p,i = z(class i; P)     IVLP's towers with the learned prompts
    f = x(image),  g_i = normalise(1/T Σ_t z(template_t(class i)))   frozen CLIP, T = 60
    y_p = f_p g_p^T / τ,  y = f g^T / τ              the same frozen τ for both
    L = L_ce(y_p, label) + L_SCL,   L_SCL = λ_1 L1(f_p, f) + λ_2 L1(g_p, g) + KL(y || y_p)
    P_GPA = Σ_{e=1..E} w_e P_e,  w_e = N(e; μ, σ) / Σ_{a=1..E} N(a; μ, σ)
            (P_e: every prompt after epoch e; evaluation and the saved run use P_GPA)
NOTE(official code), where the paper is silent or writes otherwise:
  - L1 is F.l1_loss's mean over all elements (n_cls x Dj text, B x Dj image); the paper writes
    sums over the d feature dimensions. KL(y || y_p) of the softmaxes, temperature 1, is
    F.kl_div(..., reduction="sum") / (B n_cls): the batch-mean KL divided by n_cls (the paper
    writes D_KL(y_p, y)).
  - g averages the templates' unnormalised features, then normalises (zeroshot.py's ensemble
    normalises each template's features first).
  - GPA: the Gaussian density at e = 1..E, σ = GPA_STD, normalised to sum 1; the code averages
    the whole state dict, frozen CLIP included (unchanged, up to fp16 rounding, since the
    weights sum to 1); here only the prompts. Its GPA state is not checkpointed (a resumed
    official run never loads P_GPA); here it is (buffers gpa_sum, gpa_epochs).

Symbol -> code:
    M, M~, J, J~ <-> n_ctx_text, n_ctx_vision, text_depth, vision_depth
    P_0, P_1..P_{J-1}, P~_0, P~_1..P~_{J~-1} <-> ctx, compound_prompts_text, vision_ctx,
        compound_prompts_vision (VLPromptLearner)
    z, x <-> PromptSRC.encode_text, encode_image    f_p, g_p, y_p <-> image_features,
        text_features, logits in PromptSRC.forward
    f <-> clip_model.encode_image (no prompts)   g <-> frozen_text_features (computed once)
    y <-> zero_shot_logits in self_consistency   τ <-> 1 / clip_model.logit_scale.exp()
    λ_1, λ_2 <-> image_loss_weight, text_loss_weight   (KL: logit_loss_weight, 1)
    L_SCL's terms <-> loss_terms()["scl_image"], ["scl_text"], ["scl_logits"]
    μ, σ <-> gpa_mean, gpa_std   w_e <-> gpa_weights()   Σ w_e P_e <-> gpa_sum (end_epoch)

Shape legend: B images, n_cls classes, M / M~ learned tokens per layer, L prompt positions
(<= 77), N vision tokens (1 + patches + M~), D / Dv text / vision width (512 / 768, ViT-B/16),
Dj joint dim (512), T templates (60), P learned numbers in all prompts together.

Run: python train.py --method promptsrc --dataset eurosat --root DATA   (base -> new)
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

import clip
from clip.model import VisionTransformer
from clip.tokenizer import encode

# configs/trainers/PromptSRC/vit_b16_c2_ep20_batch4_4+4ctx.yaml (scripts/promptsrc/
# base2new_train.sh, SHOTS=16). The run keys are train.py's, the others PromptSRC(...)'s.
DEFAULTS = dict(
    n_ctx_text=4, n_ctx_vision=4,  # TRAINER.PROMPTSRC.N_CTX_TEXT, N_CTX_VISION
    text_depth=9, vision_depth=9,  # PROMPT_DEPTH_TEXT, PROMPT_DEPTH_VISION
    ctx_init="a photo of a",  # CTX_INIT: all 4 tokens learned
    text_loss_weight=25.0, image_loss_weight=10.0,  # TEXT_LOSS_WEIGHT (λ_2), IMAGE_LOSS_WEIGHT
    logit_loss_weight=1.0,  # NOTE(official code): fixed at 1 in trainers/promptsrc.py, no key
    gpa=True, gpa_mean=15.0, gpa_std=1.0,  # GPA_MEAN, GPA_STD (gpa=False: the last epoch's)
    lr=0.0025, epochs=20, batch_size=4,  # OPTIM.LR, OPTIM.MAX_EPOCH, TRAIN_X.BATCH_SIZE
    shots=16, print_freq=20, backbone="ViT-B/16")  # TRAIN.PRINT_FREQ, MODEL.BACKBONE
# --protocol fewshot: scripts/promptsrc/few_shot.sh, ..._ep50_batch4_4+4ctx_few_shot.yaml (its
# GPA is for ImageNet, Caltech, Pets, Food, UCF, SUN; mean 45, std 5 for the other five). Cross-
# dataset: ..._ep20_batch4_4+4ctx_cross_datasets.yaml (docs/TRAIN.md; xd_train.sh names "ep5").
PROTOCOLS = {"fewshot": dict(epochs=50, gpa_mean=30.0, gpa_std=30.0),
             "crossdataset": dict(text_depth=3, vision_depth=3, gpa_mean=6.0, gpa_std=10.0)}
# Textual diversity: PromptSRC:trainers/imagenet_templates.py IMAGENET_TEMPLATES, 60 of CLIP's
# 80 ImageNet templates (openai/CLIP notebooks/Prompt_Engineering_for_ImageNet.ipynb).
TEMPLATES = [
    "a photo of a {}.", "a bad photo of a {}.", "a photo of many {}.", "a sculpture of a {}.",
    "a photo of the hard to see {}.", "a low resolution photo of the {}.", "a rendering of a {}.",
    "graffiti of a {}.", "a bad photo of the {}.", "a cropped photo of the {}.",
    "a tattoo of a {}.", "the embroidered {}.", "a photo of a hard to see {}.",
    "a bright photo of a {}.", "a photo of a clean {}.", "a photo of a dirty {}.",
    "a dark photo of the {}.", "a drawing of a {}.", "a photo of my {}.", "the plastic {}.",
    "a photo of the cool {}.", "a close-up photo of a {}.", "a black and white photo of the {}.",
    "a painting of the {}.", "a painting of a {}.", "a pixelated photo of the {}.",
    "a sculpture of the {}.", "a bright photo of the {}.", "a cropped photo of a {}.",
    "a plastic {}.", "a photo of the dirty {}.", "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.", "a photo of the {}.", "a good photo of the {}.",
    "a rendering of the {}.", "a {} in a video game.", "a photo of one {}.", "a doodle of a {}.",
    "a close-up photo of the {}.", "the origami {}.", "the {} in a video game.",
    "a sketch of a {}.", "a doodle of the {}.", "a origami {}.", "a low resolution photo of a {}.",
    "the toy {}.", "a rendition of the {}.", "a photo of the clean {}.", "a photo of a large {}.",
    "a rendition of a {}.", "a photo of a nice {}.", "a photo of a weird {}.",
    "a blurry photo of a {}.", "a cartoon {}.", "art of a {}.", "a sketch of the {}.",
    "a embroidered {}.", "a pixelated photo of a {}.", "itap of the {}."]


def _tokenize_prompts(prompts, classnames, context_length, fix="use a shorter ctx_init"):
    """Tokenize one prompt per class; a prompt over CLIP's context raises naming the class."""
    rows = []
    for name, text in zip(classnames, prompts):
        try:
            rows.append(clip.tokenize(text, context_length))  # (1, 77)
        except RuntimeError as e:
            raise ValueError(f"class name {name!r} makes the prompt too long: {e} Shorten the "
                             f"class name, or {fix}.") from None
    return torch.cat(rows)  # (n_cls, 77)


def _context_vectors(embed, n_ctx, ctx_init, D):
    """P_0 (n_ctx, D) from the first n_ctx tokens of ctx_init (or N(0, 0.02) for ctx_init ''),
    and the prompt's words before the class name."""
    device = embed.weight.device  # build on CLIP's device; lookups need ids there
    if ctx_init:
        ctx_init = ctx_init.replace("_", " ")
        init_ids = encode(ctx_init)  # BPE ids of the init words, no SOS/EOT
        if n_ctx > len(init_ids):
            raise ValueError(f"n_ctx_text={n_ctx} is more than the {len(init_ids)} tokens of "
                             f"ctx_init={ctx_init!r}: pass a longer ctx_init, or "
                             "ctx_init='' for random context.")
        # As ivlp.py: the first n_ctx tokens learned (official: random context for n_ctx > 4).
        with torch.no_grad():
            ids = torch.tensor(init_ids[:n_ctx], device=device)  # (n_ctx,)
            return embed(ids).float(), ctx_init  # (n_ctx, D)
    # "X X ... X" reserves n_ctx positions so the EOT lands where the feature is read.
    return torch.randn(n_ctx, D) * 0.02, " ".join(["X"] * n_ctx)  # (n_ctx, D), N(0, 0.02)


def gpa_weights(epochs, mean, std):
    """w_e = N(e; mean, std) / Σ_a N(a; mean, std) for e = 1..epochs (a list, sums to 1),
    computed as a softmax of the Gaussian's exponent: the same numbers, never 0 / 0."""
    e = torch.arange(1, epochs + 1, dtype=torch.float64)  # (E,)
    return torch.softmax(-0.5 * ((e - mean) / std) ** 2, dim=0).tolist()  # E floats


class VLPromptLearner(nn.Module):
    """Text prompts P_0..P_{J-1}, vision prompts P~_0..P~_{J~-1}: all PromptSRC trains (IVLP's)."""

    def __init__(self, clip_model, classnames, n_ctx_text=4, n_ctx_vision=4, text_depth=9,
                 vision_depth=9, ctx_init="a photo of a"):
        super().__init__()
        for name, n, depth in (("n_ctx_text", n_ctx_text, text_depth),
                               ("n_ctx_vision", n_ctx_vision, vision_depth)):
            if depth and (not isinstance(n, int) or n < 1):  # unused where its depth is 0
                raise ValueError(f"{name} must be a positive int, got {n!r}")
        if text_depth and n_ctx_text > clip_model.context_length - 4:  # SOS, name, ".", EOT
            raise ValueError(f"n_ctx_text={n_ctx_text} context tokens do not fit the text "
                             f"encoder's {clip_model.context_length} positions with SOS, a class "
                             f"name, '.' and EOT: pass n_ctx_text <= "
                             f"{clip_model.context_length - 4}")
        D = clip_model.ln_final.weight.shape[0]  # text width, read from the model
        Dv = clip_model.visual.conv1.weight.shape[0]  # vision width (768 ViT-B, 1024 ViT-L)
        embed = clip_model.token_embedding
        device = embed.weight.device  # build on CLIP's device; lookups need ids there
        ctx_vectors, prefix = _context_vectors(embed, n_ctx_text, ctx_init, D)  # (M, D)
        # fp32, cast to CLIP's dtype on entry. NOTE(official code): PREC fp16 runs all in fp16.
        self.ctx = nn.Parameter(ctx_vectors)  # (M, D)   P_0
        self.compound_prompts_text = nn.ParameterList(
            [nn.Parameter(torch.randn(n_ctx_text, D) * 0.02)  # (n_ctx_text, D)   P_i, N(0, 0.02)
             for _ in range(text_depth - 1)])
        self.vision_ctx = (nn.Parameter(torch.randn(n_ctx_vision, Dv) * 0.02)  # P~_0
                           if vision_depth else None)  # (n_ctx_vision, Dv) or None
        self.compound_prompts_vision = nn.ParameterList(
            [nn.Parameter(torch.randn(n_ctx_vision, Dv) * 0.02)  # (n_ctx_vision, Dv)   P~_i
             for _ in range(vision_depth - 1)])
        self.n_ctx_text, self.n_ctx_vision = n_ctx_text, (n_ctx_vision if vision_depth else 0)
        self.text_depth, self.vision_depth = text_depth, vision_depth

        classnames = [name.replace("_", " ") for name in classnames]
        tokens = _tokenize_prompts([f"{prefix} {name}." for name in classnames], classnames,
                                   clip_model.context_length)  # (n_cls, 77)
        L = int(tokens.argmax(dim=-1).max()) + 1  # exact cut after the longest prompt's EOT
        tokens = tokens[:, :L]  # (n_cls, L)
        with torch.no_grad():
            embedding = embed(tokens.to(device)).float()  # (n_cls, L, D)
        # Class-name-dependent and frozen: persistent=False keeps them out of state_dict().
        self.register_buffer("token_prefix", embedding[:, :1], persistent=False)  # (n_cls, 1, D)
        self.register_buffer("token_suffix", embedding[:, 1 + n_ctx_text:],
                             persistent=False)  # (n_cls, L-1-n_ctx_text, D)
        self.register_buffer("tokenized_prompts", tokens, persistent=False)  # (n_cls, L)
        self.to(device)

    def text_prompts(self):
        """Input-layer text prompts [SOS | P_0 | class "." EOT] (n_cls, L, D)."""
        n_cls = self.token_prefix.shape[0]
        ctx = self.ctx.expand(n_cls, -1, -1)  # (n_cls, M, D)
        return torch.cat([self.token_prefix, ctx, self.token_suffix], dim=1)  # (n_cls, L, D)

    def vision_prompts(self):
        """The vision prompts P~_0..P~_{J~-1}: J~ tensors (n_ctx_vision, Dv)."""
        if self.vision_ctx is None:
            return []  # no vision prompts: CLIP's own image encoder
        return [self.vision_ctx, *self.compound_prompts_vision]  # independent of P_i

    def forward(self):
        """All prompts, built once: text prompts (n_cls, L, D) with P_0 in place, the deep text
        prompts [P_1..P_{J-1}], P~_0 (n_ctx_vision, Dv) or None, and the deep vision prompts
        [P~_1..P~_{J~-1}]. Block i of each tower gets entry i-1 of its deep list."""
        vision = self.vision_prompts()  # independent of P_k
        return (self.text_prompts(), list(self.compound_prompts_text),
                vision[0] if vision else None, vision[1:])


class PromptSRC(nn.Module):
    """Frozen CLIP (ViT) + VLPromptLearner: IVLP's logits (B, n_cls), L_SCL's terms for the last
    training batch (loss_terms()), GPA after each epoch (end_epoch())."""
    per_class = False  # no tensor per class: the prompts fit any classes (base -> new)

    def __init__(self, clip_model, classnames, n_ctx_text=4, n_ctx_vision=4, text_depth=9,
                 vision_depth=9, ctx_init="a photo of a", text_loss_weight=25.0,
                 image_loss_weight=10.0, logit_loss_weight=1.0, gpa=True, gpa_mean=15.0,
                 gpa_std=1.0):
        super().__init__()
        if not isinstance(clip_model.visual, VisionTransformer):
            raise ValueError(f"PromptSRC needs a ViT backbone (its vision prompts are image-"
                             f"transformer tokens), not a {type(clip_model.visual).__name__}")
        for name, depth, tower, low in (
                ("text_depth", text_depth, clip_model.transformer, 1),  # the official assert
                ("vision_depth", vision_depth, clip_model.visual.transformer, 0)):
            if not isinstance(depth, int) or not low <= depth <= len(tower.resblocks):
                raise ValueError(f"{name} must be an int in {low}..{len(tower.resblocks)} (the "
                                 f"layers of this CLIP's {name[:-6]} tower), got {depth!r}.")
        for name, value in (("text_loss_weight", text_loss_weight), ("gpa_std", gpa_std),
                            ("image_loss_weight", image_loss_weight),
                            ("logit_loss_weight", logit_loss_weight)):
            if not isinstance(value, (int, float)) or value < 0 or not value and name == "gpa_std":
                raise ValueError(f"{name} must be a number >= 0 (gpa_std > 0), got {value!r}")
        self.clip_model = clip_model.requires_grad_(False).eval()  # frozen, never fine-tuned
        self.prompt_learner = VLPromptLearner(clip_model, classnames, n_ctx_text, n_ctx_vision,
                                              text_depth, vision_depth, ctx_init)
        self.text_loss_weight, self.image_loss_weight, self.logit_loss_weight = \
            text_loss_weight, image_loss_weight, logit_loss_weight  # λ_2, λ_1, the KL's
        self.gpa, self.gpa_mean, self.gpa_std = gpa, gpa_mean, gpa_std
        names = [name.replace("_", " ") for name in classnames]
        with torch.no_grad():  # g: textual diversity, once (the frozen CLIP, no prompts)
            feats = torch.stack([clip_model.encode_text(_tokenize_prompts(
                [t.format(name) for name in names], names, clip_model.context_length,
                fix=f"drop the template {t!r}").to(clip_model.logit_scale.device)).float()
                for t in TEMPLATES])  # (T, n_cls, Dj)
        self.register_buffer("frozen_text_features", F.normalize(feats.mean(0), dim=-1),
                             persistent=False)  # (n_cls, Dj), mean first, then normalised
        # GPA's running sum Σ w_e P_e (all prompts, flattened) and the epochs in it: training
        # state that --resume needs, so persistent buffers (saved with the prompts).
        n = sum(p.numel() for p in self.prompt_learner.parameters())
        self.register_buffer("gpa_sum", torch.zeros(n).to(clip_model.logit_scale.device))  # (P,)
        self.register_buffer("gpa_epochs", torch.zeros((), dtype=torch.long))
        self._terms = {}

    def train(self, mode=True):
        super().train(mode)  # the frozen CLIP always stays in eval mode
        self.clip_model.eval()
        return self

    def encode_text(self, prompts, deep_prompts):
        """Text branch (ivlp.py's). prompts (n_cls, L, D) with P_0 in place; deep_prompts P_1..
        P_{J-1}, each (M, D), overwrite positions 1..M at blocks 1..J-1 -> (n_cls, Dj)."""
        m, tokens = self.clip_model, self.prompt_learner.tokenized_prompts
        n_ctx = self.prompt_learner.n_ctx_text  # M
        x = (prompts + m.positional_embedding[:prompts.shape[1]]).to(m.dtype)  # (n_cls, L, D)
        for i, block in enumerate(m.transformer.resblocks):
            if 1 <= i <= len(deep_prompts):  # deep prompts get no positional embedding
                p = deep_prompts[i - 1].to(x.dtype).expand(x.shape[0], -1, -1)  # (n_cls, M, D)
                x = torch.cat([x[:, :1], p, x[:, 1 + n_ctx:]], dim=1)  # (n_cls, L, D)
            x = block(x)
        return m.pool_text(x, tokens.argmax(dim=-1))  # (n_cls, Dj), read at EOT

    def encode_image(self, images, prompt=None, deep_prompts=()):
        """Image branch (ivlp.py's). prompt: P~_0 (n_ctx_vision, Dv), appended after the patches;
        deep_prompts: P~_1.., each (n_ctx_vision, Dv), replacing the last n_ctx_vision tokens at
        blocks 1, 2, ... No prompts: CLIP's encode_image."""
        visual = self.clip_model.visual
        x = visual.embed(images)  # (B, 1+P, Dv), class token + patches + positional embedding
        B = x.shape[0]
        if prompt is not None:  # appended after the positional embedding, before ln_pre
            p = prompt.to(x.dtype).expand(B, -1, -1)  # (B, n_ctx_vision, Dv)
            x = torch.cat([x, p], dim=1)  # (B, N, Dv) with N = 1+P+n_ctx_vision
        x = visual.ln_pre(x)
        for i, block in enumerate(visual.transformer.resblocks):
            if 1 <= i <= len(deep_prompts):  # deep prompts get no positional embedding
                p = deep_prompts[i - 1].to(x.dtype).expand(B, -1, -1)  # (B, n_ctx_vision, Dv)
                x = torch.cat([x[:, :-p.shape[1]], p], dim=1)  # (B, N, Dv)
            x = block(x)
        return visual.head(x)  # (B, Dj), ln_post on the class token, then proj

    def text_features(self):
        """Normalised class features g_p (n_cls, Dj): compute once to evaluate many batches."""
        pl = self.prompt_learner
        g = self.encode_text(pl.text_prompts(), list(pl.compound_prompts_text))  # (n_cls, Dj)
        return F.normalize(g, dim=-1)

    def forward(self, images, text_features=None):
        """images (B, 3, H, W) -> logits y_p (B, n_cls). In training it also computes L_SCL's
        terms (loss_terms()); pass text_features from text_features() at evaluation."""
        prompts, deep_text, vision, deep_vision = self.prompt_learner()  # built once (free)
        if text_features is None:
            g = self.encode_text(prompts, deep_text)  # (n_cls, Dj)
            text_features = F.normalize(g, dim=-1)
        image_features = F.normalize(self.encode_image(images, vision, deep_vision),
                                     dim=-1)  # (B, Dj)
        logit_scale = self.clip_model.logit_scale.exp()  # 1/τ, frozen
        logits = logit_scale * image_features @ text_features.t()  # (B, n_cls)
        if self.training:  # L = L_ce + L_SCL: train.py adds the cross-entropy
            self._terms = self.self_consistency(images, text_features, image_features, logits)
        return logits

    def self_consistency(self, images, text_features, image_features, logits):
        """L_SCL's weighted terms: the prompted features (n_cls, Dj), (B, Dj) and logits
        (B, n_cls) against the frozen CLIP's on the same images -> {name: scalar}."""
        with torch.no_grad():  # the frozen CLIP: no prompts, no autograd graph
            f = F.normalize(self.clip_model.encode_image(images).float(), dim=-1)  # (B, Dj)
            zero_shot_logits = self.clip_model.logit_scale.exp() * f @ \
                self.frozen_text_features.t()  # (B, n_cls), y: the same τ
        kl = F.kl_div(F.log_softmax(logits.float(), dim=-1),
                      F.log_softmax(zero_shot_logits, dim=-1), reduction="sum",
                      log_target=True) / logits.numel()  # KL(p_y || p_y_p), summed / (B n_cls)
        return {"scl_image": self.image_loss_weight * F.l1_loss(image_features.float(), f),
                "scl_text": self.text_loss_weight * F.l1_loss(text_features.float(),
                                                               self.frozen_text_features),
                "scl_logits": self.logit_loss_weight * kl}

    def loss_terms(self):
        """L_SCL's terms of the last training forward (train.py adds them to L_ce)."""
        return dict(self._terms)

    @torch.no_grad()
    def end_epoch(self, epoch, epochs):
        """GPA after epoch `epoch` (0-based) of `epochs`: gpa_sum += w_{epoch+1} P_{epoch+1};
        after the last epoch the prompts become P_GPA (what is evaluated and saved)."""
        if not self.gpa:
            return
        if int(self.gpa_epochs) != epoch:  # a bug in the caller, not bad input
            raise RuntimeError(f"GPA holds {int(self.gpa_epochs)} epochs, but end_epoch was "
                               f"called after epoch {epoch}: call it once after every epoch")
        params = list(self.prompt_learner.parameters())
        w = gpa_weights(epochs, self.gpa_mean, self.gpa_std)[epoch]
        self.gpa_sum += w * torch.cat([p.flatten() for p in params])  # (P,)
        self.gpa_epochs += 1
        if epoch + 1 == epochs:  # the last epoch: load P_GPA into the prompts
            for p, aggregate in zip(params, self.gpa_sum.split([p.numel() for p in params])):
                p.copy_(aggregate.view_as(p))


if __name__ == "__main__":  # self-check on a tiny random CLIP: no weights, no data
    torch.manual_seed(0)
    tiny = clip.CLIP(embed_dim=32, image_resolution=32, vision_layers=2, vision_width=64,
                     vision_patch_size=8, context_length=77, vocab_size=49408,
                     transformer_width=64, transformer_heads=1, transformer_layers=2)
    model = PromptSRC(tiny.eval(), ["cat", "dog", "sea_lion", "fox", "golden retriever"],
                      text_depth=2, vision_depth=2).train()  # the tiny CLIP: 2 layers per tower
    logits = model(torch.randn(2, 3, 32, 32))  # (B, n_cls)
    terms = {k: v.item() for k, v in model.loss_terms().items()}
    (F.cross_entropy(logits, torch.tensor([0, 1])) + sum(model.loss_terms().values())).backward()
    model.end_epoch(0, 2), model.end_epoch(1, 2)  # GPA over 2 epochs: the prompts' average
    print("logits", tuple(logits.shape), "terms", {k: f"{v:.4f}" for k, v in terms.items()})
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"trainable parameters {n:,}:", [k for k, _ in model.prompt_learner.named_parameters()])
