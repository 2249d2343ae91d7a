"""IVLP: Independent Vision-Language Prompting, MaPLe without the coupling.

One of the prompting designs that MaPLe's authors ship next to MaPLe (MaPLe:README.md,
"Supported Methods"; no paper of its own), for Muhammad Uzair Khattak, Hanoona Rasheed,
Muhammad Maaz, Salman Khan, Fahad Shahbaz Khan. "MaPLe: Multi-modal Prompt Learning". CVPR
2023. arXiv:2210.03117v3. The official trainer is MaPLe:trainers/independentVL.py; it inserts
the prompts in its forked MaPLe:clip/model.py (ResidualAttentionBlock_IVLP, VisionTransformer).

MaPLe learns deep prompts in both CLIP towers and produces the vision prompts from the text
prompts, P~_k = F_k(P_k), so gradients from the image side reach the text prompts and the two
towers adapt together. IVLP drops F: the vision prompts P~_k are parameters of their own, the
gradients through the image encoder reach only them, and the text prompts learn only through
the text encoder. Everything else is MaPLe's: the same slots, the same layers, the same
encode_text / encode_image (read side by side, this file and maple.py differ only where the
prompts are made). The repository's numbers, base / new / H averaged over 11 datasets and 3
seeds (MaPLe:README.md, "Model Zoo"): IVLP 82.15 / 74.07 / 77.90, MaPLe 82.28 / 75.14 / 78.55.

With nothing tying the towers together, each has its own length and depth (the official
N_CTX_TEXT / N_CTX_VISION, PROMPT_DEPTH_TEXT / PROMPT_DEPTH_VISION); by default the vision
tower takes the text tower's, as the official IVLP config does (2 tokens, 12 layers each). A
vision depth of 0 leaves the image encoder as CLIP's: deep language prompting, the official
configs/trainers/IVLP/vit_b16_c2_ep5_batch4_4ctx_language_only.yaml (n_ctx=4,
prompt_depth_vision=0, lr 0.0025).

In MaPLe's notation (K layers, layer i = resblocks[i-1]; W text tokens, c class token, E patch
tokens; "_" marks prompt outputs that are discarded; J~ and M~ the vision tower's depth and
length):
    P_k,  k = 0..J-1;  P~_k,  k = 0..J~-1               independent: no coupling function
    [_, W_i] = L_i([P_{i-1}, W_{i-1}]),                 i = 1..J   (a new P at each layer)
    [P_j, W_j] = L_j([P_{j-1}, W_{j-1}]),               j = J+1..K (the slots carry on)
    [c_i, E_i, _] = V_i([c_{i-1}, E_{i-1}, P~_{i-1}]),  i = 1..J~
    [c_j, E_j, P~_j] = V_j([c_{j-1}, E_{j-1}, P~_{j-1}]),  j = J~+1..K
    z = TextProj(W_K at EOT),  x = ImageProj(c_K),  p(y = i | x) = softmax_i(cos(x, z_i) / tau)
As in maple.py the text prompt sits after SOS, [SOS, P, "of a", class, ".", EOT], with
positional embedding at layer 0 only; the vision prompt sits last, [CLS, patches, P~], with no
positional embedding, and P~_0 goes through ln_pre.

Symbol -> code:
    M <-> n_ctx                 J <-> prompt_depth         P_0 <-> ctx
    P_1..P_{J-1} <-> compound_prompts_text
    M~ <-> n_ctx_vision         J~ <-> prompt_depth_vision
    P~_0 <-> vision_ctx         P~_1..P~_{J~-1} <-> compound_prompts_vision
    P~_0..P~_{J~-1} <-> VLPromptLearner.vision_prompts()
    L_1..L_K, z <-> IVLP.encode_text (a loop over clip_model.transformer.resblocks)
    V_1..V_K, x <-> IVLP.encode_image (a loop over clip_model.visual.transformer.resblocks)
    K <-> len(resblocks)        tau <-> 1 / clip_model.logit_scale.exp()

Shape legend: B images, n_cls classes, n_ctx learned text tokens per layer (M), n_ctx_vision
learned vision tokens per layer (M~), L prompt positions kept (up to the longest prompt's EOT,
<= 77), N vision tokens (1 + patches, + n_ctx_vision with prompts), D text width (512 for
ViT-B/16), Dv vision width (768), Dj joint embedding dim (512; E is taken by the paper's patch
tokens), J and J~ the prompt depths.

Run: python train.py --method ivlp --dataset eurosat --root DATA   (base -> new protocol)
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

import clip
from clip.model import VisionTransformer
from clip.tokenizer import encode

# The config's vision settings equal its text ones (N_CTX_VISION 2, PROMPT_DEPTH_VISION 12):
# IVLP's n_ctx_vision=None and prompt_depth_vision=None take n_ctx and prompt_depth.
DEFAULTS = dict(
    backbone="ViT-B/16",  # configs/trainers/IVLP/vit_b16_c2_ep5_batch4_2+2ctx.yaml
    n_ctx=2,  # same config (TRAINER.IVLP.N_CTX_TEXT)
    ctx_init="a photo of a",  # same config (CTX_INIT, text only); "of a" stay fixed words
    prompt_depth=12,  # same config (PROMPT_DEPTH_TEXT)
    lr=0.0035,  # same config (OPTIM.LR), SGD
    epochs=5,  # same config (OPTIM.MAX_EPOCH)
    batch_size=4,  # same config (DATALOADER.TRAIN_X.BATCH_SIZE)
    shots=16,  # scripts/independent-vlp/base2new_train_ivlp.sh (SHOTS)
    print_freq=20,  # same config (TRAIN.PRINT_FREQ)
)
# Cross-dataset transfer and domain generalisation: scripts/independent-vlp/xd_train_ivlp.sh
# trains with the same config, so there is nothing to change (unlike MaPLe's).
PROTOCOLS = {}


def _tokenize_prompts(prompts, classnames, context_length):
    """Tokenize one prompt per class; a prompt over CLIP's context raises naming the class."""
    rows = []
    for name, text in zip(classnames, prompts):
        try:
            rows.append(clip.tokenize(text, context_length))  # (1, 77)
        except RuntimeError as e:
            raise ValueError(f"class name {name!r} makes the prompt too long: {e} Shorten the "
                             "class name, or use a shorter ctx_init.") from None
    return torch.cat(rows)  # (n_cls, 77)


class VLPromptLearner(nn.Module):
    """Text prompts P_0..P_{J-1} and vision prompts P~_0..P~_{J~-1}: all of IVLP's weights."""

    def __init__(self, clip_model, classnames, n_ctx=2, ctx_init="a photo of a",
                 prompt_depth=12, n_ctx_vision=None, prompt_depth_vision=None):
        super().__init__()
        n_ctx_vision = n_ctx if n_ctx_vision is None else n_ctx_vision
        prompt_depth_vision = prompt_depth if prompt_depth_vision is None else prompt_depth_vision
        for name, value in (("n_ctx", n_ctx), ("n_ctx_vision", n_ctx_vision)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        D = clip_model.ln_final.weight.shape[0]  # text width, read from the model
        Dv = clip_model.visual.conv1.weight.shape[0]  # vision width (768 ViT-B, 1024 ViT-L)
        embed = clip_model.token_embedding
        device = embed.weight.device  # build on CLIP's device; lookups need ids there
        if ctx_init:
            ctx_init = ctx_init.replace("_", " ")
            init_ids = encode(ctx_init)  # BPE ids of the init words, no SOS/EOT
            if n_ctx > len(init_ids):
                raise ValueError(f"n_ctx={n_ctx} is more than the {len(init_ids)} tokens of "
                                 f"ctx_init={ctx_init!r}: pass a longer ctx_init, or "
                                 "ctx_init='' for random context.")
            # NOTE(official code): unlike CoOp, n_ctx is kept and the prompt text is the whole
            # init string: its first n_ctx tokens ("a photo") are learned, the rest ("of a")
            # stay fixed tokens in token_suffix. (The official code silently falls back to
            # random context for n_ctx > 4; here a too-short init string is an error instead.)
            with torch.no_grad():
                ids = torch.tensor(init_ids[:n_ctx], device=device)  # (n_ctx,)
                ctx_vectors = embed(ids).float()  # (n_ctx, D)
            prefix = ctx_init
        else:
            ctx_vectors = torch.randn(n_ctx, D) * 0.02  # (n_ctx, D), N(0, 0.02)
            # "X X ... X" reserves n_ctx positions so the EOT lands where the feature is read.
            prefix = " ".join(["X"] * n_ctx)
        # Precision, the same in every method file here: learned tensors are fp32 and the
        # frozen CLIP casts them to its own dtype where they enter it (fp16 after
        # clip.load(fp16=True)). NOTE(simplification): the official code keeps ctx in CLIP's
        # dtype and the other prompts in fp32, with explicit .half() casts where they enter.
        self.ctx = nn.Parameter(ctx_vectors)  # (n_ctx, D)   P_0
        self.compound_prompts_text = nn.ParameterList(
            [nn.Parameter(torch.randn(n_ctx, D) * 0.02)  # (n_ctx, D)   P_i, N(0, 0.02)
             for _ in range(prompt_depth - 1)])
        # NOTE(official code): the vision prompts live in its forked CLIP (VisionTransformer.VPT
        # and each block's VPT_shallow, trained by the name "VPT"), all N(0, 0.02). Here they
        # live in the prompt learner, with the text prompts, and CLIP stays unforked.
        self.vision_ctx = (nn.Parameter(torch.randn(n_ctx_vision, Dv) * 0.02)  # P~_0
                           if prompt_depth_vision >= 1 else None)  # (n_ctx_vision, Dv) or None
        self.compound_prompts_vision = nn.ParameterList(
            [nn.Parameter(torch.randn(n_ctx_vision, Dv) * 0.02)  # (n_ctx_vision, Dv)   P~_i
             for _ in range(prompt_depth_vision - 1)])
        self.n_ctx, self.prompt_depth = n_ctx, prompt_depth
        self.n_ctx_vision, self.prompt_depth_vision = n_ctx_vision, prompt_depth_vision

        classnames = [name.replace("_", " ") for name in classnames]
        tokens = _tokenize_prompts([f"{prefix} {name}." for name in classnames], classnames,
                                   clip_model.context_length)  # (n_cls, 77)
        # Exact cut: the text tower is causal and read at EOT, so positions after the longest
        # prompt's EOT never matter.
        L = int(tokens.argmax(dim=-1).max()) + 1  # EOT has the largest id, so argmax finds it
        tokens = tokens[:, :L]  # (n_cls, L)
        with torch.no_grad():
            embedding = embed(tokens.to(device)).float()  # (n_cls, L, D)
        # Class-name-dependent and frozen; persistent=False keeps them out of state_dict(), so
        # the learned state loads into a model built for other class names (base -> new).
        self.register_buffer("token_prefix", embedding[:, :1], persistent=False)  # (n_cls, 1, D)
        self.register_buffer("token_suffix", embedding[:, 1 + n_ctx:],
                             persistent=False)  # (n_cls, L-1-n_ctx, D)
        self.register_buffer("tokenized_prompts", tokens, persistent=False)  # (n_cls, L)
        self.to(device)

    def text_prompts(self):
        """Input-layer text prompts, CoOp's "end" layout [SOS | P_0 | "of a" class "." EOT]."""
        n_cls = self.token_prefix.shape[0]
        ctx = self.ctx.expand(n_cls, -1, -1)  # (n_cls, n_ctx, D)
        return torch.cat([self.token_prefix, ctx, self.token_suffix], dim=1)  # (n_cls, L, D)

    def vision_prompts(self):
        """The vision prompts P~_0..P~_{J~-1}: J~ tensors (n_ctx_vision, Dv), learned as they
        are (MaPLe computes them from the text prompts here)."""
        if self.vision_ctx is None:
            return []  # no vision prompts: CLIP's own image encoder
        return [self.vision_ctx, *self.compound_prompts_vision]  # independent of P_i

    def forward(self):
        """-> text prompts (n_cls, L, D), deep text prompts J-1 x (n_ctx, D),
        vision prompts J~ x (n_ctx_vision, Dv)."""
        return self.text_prompts(), list(self.compound_prompts_text), self.vision_prompts()


class IVLP(nn.Module):
    """Frozen CLIP (ViT) + VLPromptLearner. forward(images) -> logits (B, n_cls).

    The deep prompts are inserted by looping over CLIP's blocks here, so clip/ is not forked."""

    def __init__(self, clip_model, classnames, n_ctx=2, ctx_init="a photo of a", prompt_depth=12,
                 n_ctx_vision=None, prompt_depth_vision=None):
        super().__init__()
        if not isinstance(clip_model.visual, VisionTransformer):
            raise ValueError(f"IVLP needs a ViT backbone (ViT-B/32, ViT-B/16, ViT-L/14, ...): "
                             f"its vision prompts are tokens of the image transformer, and this "
                             f"CLIP's image encoder is a {type(clip_model.visual).__name__}.")
        same = " (None: prompt_depth)" if prompt_depth_vision is None else ""
        prompt_depth_vision = prompt_depth if prompt_depth_vision is None else prompt_depth_vision
        # NOTE(official code): a text depth of at least 1, as its assert (vision prompts only
        # are its VPT trainer); a vision depth of 0 is its language-only config.
        towers = (("prompt_depth", prompt_depth, 1, clip_model.transformer, ""),
                  ("prompt_depth_vision", prompt_depth_vision, 0, clip_model.visual.transformer,
                   same))
        for name, depth, low, tower, note in towers:
            if not isinstance(depth, int) or not low <= depth <= len(tower.resblocks):
                raise ValueError(f"{name}{note} must be an int in {low}..{len(tower.resblocks)} "
                                 f"(the number of layers of this CLIP's tower), got {depth!r}.")
        self.clip_model = clip_model.requires_grad_(False).eval()  # frozen, never fine-tuned
        self.prompt_learner = VLPromptLearner(clip_model, classnames, n_ctx, ctx_init,
                                              prompt_depth, n_ctx_vision, prompt_depth_vision)

    def train(self, mode=True):
        super().train(mode)  # the frozen CLIP always stays in eval mode
        self.clip_model.eval()
        return self

    def encode_text(self, prompts, deep_prompts):
        """Text branch. prompts (n_cls, L, D) with P_0 in place; deep_prompts: P_1..P_{J-1},
        each (n_ctx, D), overwriting positions 1..n_ctx at blocks 1..J-1 -> (n_cls, Dj)."""
        m, tokens = self.clip_model, self.prompt_learner.tokenized_prompts
        n_ctx = self.prompt_learner.n_ctx
        x = (prompts + m.positional_embedding[:prompts.shape[1]]).to(m.dtype)  # (n_cls, L, D)
        for i, block in enumerate(m.transformer.resblocks):
            if 1 <= i <= len(deep_prompts):  # deep prompts get no positional embedding
                p = deep_prompts[i - 1].to(x.dtype).expand(x.shape[0], -1, -1)  # (n_cls, n_ctx, D)
                x = torch.cat([x[:, :1], p, x[:, 1 + n_ctx:]], dim=1)  # (n_cls, L, D)
            x = block(x)
        return m.pool_text(x, tokens.argmax(dim=-1))  # (n_cls, Dj), read at EOT

    def encode_image(self, images, vision_prompts=()):
        """Image branch. vision_prompts: P~_0..P~_{J~-1}, each (n_ctx_vision, Dv); P~_0 is
        appended after the patches, P~_i replaces the last n_ctx_vision tokens at block i.
        Empty: CLIP's encode_image."""
        visual = self.clip_model.visual
        x = visual.embed(images)  # (B, 1+P, Dv), class token + patches + positional embedding
        B = x.shape[0]
        if vision_prompts:  # appended after the positional embedding, before ln_pre
            p = vision_prompts[0].to(x.dtype).expand(B, -1, -1)  # (B, n_ctx_vision, Dv)
            x = torch.cat([x, p], dim=1)  # (B, N, Dv) with N = 1+P+n_ctx_vision
        x = visual.ln_pre(x)
        for i, block in enumerate(visual.transformer.resblocks):
            if 1 <= i < len(vision_prompts):
                p = vision_prompts[i].to(x.dtype).expand(B, -1, -1)  # (B, n_ctx_vision, Dv)
                x = torch.cat([x[:, :-p.shape[1]], p], dim=1)  # (B, N, Dv)
            x = block(x)
        return visual.head(x)  # (B, Dj), ln_post on the class token, then proj

    def text_features(self):
        """Normalised class features (n_cls, Dj): compute once to evaluate many batches."""
        prompts, deep_prompts, _ = self.prompt_learner()
        return F.normalize(self.encode_text(prompts, deep_prompts), dim=-1)  # (n_cls, Dj)

    def forward(self, images, text_features=None):
        """images (B, 3, H, W) -> logits (B, n_cls). Pass text_features from text_features()
        at evaluation to skip the text branch (the vision prompts do not depend on it)."""
        if text_features is None:
            text_features = self.text_features()  # (n_cls, Dj)
        vision_prompts = self.prompt_learner.vision_prompts()  # J~ x (n_ctx_vision, Dv), free
        image_features = F.normalize(self.encode_image(images, vision_prompts), dim=-1)  # (B, Dj)
        logit_scale = self.clip_model.logit_scale.exp()  # 1/tau, frozen
        return logit_scale * image_features @ text_features.t()  # (B, n_cls)


if __name__ == "__main__":  # self-check on a tiny random CLIP: no weights, no data
    torch.manual_seed(0)
    tiny = clip.CLIP(embed_dim=32, image_resolution=32, vision_layers=2, vision_width=64,
                     vision_patch_size=8, context_length=77, vocab_size=49408,
                     transformer_width=64, transformer_heads=1, transformer_layers=2)
    model = IVLP(tiny.eval(), ["cat", "dog", "sea_lion", "fox", "golden retriever"],
                 prompt_depth=2)  # the tiny CLIP has 2 layers per tower
    prompts, deep_text, vision = model.prompt_learner()
    print("text prompts", tuple(prompts.shape), "deep text", [tuple(p.shape) for p in deep_text],
          "vision prompts", [tuple(p.shape) for p in vision])
    logits = model(torch.randn(2, 3, 32, 32))  # (B, n_cls)
    logits.logsumexp(-1).sum().backward()  # gradients reach both branches' prompts
    print("logits", tuple(logits.shape))
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"trainable parameters {n:,}:", [k for k, _ in model.prompt_learner.named_parameters()])
