"""CLIP: the two towers and the contrastive head.

A compact re-implementation of openai/CLIP's `clip/model.py` (MIT licence, see LICENSE). Parameter
names are OpenAI's, so the released checkpoints load with `load_state_dict(strict=True)` and no
renaming. Three deliberate differences from the original, none of which changes an output:
- batch-first tensors (B, L, D) everywhere, so no NLD <-> LND permutes;
- fp32 by default: `build_model` returns an fp32 model (OpenAI's converts to fp16 and
  `clip.load(device="cpu")` converts back); `clip.load(fp16=True)` applies OpenAI's
  `convert_weights`, which keeps LayerNorm, embeddings and logit_scale in fp32;
- seams for prompt learning: `encode_text_embeddings` encodes token *embeddings* (what prompt
  learners build), the vision tower splits into `embed` -> `ln_pre` -> blocks -> `head`, so a
  method (MaPLe) can drive the blocks itself without forking this file, and blocks can
  recompute their activations in backward (`checkpoint`) to save memory.
The text tower runs only up to the last end-of-text token of a batch (see
`encode_text_embeddings`): the same features with less work.

Shape legend: B images, N texts, L text positions (77), D text width, Dv vision width,
P patches, E joint embedding dim.
"""
import math
from collections import OrderedDict

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from .resnet import ModifiedResNet


class CheckpointError(RuntimeError):
    """A file or state dict that is not a usable CLIP checkpoint."""


class QuickGELU(nn.Module):
    """The GELU approximation OpenAI's CLIP models were trained with: x * sigmoid(1.702 x).

    A model runs the activation it was trained with: OpenAI's weights need QuickGELU, most
    open_clip/LAION models exact GELU (`nn.GELU`); the two differ by ~1e-2 in the features."""

    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in fp32 whatever the input's dtype, as OpenAI's subclass: with fp16
    weights (`convert_weights`) its parameters stay fp32 and only the input is upcast."""

    def forward(self, x):
        return super().forward(x.float()).to(x.dtype)


class Attention(nn.Module):
    """Multi-head self-attention with nn.MultiheadAttention's parameter names
    (`in_proj_weight`, `in_proj_bias`, `out_proj`), so OpenAI's keys load unchanged."""

    def __init__(self, d_model, n_head, causal=False):
        super().__init__()
        if d_model % n_head:
            raise ValueError(f"a width of {d_model} does not split into {n_head} attention heads")
        self.n_head, self.causal = n_head, causal
        self.in_proj_weight = nn.Parameter(torch.empty(3 * d_model, d_model))  # (3D, D) q, k, v
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * d_model))  # (3D,)
        self.out_proj = nn.Linear(d_model, d_model)
        nn.init.xavier_uniform_(self.in_proj_weight)  # nn.MultiheadAttention's initialisation
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, x):
        B, L, D = x.shape
        q, k, v = F.linear(x, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
        q, k, v = (t.view(B, L, self.n_head, D // self.n_head).transpose(1, 2)
                   for t in (q, k, v))  # (B, heads, L, D/heads)
        # The text tower is causal: position i attends to positions <= i only (CLIP adds a -inf
        # mask above the diagonal; is_causal is the same mask). Images use full attention.
        x = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        return self.out_proj(x.transpose(1, 2).reshape(B, L, D))  # (B, L, D)


class ResidualAttentionBlock(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x)).

    Single tensor in, single tensor out, so a method can loop over blocks and edit the token
    sequence between them (MaPLe's deep prompts)."""

    def __init__(self, d_model, n_head, causal=False, quick_gelu=True):
        super().__init__()
        self.attn = Attention(d_model, n_head, causal)
        self.ln_1 = LayerNorm(d_model)
        self.mlp = nn.Sequential(OrderedDict([
            ("c_fc", nn.Linear(d_model, d_model * 4)),
            ("gelu", QuickGELU() if quick_gelu else nn.GELU()),  # exact GELU: erf, not tanh
            ("c_proj", nn.Linear(d_model * 4, d_model)),
        ]))
        self.ln_2 = LayerNorm(d_model)
        self.checkpoint = False  # opt-in activation checkpointing (train.py --checkpointing)

    def forward(self, x):
        if self.checkpoint and torch.is_grad_enabled():
            # Keep only the block's input for backward and recompute the block there: the same
            # outputs and gradients for ~1/3 more compute, and a text pass over many prompts
            # (ImageNet's 1000 classes) stores one tensor per block instead of all of them.
            # A flag on the block, so methods that loop over blocks (MaPLe) get it too; grad
            # mode, not self.training, because prompt learners keep CLIP in eval mode.
            return torch.utils.checkpoint.checkpoint(self._forward, x, use_reentrant=False)
        return self._forward(x)

    def _forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width, layers, heads, causal=False, quick_gelu=True):
        super().__init__()
        self.width, self.layers = width, layers
        # OpenAI uses nn.Sequential; a ModuleList has the same keys (resblocks.{i}.*) and invites
        # iterating over the blocks.
        self.resblocks = nn.ModuleList(
            [ResidualAttentionBlock(width, heads, causal, quick_gelu) for _ in range(layers)])

    def forward(self, x):
        for block in self.resblocks:
            x = block(x)
        return x


class VisionTransformer(nn.Module):
    def __init__(self, input_resolution, patch_size, width, layers, heads, output_dim,
                 quick_gelu=True):
        super().__init__()
        self.input_resolution, self.output_dim = input_resolution, output_dim
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=False)
        scale = width ** -0.5
        grid = input_resolution // patch_size
        self.class_embedding = nn.Parameter(scale * torch.randn(width))  # (Dv,)
        self.positional_embedding = nn.Parameter(
            scale * torch.randn(grid ** 2 + 1, width))  # (1+P, Dv)
        self.ln_pre = LayerNorm(width)
        self.transformer = Transformer(width, layers, heads, quick_gelu=quick_gelu)
        self.ln_post = LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, output_dim))  # (Dv, E)

    def embed(self, images):
        """Patches + class token + positional embedding (before `ln_pre`, on purpose: MaPLe
        appends its vision prompts here, after the positions and before `ln_pre`)."""
        x = self.conv1(images.to(self.conv1.weight.dtype))  # (B, Dv, g, g)
        x = x.flatten(2).transpose(1, 2)  # (B, P, Dv) with P = g*g
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)  # (B, 1, Dv)
        x = torch.cat([cls, x], dim=1)  # (B, 1+P, Dv), class token at index 0
        return x + self.positional_embedding.to(x.dtype)

    def head(self, x):
        """The class token's output, `ln_post`, then the projection into the joint space."""
        return self.ln_post(x[:, 0]) @ self.proj  # (B, Dv) -> (B, E)

    def forward(self, images):
        x = self.ln_pre(self.embed(images))  # CLIP-specific LayerNorm before the blocks
        return self.head(self.transformer(x))  # (B, E)


class CLIP(nn.Module):
    """OpenAI's constructor arguments, plus two that OpenAI's models fix: `vision_heads` (None:
    OpenAI's width // 64; LAION's ViT-H/14 has 16 heads of width 80) and `quick_gelu` (the MLP
    activation of both transformers: True for OpenAI's weights, False for exact GELU)."""

    def __init__(self, embed_dim, image_resolution, vision_layers, vision_width,
                 vision_patch_size, context_length, vocab_size, transformer_width,
                 transformer_heads, transformer_layers, vision_heads=None, quick_gelu=True):
        super().__init__()
        self.context_length, self.quick_gelu = context_length, quick_gelu
        if isinstance(vision_layers, (tuple, list)):  # a tuple of 4 block counts: ResNet
            self.visual = ModifiedResNet(vision_layers, embed_dim, heads=vision_width * 32 // 64,
                                         input_resolution=image_resolution, width=vision_width)
        else:
            self.visual = VisionTransformer(image_resolution, vision_patch_size, vision_width,
                                            vision_layers, vision_heads or vision_width // 64,
                                            embed_dim, quick_gelu)
        self.transformer = Transformer(transformer_width, transformer_layers, transformer_heads,
                                       causal=True, quick_gelu=quick_gelu)
        self.vocab_size = vocab_size  # rows of token_embedding: clip.tokenize needs 49,408
        self.token_embedding = nn.Embedding(vocab_size, transformer_width)  # (vocab, D)
        self.positional_embedding = nn.Parameter(
            torch.empty(context_length, transformer_width))  # (L, D)
        self.ln_final = LayerNorm(transformer_width)
        self.text_projection = nn.Parameter(torch.empty(transformer_width, embed_dim))  # (D, E)
        # The temperature is learned as a log: logits = exp(logit_scale) * cos. Initialised at
        # log(1/0.07); the released checkpoints store log(100). Prompt learning keeps it frozen.
        self.logit_scale = nn.Parameter(torch.ones([]) * math.log(1 / 0.07))
        self.initialize_parameters()

    def initialize_parameters(self):
        """OpenAI's initialisation; it only matters when training from scratch (toy/pretrain.py).
        Token embeddings get std 0.02 (norm ~0.5 at width 512): the prompt-learning learning
        rates assume context vectors of that size."""
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        width, layers = self.transformer.width, self.transformer.layers
        proj_std = (width ** -0.5) * ((2 * layers) ** -0.5)
        for block in self.transformer.resblocks:
            nn.init.normal_(block.attn.in_proj_weight, std=width ** -0.5)
            nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
            nn.init.normal_(block.mlp.c_fc.weight, std=(2 * width) ** -0.5)
            nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
        nn.init.normal_(self.text_projection, std=width ** -0.5)

    @property
    def dtype(self):
        return self.visual.conv1.weight.dtype

    def encode_image(self, images):
        return self.visual(images.to(self.dtype))  # (B, E)

    def encode_text(self, tokens):
        """tokens (N, L) from `clip.tokenize` -> text features (N, E), projected, not normalised."""
        return self.encode_text_embeddings(self.token_embedding(tokens), tokens)

    def encode_text_embeddings(self, x, tokens):
        """The text tower from token embeddings x (N, L, D), e.g. prompts with learned context
        vectors. `tokens` (N, L) only locate the end-of-text (EOT) token of each row."""
        eot = tokens.argmax(dim=-1)  # (N,) EOT has the largest id (49407), so argmax finds it
        # Exact shortcut: attention is causal and the feature is read at EOT, so positions after
        # the last EOT of the batch cannot change any output. Run only the first max(EOT)+1
        # positions instead of all 77 (prompts are typically 10-30 tokens).
        n = int(eot.max()) + 1
        x = (x[:, :n] + self.positional_embedding[:n]).to(self.dtype)  # (N, n, D)
        x = self.transformer(x)
        return self.pool_text(x, eot)  # (N, E)

    def pool_text(self, x, eot):
        """The EOT position's output (N, n, D) -> (N, D), `ln_final`, projection -> (N, E).
        (ln_final acts per position, so taking the row first gives the same result.)"""
        x = self.ln_final(x[torch.arange(x.shape[0], device=x.device), eot])  # (N, D)
        return x @ self.text_projection  # (N, E)

    def forward(self, images, tokens):
        image_features = F.normalize(self.encode_image(images), dim=-1)  # (B, E)
        text_features = F.normalize(self.encode_text(tokens), dim=-1)  # (N, E)
        logits_per_image = self.logit_scale.exp() * image_features @ text_features.t()  # (B, N)
        return logits_per_image, logits_per_image.t()


# ------------------------------------------------------------------------------------------------
# build_model: every hyperparameter is read off the state dict's shapes, as OpenAI's does.

_SCALAR_KEYS = ("input_resolution", "context_length", "vocab_size")  # only in the JIT archives
_TEXT_KEYS = ("positional_embedding", "text_projection", "token_embedding.weight",
              "ln_final.weight")
_VIT_KEYS = ("visual.conv1.weight", "visual.positional_embedding", "visual.proj")
_RESNET_KEYS = ("visual.layer1.0.conv1.weight", "visual.attnpool.positional_embedding")


def config_from_state_dict(sd):
    """The CLIP(...) keyword arguments that an OpenAI-layout state dict implies."""
    vit = "visual.proj" in sd
    missing = [k for k in _TEXT_KEYS + (_VIT_KEYS if vit else _RESNET_KEYS) if k not in sd]
    if missing:
        raise CheckpointError(
            f"this state dict is not an OpenAI-layout CLIP checkpoint: missing {missing} "
            f"(it has {len(sd)} keys, e.g. {list(sd)[:5]}). Pass a checkpoint from "
            "clip.available_models() or one saved from a CLIP model's state_dict().")
    cfg = dict(
        embed_dim=sd["text_projection"].shape[1],
        context_length=sd["positional_embedding"].shape[0],
        vocab_size=sd["token_embedding.weight"].shape[0],
        transformer_width=sd["ln_final.weight"].shape[0],
        transformer_layers=len({k.split(".")[2] for k in sd
                                if k.startswith("transformer.resblocks")}),
    )
    cfg["transformer_heads"] = cfg["transformer_width"] // 64
    if vit:
        cfg["vision_width"] = sd["visual.conv1.weight"].shape[0]
        cfg["vision_layers"] = len([k for k in sd if k.startswith("visual.")
                                    and k.endswith(".attn.in_proj_weight")])
        cfg["vision_patch_size"] = sd["visual.conv1.weight"].shape[-1]
        grid = round((sd["visual.positional_embedding"].shape[0] - 1) ** 0.5)
        cfg["image_resolution"] = cfg["vision_patch_size"] * grid
    else:
        cfg["vision_layers"] = tuple(
            len({k.split(".")[2] for k in sd if k.startswith(f"visual.layer{b}")})
            for b in (1, 2, 3, 4))
        cfg["vision_width"] = sd["visual.layer1.0.conv1.weight"].shape[0]
        grid = round((sd["visual.attnpool.positional_embedding"].shape[0] - 1) ** 0.5)
        cfg["vision_patch_size"] = None
        cfg["image_resolution"] = 32 * grid  # the ResNet downsamples by 32
    return cfg


def build_model(state_dict, quick_gelu=True, **overrides):
    """An fp32 CLIP in eval mode, loaded strictly from an OpenAI-layout state dict.

    The weights do not show the activation they were trained with: `quick_gelu=True` for
    OpenAI's models and open_clip's `-quickgelu` ones, False for exact-GELU models (open_clip's
    other configs, LAION's). `overrides` are CLIP(...) arguments the shapes do not show either
    (`transformer_heads`, `vision_heads`, whose default is OpenAI's width // 64)."""
    sd = {k: v for k, v in state_dict.items() if k not in _SCALAR_KEYS}
    cfg = {**config_from_state_dict(sd), **overrides}
    towers = [("transformer_heads", cfg["transformer_width"], cfg["transformer_heads"])]
    if cfg["vision_patch_size"]:  # a ViT
        towers.append(("vision_heads", cfg["vision_width"],
                       cfg.get("vision_heads") or cfg["vision_width"] // 64))
    for key, width, heads in towers:  # a width under 64 gives 0 heads by OpenAI's rule
        if heads < 1 or width % heads:
            raise CheckpointError(f"a width of {width} does not split into {heads} attention "
                                  f"heads (OpenAI's rule: width // 64): pass the head count, "
                                  f"clip.build_model(state_dict, {key}=N)")
    model = CLIP(**cfg, quick_gelu=quick_gelu)
    missing, unexpected = _key_mismatch(model.state_dict(), sd)
    if missing or unexpected:
        raise CheckpointError(
            "the state dict does not match the CLIP architecture its shapes imply: "
            f"missing keys {missing[:8]}{' ...' if len(missing) > 8 else ''} ({len(missing)}), "
            f"unexpected keys {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''} "
            f"({len(unexpected)}). Is it a CLIP checkpoint in OpenAI's key layout?")
    wrong = [f"{k} {tuple(sd[k].shape)} {sd[k].dtype} (expected {tuple(v.shape)})"
             for k, v in model.state_dict().items() if sd[k].shape != v.shape or
             sd[k].is_floating_point() != v.is_floating_point()]
    if wrong:
        raise CheckpointError(f"the state dict does not fit the CLIP architecture its shapes "
                              f"imply: {len(wrong)} tensors of another shape or dtype, e.g. "
                              f"{', '.join(wrong[:3])}. Is the file damaged?")
    bad = [k for k, v in sd.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise CheckpointError(f"the state dict holds non-finite values (nan or inf) in "
                              f"{', '.join(bad[:3])}: the file is damaged; download it again")
    model.load_state_dict(sd, strict=True)  # copies fp16 checkpoint values into fp32
    return model.eval()


def _key_mismatch(expected, given):
    return sorted(set(expected) - set(given)), sorted(set(given) - set(expected))


def convert_weights(model):
    """OpenAI's fp16 conversion (`clip.load(fp16=True)`): convolutions, linear layers, the
    attention weights and the two projections become fp16; LayerNorm, BatchNorm, the
    embeddings (token, class, positional) and logit_scale stay fp32. In place; returns model."""
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            module.half()
        for name in ("in_proj_weight", "in_proj_bias", "text_projection", "proj"):
            p = getattr(module, name, None)
            if isinstance(p, nn.Parameter):
                p.data = p.data.half()
    return model
