"""IVLP: Independent Vision-Language Prompting, and its one-tower variants: MaPLe's ablations.

Muhammad Uzair Khattak, Hanoona Rasheed, Muhammad Maaz, Salman Khan, Fahad Shahbaz Khan.
"MaPLe: Multi-modal Prompt Learning". CVPR 2023. arXiv:2210.03117v3. Next to MaPLe its authors
ship three prompting designs without MaPLe's coupling, with their numbers (MaPLe:README.md,
"Supported Methods", "Model Zoo"; no paper of their own). Official trainers:
MaPLe:trainers/independentVL.py (IVLP; with vision depth 0, deep language prompting) and
MaPLe:trainers/vpt.py (deep vision prompting); both insert their prompts in the forked
MaPLe:clip/model.py (ResidualAttentionBlock_IVLP, VisionTransformer).

MaPLe learns deep prompts in both CLIP towers and produces the vision prompts from the text
prompts, P~_k = F_k(P_k), so gradients from the image side reach the text prompts and the two
towers adapt together. IVLP drops F: the vision prompts P~_k are parameters of their own, the
gradients through the image encoder reach only them, and the text prompts learn only through
the text encoder. Everything else is MaPLe's: the same slots, the same layers, the same
encode_text / encode_image (read side by side, this file and maple.py differ where the prompts
are made). With nothing tying the towers together, each has its own length and depth, and
either depth may be 0: VARIANTS holds the three official configs.
    ivlp       both towers, independent prompts     M = M~ = 2,  J = J~ = 12
    ivlp_text  deep language prompting              M = 4,  J = 12,  J~ = 0 (CLIP's image side)
    vpt        deep vision prompting                M~ = 8,  J~ = 12,  J = 0: the text side is
               the frozen features of the hand-written prompt "a photo of a {class}."
Base / new / H, 11 datasets, 3 seeds (MaPLe:README.md, "Model Zoo"): vpt 80.24 / 73.43 / 76.68,
ivlp_text 81.72 / 73.81 / 77.56, ivlp 82.15 / 74.07 / 77.90, MaPLe 82.28 / 75.14 / 78.55.

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
positional embedding, and P~_0 goes through ln_pre. J = 0: no P, z is CLIP's feature of the
hand-written prompt; J~ = 0: no P~, x is CLIP's image feature.

Symbol -> code:
    M <-> n_ctx_text            J <-> text_depth           P_0 <-> ctx
    P_1..P_{J-1} <-> compound_prompts_text
    M~ <-> n_ctx_vision         J~ <-> vision_depth
    P~_0 <-> vision_ctx         P~_1..P~_{J~-1} <-> compound_prompts_vision
    P~_0..P~_{J~-1} <-> VLPromptLearner.vision_prompts()
    L_1..L_K, z <-> IVLP.encode_text (a loop over clip_model.transformer.resblocks)
    z with J = 0 <-> IVLP.fixed_text_features
    V_1..V_K, x <-> IVLP.encode_image (a loop over clip_model.visual.transformer.resblocks)
    K <-> len(resblocks)        tau <-> 1 / clip_model.logit_scale.exp()

Context rule (the same in every prompt learner here): ctx_init, when given, initialises the
context: its first n_ctx_text tokens become the learned vectors and any further words stay fixed in
the prompt ("a photo" learned, "of a" fixed for n_ctx_text = 2); n_ctx_text larger than ctx_init's token count
is an error; ctx_init "" gives n_ctx_text random vectors.

Shape legend: B images, n_cls classes, n_ctx_text learned text tokens per layer (M; n_ctx in
encode_text), n_ctx_vision learned vision tokens per layer (M~), L prompt positions kept (up to
the longest prompt's EOT, <= 77), N vision tokens (1 + patches, + n_ctx_vision with prompts),
D text width (512 for ViT-B/16), Dv vision width (768), Dj joint embedding dim (512; E is taken
by the paper's patch tokens), J and J~ the prompt depths.

Run: python train.py --method ivlp --dataset eurosat --root DATA  (or ivlp_text, vpt; base2new)
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

import clip
from clip.model import VisionTransformer
from clip.tokenizer import encode

# The official configs. n_ctx_text, n_ctx_vision, text_depth, vision_depth and ctx_init are
# IVLP(...)'s arguments, the other keys the run's. All three train 16 shots (the SHOTS of
# scripts/vpt/base2new_train_vpt.sh, scripts/language-prompting/base2new_train_lp.sh and
# scripts/independent-vlp/base2new_train_ivlp.sh), and their cross-dataset scripts (xd_train_*.sh
# in the same folders) train with the same configs, so there is no PROTOCOLS entry to add.
VARIANTS = {
    # configs/trainers/VPT/vit_b16_c2_ep5_batch4_4.yaml (trainers/vpt.py)
    "vpt": dict(
        n_ctx_text=0, text_depth=0,  # vpt.py: language_ctx 0, language_depth 0
        n_ctx_vision=8,  # the config's TRAINER.VPT.N_CTX_VISION
        vision_depth=12,  # PROMPT_DEPTH_VISION
        ctx_init="a photo of a",  # the fixed prompt's words, hard-coded in vpt.py FixedEmbeddings
        lr=0.0025, epochs=5, batch_size=4,  # OPTIM.LR, OPTIM.MAX_EPOCH, TRAIN_X.BATCH_SIZE
        shots=16, print_freq=20, backbone="ViT-B/16"),  # TRAIN.PRINT_FREQ, MODEL.BACKBONE
    # configs/trainers/IVLP/vit_b16_c2_ep5_batch4_4ctx_language_only.yaml (independentVL.py)
    "ivlp_text": dict(
        n_ctx_text=4,  # the config's TRAINER.IVLP.N_CTX_TEXT
        text_depth=12,  # PROMPT_DEPTH_TEXT
        n_ctx_vision=0, vision_depth=0,  # N_CTX_VISION, PROMPT_DEPTH_VISION
        ctx_init="a photo of a",  # CTX_INIT
        lr=0.0025, epochs=5, batch_size=4,  # OPTIM.LR, OPTIM.MAX_EPOCH, TRAIN_X.BATCH_SIZE
        shots=16, print_freq=20, backbone="ViT-B/16"),  # TRAIN.PRINT_FREQ, MODEL.BACKBONE
    # configs/trainers/IVLP/vit_b16_c2_ep5_batch4_2+2ctx.yaml (independentVL.py)
    "ivlp": dict(
        n_ctx_text=2, n_ctx_vision=2,  # the config's TRAINER.IVLP.N_CTX_TEXT, N_CTX_VISION
        text_depth=12, vision_depth=12,  # PROMPT_DEPTH_TEXT, PROMPT_DEPTH_VISION
        ctx_init="a photo of a",  # CTX_INIT (text prompts only)
        lr=0.0035, epochs=5, batch_size=4,  # OPTIM.LR, OPTIM.MAX_EPOCH, TRAIN_X.BATCH_SIZE
        shots=16, print_freq=20, backbone="ViT-B/16"),  # TRAIN.PRINT_FREQ, MODEL.BACKBONE
}
DEFAULTS = VARIANTS["ivlp"]
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
        # NOTE(official code): unlike CoOp, n_ctx is kept and the prompt text is the whole
        # init string: its first n_ctx tokens ("a photo") are learned, the rest ("of a")
        # stay fixed tokens in token_suffix. (The official code silently falls back to
        # random context for n_ctx > 4; here a too-short init string is an error instead.)
        with torch.no_grad():
            ids = torch.tensor(init_ids[:n_ctx], device=device)  # (n_ctx,)
            return embed(ids).float(), ctx_init  # (n_ctx, D)
    # "X X ... X" reserves n_ctx positions so the EOT lands where the feature is read.
    return torch.randn(n_ctx, D) * 0.02, " ".join(["X"] * n_ctx)  # (n_ctx, D), N(0, 0.02)


class VLPromptLearner(nn.Module):
    """Text prompts P_0..P_{J-1} and vision prompts P~_0..P~_{J~-1}: all of IVLP's weights."""

    def __init__(self, clip_model, classnames, n_ctx_text=2, n_ctx_vision=2, text_depth=12,
                 vision_depth=12, ctx_init="a photo of a"):
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
        if text_depth:
            ctx_vectors, prefix = _context_vectors(embed, n_ctx_text, ctx_init, D)  # (M, D)
        else:  # deep vision prompting: the text is the hand-written prompt, nothing learned
            n_ctx_text, ctx_vectors, prefix = 0, None, ctx_init.replace("_", " ")
        # Precision, the same in every method file here: learned tensors are fp32 and the
        # frozen CLIP casts them to its own dtype where they enter it (fp16 after
        # clip.load(fp16=True)). NOTE(simplification): the official code keeps ctx in CLIP's
        # dtype and the other prompts in fp32, with explicit .half() casts where they enter
        # (and its VPT trainer runs CLIP in fp32 whatever PREC says).
        self.ctx = None if ctx_vectors is None else nn.Parameter(ctx_vectors)  # (M, D)   P_0
        self.compound_prompts_text = nn.ParameterList(
            [nn.Parameter(torch.randn(n_ctx_text, D) * 0.02)  # (n_ctx_text, D)   P_i, N(0, 0.02)
             for _ in range(text_depth - 1)])
        # NOTE(official code): the vision prompts live in its forked CLIP (VisionTransformer.VPT
        # and each block's VPT_shallow, trained by the name "VPT"), all N(0, 0.02). Here they
        # live in the prompt learner, with the text prompts, and CLIP stays unforked.
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
        # Exact cut: the text tower is causal and read at EOT, so positions after the longest
        # prompt's EOT never matter.
        L = int(tokens.argmax(dim=-1).max()) + 1  # EOT has the largest id, so argmax finds it
        tokens = tokens[:, :L]  # (n_cls, L)
        with torch.no_grad():
            embedding = embed(tokens.to(device)).float()  # (n_cls, L, D)
        # Class-name-dependent and frozen; persistent=False keeps them out of state_dict(), so
        # the learned state loads into a model built for other class names (base -> new).
        self.register_buffer("token_prefix", embedding[:, :1], persistent=False)  # (n_cls, 1, D)
        self.register_buffer("token_suffix", embedding[:, 1 + n_ctx_text:],
                             persistent=False)  # (n_cls, L-1-n_ctx_text, D)
        self.register_buffer("tokenized_prompts", tokens, persistent=False)  # (n_cls, L)
        self.to(device)

    def text_prompts(self):
        """Input-layer text prompts, CoOp's "end" layout [SOS | P_0 | "of a" class "." EOT];
        with J = 0 the hand-written prompt [SOS "a photo of a" class "." EOT]."""
        n_cls = self.token_prefix.shape[0]
        ctx = [] if self.ctx is None else [self.ctx.expand(n_cls, -1, -1)]  # (n_cls, M, D)
        return torch.cat([self.token_prefix, *ctx, self.token_suffix], dim=1)  # (n_cls, L, D)

    def vision_prompts(self):
        """The vision prompts P~_0..P~_{J~-1}: J~ tensors (n_ctx_vision, Dv), learned as they
        are (MaPLe computes them from the text prompts here)."""
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


class IVLP(nn.Module):
    """Frozen CLIP (ViT) + VLPromptLearner. forward(images) -> logits (B, n_cls).

    The deep prompts are inserted by looping over CLIP's blocks here, so clip/ is not forked."""

    def __init__(self, clip_model, classnames, n_ctx_text=2, n_ctx_vision=2, text_depth=12,
                 vision_depth=12, ctx_init="a photo of a"):
        super().__init__()
        if not isinstance(clip_model.visual, VisionTransformer):
            raise ValueError(f"IVLP needs a ViT backbone (ViT-B/32, ViT-B/16, ViT-L/14, ...): "
                             f"its vision prompts are tokens of the image transformer, and this "
                             f"CLIP's image encoder is a {type(clip_model.visual).__name__}.")
        for name, depth, tower in (("text_depth", text_depth, clip_model.transformer),
                                   ("vision_depth", vision_depth, clip_model.visual.transformer)):
            if not isinstance(depth, int) or not 0 <= depth <= len(tower.resblocks):
                raise ValueError(f"{name} must be an int in 0..{len(tower.resblocks)} (the "
                                 f"layers of this CLIP's {name[:-6]} tower), got {depth!r}.")
        if not text_depth and not vision_depth:
            raise ValueError("text_depth and vision_depth are both 0: nothing would be learned "
                             "(CLIP with a hand-written prompt is zeroshot.py).")
        self.clip_model = clip_model.requires_grad_(False).eval()  # frozen, never fine-tuned
        self.prompt_learner = VLPromptLearner(clip_model, classnames, n_ctx_text, n_ctx_vision,
                                              text_depth, vision_depth, ctx_init)
        self.per_class = False  # the prompts fit any classes
        if not text_depth:
            # NOTE(official code): VPT's FixedEmbeddings, CLIP's features of the hand-written
            # prompt, computed once (here by the same text branch, with no prompt learned).
            with torch.no_grad():
                fixed = self.encode_text(self.prompt_learner.text_prompts(), [])  # (n_cls, Dj)
            self.register_buffer("fixed_text_features", fixed, persistent=False)

    def train(self, mode=True):
        super().train(mode)  # the frozen CLIP always stays in eval mode
        self.clip_model.eval()
        return self

    def encode_text(self, prompts, deep_prompts):
        """Text branch. prompts (n_cls, L, D) with P_0 in place; deep_prompts: P_1..P_{J-1},
        each (n_ctx_text, D), overwriting positions 1..n_ctx_text at blocks 1..J-1
        -> (n_cls, Dj)."""
        m, tokens = self.clip_model, self.prompt_learner.tokenized_prompts
        n_ctx = self.prompt_learner.n_ctx_text  # M
        x = (prompts + m.positional_embedding[:prompts.shape[1]]).to(m.dtype)  # (n_cls, L, D)
        for i, block in enumerate(m.transformer.resblocks):
            if 1 <= i <= len(deep_prompts):  # deep prompts get no positional embedding
                p = deep_prompts[i - 1].to(x.dtype).expand(x.shape[0], -1, -1)  # (n_cls, n_ctx, D)
                x = torch.cat([x[:, :1], p, x[:, 1 + n_ctx:]], dim=1)  # (n_cls, L, D)
            x = block(x)
        return m.pool_text(x, tokens.argmax(dim=-1))  # (n_cls, Dj), read at EOT

    def encode_image(self, images, prompt=None, deep_prompts=()):
        """Image branch. prompt: P~_0 (n_ctx_vision, Dv), appended after the patches; deep_prompts:
        P~_1.., each (n_ctx_vision, Dv), replacing the last n_ctx_vision tokens at blocks 1, 2, ...
        No prompts: CLIP's encode_image."""
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
        """Normalised class features (n_cls, Dj): compute once to evaluate many batches."""
        if not self.prompt_learner.text_depth:  # deep vision prompting: nothing learned here
            return F.normalize(self.fixed_text_features, dim=-1)  # (n_cls, Dj)
        pl = self.prompt_learner
        g = self.encode_text(pl.text_prompts(), list(pl.compound_prompts_text))  # (n_cls, Dj)
        return F.normalize(g, dim=-1)

    def forward(self, images, text_features=None):
        """images (B, 3, H, W) -> logits (B, n_cls). Pass text_features from text_features()
        at evaluation to skip the text branch."""
        prompts, deep_text, vision, deep_vision = self.prompt_learner()  # built once (free)
        if text_features is None and not self.prompt_learner.text_depth:  # VPT: fixed features
            text_features = F.normalize(self.fixed_text_features, dim=-1)  # (n_cls, Dj)
        elif text_features is None:
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
    model = IVLP(tiny.eval(), ["cat", "dog", "sea_lion", "fox", "golden retriever"],
                 text_depth=2, vision_depth=2)  # the tiny CLIP has 2 layers per tower
    prompts, deep_text, vision, deep_vision = model.prompt_learner()
    print("text prompts", tuple(prompts.shape), "deep text", [tuple(p.shape) for p in deep_text],
          "vision prompts", [tuple(p.shape) for p in [vision, *deep_vision]])
    logits = model(torch.randn(2, 3, 32, 32))  # (B, n_cls)
    logits.logsumexp(-1).sum().backward()  # gradients reach both branches' prompts
    print("logits", tuple(logits.shape))
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"trainable parameters {n:,}:", [k for k, _ in model.prompt_learner.named_parameters()])
