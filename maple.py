"""MaPLe: Multi-modal Prompt Learning.

Muhammad Uzair Khattak, Hanoona Rasheed, Muhammad Maaz, Salman Khan, Fahad Shahbaz Khan.
CVPR 2023. arXiv:2210.03117v3. Equations are quoted by content, not number (numbers were not
checked against v3).

CLIP is too large, and few-shot data too scarce, to fine-tune the whole model: full fine-tuning
(全参数微调) overfits a few hundred images and washes out what pre-training learned
(catastrophic forgetting, 灾难性遗忘). Hand-written prompts ("a photo of a {class}.") keep CLIP
frozen but are found by trial and error (人肉调参), and a few words' change moves accuracy a lot.
Prompt learning replaces that search with gradients while CLIP stays frozen; CoOp and CoCoOp
learn prompts in the text branch only. MaPLe learns context on both the text and the image
side (the notes: 在文本和图像端都进行了上下文学习): M learned tokens in the text encoder and M in the image
encoder, at each of the first J layers (deep prompts). The vision prompts are not free
parameters: the paper's coupling function, one linear layer per depth, produces them from the
text prompts, so the two branches adapt together and gradients from the image side reach the
text prompts.

In the paper's notation (K layers, layer i = resblocks[i-1]; W text tokens, c class token,
E patch tokens; "_" marks prompt outputs that are discarded):
    P~_k = F_k(P_k),  k = 0..J-1                        coupling: vision prompts from text ones
    [_, W_i] = L_i([P_{i-1}, W_{i-1}]),                 i = 1..J   (a new P at each layer)
    [P_j, W_j] = L_j([P_{j-1}, W_{j-1}]),               j = J+1..K (the slots carry on)
    [c_i, E_i, _] = V_i([c_{i-1}, E_{i-1}, P~_{i-1}]),  i = 1..J
    [c_j, E_j, P~_j] = V_j([c_{j-1}, E_{j-1}, P~_{j-1}]),  j = J+1..K
    z = TextProj(W_K at EOT),  x = ImageProj(c_K),  p(y = i | x) = softmax_i(cos(x, z_i) / tau)
In the code the text prompt sits after SOS, [SOS, P, "of a", class, ".", EOT], with positional
embedding at layer 0 only; the vision prompt sits last, [CLS, patches, P~], with no positional
embedding, and P~_0 goes through ln_pre.

Symbol -> code:
    M <-> n_ctx                 J <-> prompt_depth         P_0 <-> ctx
    P_1..P_{J-1} <-> compound_prompts_text                 F_0 <-> proj
    F_1..F_{J-1} <-> compound_prompt_projections
    P~_0..P~_{J-1} <-> MultiModalPromptLearner.vision_prompts()
    L_1..L_K, z <-> MaPLe.encode_text (a loop over clip_model.transformer.resblocks)
    V_1..V_K, x <-> MaPLe.encode_image (a loop over clip_model.visual.transformer.resblocks)
    K <-> len(resblocks)        tau <-> 1 / clip_model.logit_scale.exp()

Context rule (the same in every prompt learner here): ctx_init, when given, initialises the
context: its first n_ctx tokens become the learned vectors and any further words stay fixed in
the prompt ("a photo" learned, "of a" fixed for n_ctx = 2); n_ctx larger than ctx_init's token count
is an error; ctx_init "" gives n_ctx random vectors.

Shape legend: B images, n_cls classes, n_ctx learned tokens per layer (M), L prompt positions
kept (up to the longest prompt's EOT, <= 77), N vision tokens (1 + patches, + n_ctx with
prompts), D text width (512 for ViT-B/16), Dv vision width (768), Dj joint embedding dim
(512; E is taken by the paper's patch tokens), J prompt depth.

Notes: prompt-learning-notes.md, "Clip的缺点" (why not full fine-tuning) and "MaPLE" (why not
hand-written prompts).
Run: python train.py --method maple --dataset eurosat --root DATA   (base -> new protocol)
"""
import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

import clip
from clip.model import VisionTransformer
from clip.tokenizer import encode

DEFAULTS = dict(
    backbone="ViT-B/16",  # configs/trainers/MaPLe/vit_b16_c2_ep5_batch4_2ctx.yaml
    n_ctx=2,  # same config (TRAINER.MAPLE.N_CTX)
    ctx_init="a photo of a",  # same config (CTX_INIT); "of a" stay fixed words
    prompt_depth=9,  # same config (PROMPT_DEPTH)
    lr=0.0035,  # same config (OPTIM.LR), SGD
    epochs=5,  # same config (OPTIM.MAX_EPOCH)
    batch_size=4,  # same config (DATALOADER.TRAIN_X.BATCH_SIZE)
    shots=16,  # scripts/maple/base2new_train_maple.sh (SHOTS)
    print_freq=20,  # same config (TRAIN.PRINT_FREQ)
)
# Cross-dataset transfer and domain generalisation (train on ImageNet, evaluate elsewhere):
# configs/trainers/MaPLe/vit_b16_c2_ep5_batch4_2ctx_cross_datasets.yaml (train.py --protocol).
PROTOCOLS = {"crossdataset": dict(prompt_depth=3, lr=0.0026, epochs=2)}


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


class MultiModalPromptLearner(nn.Module):
    """Text prompts P_0..P_{J-1} and coupling layers F_0..F_{J-1}: all of MaPLe's weights."""

    def __init__(self, clip_model, classnames, n_ctx=2, ctx_init="a photo of a",
                 prompt_depth=9):
        super().__init__()
        if not isinstance(n_ctx, int) or n_ctx < 1:
            raise ValueError(f"n_ctx must be a positive int, got {n_ctx!r}")
        if n_ctx > clip_model.context_length - 4:  # before allocating: SOS, a name, ".", EOT
            raise ValueError(f"n_ctx={n_ctx} context tokens do not fit the text encoder's "
                             f"{clip_model.context_length} positions with SOS, a class name, '.' "
                             f"and EOT: pass n_ctx <= {clip_model.context_length - 4}")
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
        # clip.load(fp16=True)). NOTE(simplification): the official code keeps ctx and proj in
        # fp16 and the deep prompts in fp32, with explicit .half() casts.
        self.ctx = nn.Parameter(ctx_vectors)  # (n_ctx, D)   P_0
        self.proj = nn.Linear(D, Dv)  # F_0: (n_ctx, D) -> (n_ctx, Dv)
        self.compound_prompts_text = nn.ParameterList(
            [nn.Parameter(torch.randn(n_ctx, D) * 0.02)  # (n_ctx, D)   P_i, N(0, 0.02)
             for _ in range(prompt_depth - 1)])
        # NOTE(official code): deep copies of one initialised layer, so every F_i (i >= 1)
        # starts with the same weights; they are separate parameters and train apart.
        single = nn.Linear(D, Dv)
        self.compound_prompt_projections = nn.ModuleList(
            [copy.deepcopy(single) for _ in range(prompt_depth - 1)])  # F_i: (D,) -> (Dv,)
        self.n_ctx, self.prompt_depth = n_ctx, prompt_depth

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
        """The coupled vision prompts P~_i = F_i(P_i) for i = 0..J-1: J tensors (n_ctx, Dv)."""
        deep = [f(p) for f, p in zip(self.compound_prompt_projections,
                                     self.compound_prompts_text)]  # J-1 x (n_ctx, Dv)
        return [self.proj(self.ctx)] + deep  # P~_0 = F_0(P_0), then P~_1.., coupled

    def forward(self):
        """All prompts, built once: text prompts (n_cls, L, D) with P_0 in place, the deep text
        prompts [P_1..P_{J-1}], P~_0 (n_ctx, Dv) and the deep vision prompts [P~_1..P~_{J-1}].
        Block i (1..J-1) of each tower gets entry i-1 of its deep list."""
        vision = self.vision_prompts()  # coupled: P~_k = F_k(P_k)
        return self.text_prompts(), list(self.compound_prompts_text), vision[0], vision[1:]


class MaPLe(nn.Module):
    """Frozen CLIP (ViT) + MultiModalPromptLearner. forward(images) -> logits (B, n_cls).

    The deep prompts are inserted by looping over CLIP's blocks here, so clip/ is not forked."""

    def __init__(self, clip_model, classnames, n_ctx=2, ctx_init="a photo of a", prompt_depth=9):
        super().__init__()
        if not isinstance(clip_model.visual, VisionTransformer):
            raise ValueError(f"MaPLe needs a ViT backbone (ViT-B/32, ViT-B/16, ViT-L/14, ...): "
                             f"its vision prompts are tokens of the image transformer, and this "
                             f"CLIP's image encoder is a {type(clip_model.visual).__name__}.")
        depth_max = min(len(clip_model.transformer.resblocks),
                        len(clip_model.visual.transformer.resblocks))
        if not isinstance(prompt_depth, int) or not 1 <= prompt_depth <= depth_max:
            raise ValueError(f"prompt_depth must be an int in 1..{depth_max} (the number of "
                             f"layers of this CLIP's towers), got {prompt_depth!r}.")
        self.clip_model = clip_model.requires_grad_(False).eval()  # frozen, never fine-tuned
        self.prompt_learner = MultiModalPromptLearner(clip_model, classnames, n_ctx, ctx_init,
                                                      prompt_depth)
        self.per_class = False  # the prompts and coupling layers fit any classes

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

    def encode_image(self, images, prompt=None, deep_prompts=()):
        """Image branch. prompt: P~_0 (n_ctx, Dv), appended after the patches; deep_prompts:
        P~_1.., each (n_ctx, Dv), replacing the last n_ctx tokens at blocks 1, 2, ...
        No prompts: CLIP's encode_image."""
        visual = self.clip_model.visual
        x = visual.embed(images)  # (B, 1+P, Dv), class token + patches + positional embedding
        B = x.shape[0]
        if prompt is not None:  # appended after the positional embedding, before ln_pre
            p = prompt.to(x.dtype).expand(B, -1, -1)  # (B, n_ctx, Dv)
            x = torch.cat([x, p], dim=1)  # (B, N, Dv) with N = 1+P+n_ctx
        x = visual.ln_pre(x)
        for i, block in enumerate(visual.transformer.resblocks):
            if 1 <= i <= len(deep_prompts):  # deep prompts get no positional embedding
                p = deep_prompts[i - 1].to(x.dtype).expand(B, -1, -1)  # (B, n_ctx, Dv)
                x = torch.cat([x[:, :-p.shape[1]], p], dim=1)  # (B, N, Dv)
            x = block(x)
        return visual.head(x)  # (B, Dj), ln_post on the class token, then proj

    def text_features(self):
        """Normalised class features (n_cls, Dj): compute once to evaluate many batches."""
        pl = self.prompt_learner
        g = self.encode_text(pl.text_prompts(), list(pl.compound_prompts_text))  # (n_cls, Dj)
        return F.normalize(g, dim=-1)

    def forward(self, images, text_features=None):
        """images (B, 3, H, W) -> logits (B, n_cls). Pass text_features from text_features()
        at evaluation to skip the text branch."""
        prompts, deep_text, vision, deep_vision = self.prompt_learner()  # built once (coupled)
        if text_features is None:
            text_features = F.normalize(self.encode_text(prompts, deep_text), dim=-1)  # (n_cls, Dj)
        image_features = F.normalize(self.encode_image(images, vision, deep_vision),
                                     dim=-1)  # (B, Dj)
        logit_scale = self.clip_model.logit_scale.exp()  # 1/tau, frozen
        return logit_scale * image_features @ text_features.t()  # (B, n_cls)


if __name__ == "__main__":  # self-check on a tiny random CLIP: no weights, no data
    torch.manual_seed(0)
    tiny = clip.CLIP(embed_dim=32, image_resolution=32, vision_layers=2, vision_width=64,
                     vision_patch_size=8, context_length=77, vocab_size=49408,
                     transformer_width=64, transformer_heads=1, transformer_layers=2)
    model = MaPLe(tiny.eval(), ["cat", "dog", "sea_lion", "fox", "golden retriever"],
                  prompt_depth=2)  # the tiny CLIP has 2 layers per tower
    prompts, deep_text, vision, deep_vision = model.prompt_learner()
    print("text prompts", tuple(prompts.shape), "deep text", [tuple(p.shape) for p in deep_text],
          "vision prompts", [tuple(p.shape) for p in [vision, *deep_vision]])
    logits = model(torch.randn(2, 3, 32, 32))  # (B, n_cls)
    logits.logsumexp(-1).sum().backward()  # gradients reach both branches' prompts
    print("logits", tuple(logits.shape))
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"trainable parameters {n:,}:", [k for k, _ in model.prompt_learner.named_parameters()])
