"""CoOp: Context Optimization.

Kaiyang Zhou, Jingkang Yang, Chen Change Loy, Ziwei Liu. "Learning to Prompt for
Vision-Language Models". IJCV 2022, arXiv:2109.01134 (section numbers refer to v6).

Idea. Zero-shot CLIP classifies with a hand-written prompt such as "a photo of a {class}.",
and small wording changes move accuracy by points (notes: hand-tuned prompts are trial and
error in a black box). CoOp replaces the context words by M learnable vectors and trains only
them, by cross-entropy on a few labelled images, with both CLIP encoders frozen. The context
is a static prompt (静态提示): image-agnostic, the same vectors for every image. It is either
unified (统一上下文, one set shared by all classes) or class-specific (类专属上下文, `csc`,
one set per class). Trained on base classes it fits them well but overfits them (base-class
overfitting, 记忆化): the learned context moves every class prototype in the direction that
separates the base classes, prototype distortion (原型扭曲), which hurts unseen (new) classes
(CoCoOp's motivation; compare base and new accuracy with train.py --protocol base2new).

Equations (paper Sec. 3.1-3.2):
    prompt     t_i = [V]_1 [V]_2 ... [V]_M [CLASS]_i       ([V]^i_m with class-specific context)
    predict    p(y = i | x) = exp(cos(g(t_i), f) / τ) / Σ_j exp(cos(g(t_j), f) / τ)
    variants   [CLASS] in the middle: [V]_1 ... [V]_{M/2} [CLASS] [V]_{M/2+1} ... [V]_M
               or at the front:       [CLASS] [V]_1 ... [V]_M

Symbol -> code:
    M           n_ctx                      [V]_m     ctx[m] (ctx[i, m] with csc)
    [CLASS]_i   class-name token embeddings at the start of token_suffix[i]
    g(·)        clip_model.encode_text_embeddings (frozen text encoder)
    f           normalised clip_model.encode_image(x) (frozen image encoder)
    τ           1 / clip_model.logit_scale.exp()   (frozen; 1/100 with OpenAI's weights)

Context rule (the same in every prompt learner here): ctx_init, when given, initialises the
context: its first n_ctx tokens become the learned vectors and any further words stay fixed in
the prompt; n_ctx larger than ctx_init's token count is an error; ctx_init "" gives n_ctx random
vectors. NOTE(official code): CoOp's code ignores N_CTX when CTX_INIT is set and learns every word
(n_ctx = the word count); its configs pair N_CTX 4 with "a photo of a" (4 tokens), where the two
rules agree.

Shape legend: B images, n_cls classes, n_ctx context tokens (M), L prompt positions kept (up to
the longest prompt's EOT, <= 77), D text width (512 for ViT-B/16), E joint embedding dim (512).

Notes: prompt-learning-notes.md, "CoOp和CoCoOp" (static prompt, context, prototype distortion).
Run: python train.py --method coop --dataset oxford_pets --root DATA --protocol fewshot
"""
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

import clip
from clip.tokenizer import encode

# Few-shot defaults (the paper's main table). train.py passes every key but lr, epochs,
# batch_size and print_freq to CoOp(...), and takes the epochs from epochs_for().
DEFAULTS = dict(
    n_ctx=16,                     # M; scripts/coop/main.sh NCTX=16 (paper Sec. 4.1)
    ctx_init="",                  # random N(0, 0.02); configs/trainers/CoOp/rn50.yaml CTX_INIT ""
    csc=False,                    # unified context; scripts/coop/main.sh CSC=False
    class_token_position="end",   # scripts/coop/main.sh CTP=end
    lr=0.002,                     # configs/trainers/CoOp/rn50.yaml OPTIM.LR
    epochs=200,                   # 8/16 shots, rn50.yaml; see epochs_for() for other shots
    batch_size=32,                # rn50.yaml DATALOADER.TRAIN_X.BATCH_SIZE
    print_freq=5,                 # rn50.yaml TRAIN.PRINT_FREQ
)
# Other protocols' changes to DEFAULTS (train.py --protocol). Base-to-new (CoCoOp paper Table 1,
# "CoOp" rows): CoOp:scripts/cocoop/base2new_train.sh selects configs/trainers/CoOp/
# vit_b16_ctxv1.yaml, i.e. M = 4 initialised from "a photo of a" (200 epochs, batch 32; ImageNet
# vit_b16_ep50_ctxv1).
# Cross-dataset transfer (CoCoOp paper Tables 2-3, "CoOp" rows: train on ImageNet, evaluate on
# the other datasets): NOTE(inferred) the same vit_b16_ctxv1 setting, 50 epochs on ImageNet
# (epochs_for); the paper does not print CoOp's transfer configuration.
PROTOCOLS = {"base2new": dict(n_ctx=4, ctx_init="a photo of a"),
             "crossdataset": dict(n_ctx=4, ctx_init="a photo of a")}


def epochs_for(shots, dataset):
    """Epochs by shot count (CoOp:COOP.md config names): 1 shot rn50_ep50, 2 and 4 shots
    rn50_ep100, 8 and 16 shots rn50 (200); ImageNet always *_ep50."""
    if dataset == "imagenet" or 0 < shots <= 1:
        return 50
    return 100 if 0 < shots <= 4 else 200


class PromptLearner(nn.Module):
    """The learned context vectors and the frozen token embeddings around them."""

    def __init__(self, clip_model, classnames, n_ctx=16, ctx_init="", csc=False,
                 class_token_position="end"):
        super().__init__()
        if not isinstance(n_ctx, int) or n_ctx < 1:
            raise ValueError(f"n_ctx must be a positive int, got {n_ctx!r}")
        if n_ctx > clip_model.context_length - 4:  # before allocating: SOS, a name, ".", EOT
            raise ValueError(f"n_ctx={n_ctx} context tokens do not fit the text encoder's "
                             f"{clip_model.context_length} positions with SOS, a class name, '.' "
                             f"and EOT: pass n_ctx <= {clip_model.context_length - 4}")
        if class_token_position not in ("end", "middle", "front"):
            raise ValueError(f"class_token_position must be 'end', 'middle' or 'front', "
                             f"got {class_token_position!r}")
        embedding = clip_model.token_embedding
        D = clip_model.ln_final.weight.shape[0]  # the text width, read from the model, not 512
        classnames = [name.replace("_", " ") for name in classnames]
        self.n_cls, self.class_token_position = len(classnames), class_token_position

        # notes: "什么是上下文" -- the context replaces the words of "a photo of a {}.".
        if ctx_init:  # the context rule: see CoOp's docstring
            ctx_init = ctx_init.replace("_", " ")
            init_ids = encode(ctx_init)
            if n_ctx > len(init_ids):
                raise ValueError(f"n_ctx={n_ctx} is more than the {len(init_ids)} tokens of "
                                 f"ctx_init={ctx_init!r}: pass n_ctx <= {len(init_ids)}, or "
                                 f"ctx_init='' for {n_ctx} random context vectors")
            if n_ctx < len(init_ids) and class_token_position != "end":
                raise ValueError(f"class_token_position={class_token_position!r} moves the "
                                 f"class name into the context: learn all of ctx_init (n_ctx="
                                 f"{len(init_ids)}) or use class_token_position='end'")
            if csc:
                warnings.warn("csc is ignored with ctx_init: the context is initialised from "
                              "the words and shared by all classes (as in the official code)")
            with torch.no_grad():
                ids = torch.tensor(init_ids[:n_ctx], device=embedding.weight.device)
                ctx = embedding(ids).float()  # (n_ctx, D)
            prefix_text = ctx_init
        else:
            shape = (self.n_cls, n_ctx, D) if csc else (n_ctx, D)
            ctx = torch.empty(shape, device=embedding.weight.device)
            nn.init.normal_(ctx, std=0.02)  # the token embeddings' own scale (std 0.02)
            # Placeholder words: "X X ... X {class}." tokenises to exactly the positions of the
            # final prompt, so token_suffix lines up after the context and the EOT position
            # (where the text feature is read) is where it will be.
            prefix_text = " ".join(["X"] * n_ctx)
        self.n_ctx = n_ctx
        # Precision, the same in every method file here: learned tensors are fp32 and the
        # frozen CLIP casts them to its own dtype where they enter it (fp16 after
        # clip.load(fp16=True)). NOTE(simplification): the official fp16 mode keeps ctx in fp16
        # and lets SGD update fp16 values directly.
        self.ctx = nn.Parameter(ctx)  # (n_ctx, D) unified or (n_cls, n_ctx, D) class-specific

        prompts = [f"{prefix_text} {name}." for name in classnames]
        self.name_lens = [len(encode(name)) for name in classnames]  # class-name BPE tokens
        check_lengths(classnames, prompts, n_ctx, self.name_lens, clip_model.context_length)
        tokens = clip.tokenize(prompts, clip_model.context_length)  # (n_cls, 77)
        # Exact cut: the text tower is causal and read at EOT, so positions after the longest
        # prompt's EOT never matter.
        L = int(tokens.argmax(dim=-1).max()) + 1  # EOT has the largest id, so argmax finds it
        tokens = tokens[:, :L]  # (n_cls, L)
        with torch.no_grad():
            embedded = embedding(tokens.to(embedding.weight.device)).float()  # (n_cls, L, D)
        # Frozen pieces around the context: SOS, then class tokens, ".", EOT and padding. They
        # depend on the class names, so persistent=False keeps them out of state_dict(): a
        # checkpoint holds only ctx and loads into a model built for other classes (base ->
        # new, cross-dataset). The official code saves them and deletes them again on load.
        self.register_buffer("token_prefix", embedded[:, :1], persistent=False)  # (n_cls, 1, D)
        self.register_buffer("token_suffix", embedded[:, 1 + n_ctx:],
                             persistent=False)  # (n_cls, L - 1 - n_ctx, D)
        # NOTE(official code): the text feature is read at the EOT of these placeholder ids
        # (argmax), not of the learned embeddings; they are used for nothing else.
        self.register_buffer("tokenized_prompts", tokens.to(embedding.weight.device),
                             persistent=False)  # (n_cls, L)

    def forward(self):
        ctx = self.ctx
        if ctx.dim() == 2:  # unified context: the same M vectors for every class
            ctx = ctx.unsqueeze(0).expand(self.n_cls, -1, -1)  # (n_ctx, D) -> (n_cls, n_ctx, D)
        if self.class_token_position == "end":
            # t_i = [SOS] [V]_1 ... [V]_M [CLASS]_i . [EOT] (Sec. 3.2)
            return torch.cat([self.token_prefix, ctx, self.token_suffix], dim=1)  # (n_cls, L, D)
        return place_class_tokens(self.token_prefix, ctx, self.token_suffix, self.name_lens,
                                  self.class_token_position)  # (n_cls, L, D)


def place_class_tokens(prefix, ctx, suffix, name_lens, position):
    """The "middle" and "front" variants of Sec. 3.2 (about two thirds of the official forward).

    prefix (n_cls, 1, D), ctx (n_cls, n_ctx, D), suffix (n_cls, L-1-n_ctx, D) -> (n_cls, L, D).
    Only the order changes, never the length, so EOT stays at the position that
    tokenized_prompts records. Class i's name is the first name_lens[i] rows of its suffix."""
    half = ctx.shape[1] // 2
    prompts = []
    for i, n in enumerate(name_lens):
        name, rest = suffix[i:i + 1, :n], suffix[i:i + 1, n:]  # (1, n, D); (1, ., EOT, pad)
        if position == "middle":  # [V]_1 .. [V]_{M/2} [CLASS] [V]_{M/2+1} .. [V]_M
            parts = [prefix[i:i + 1], ctx[i:i + 1, :half], name, ctx[i:i + 1, half:], rest]
        else:  # front: [CLASS] [V]_1 .. [V]_M
            parts = [prefix[i:i + 1], name, ctx[i:i + 1], rest]
        prompts.append(torch.cat(parts, dim=1))  # (1, L, D)
    return torch.cat(prompts, dim=0)  # (n_cls, L, D)


def check_lengths(classnames, prompts, n_ctx, name_lens, context_length):
    """SOS + context + class name + "." + EOT must fit in the context length (77): long class
    names with 16 context tokens do not always (openai/CLIP #187), so say which and what to do."""
    for name, prompt, n_name in zip(classnames, prompts, name_lens):
        n = len(encode(prompt)) + 2  # + SOS and EOT
        if n > context_length:
            raise ValueError(
                f"the prompt for class {name!r} is {n} tokens (SOS, the {n_ctx} context tokens "
                f"and any fixed words, {n_name} class-name tokens, '.', EOT) but the context "
                f"length is {context_length}: use a shorter ctx_init, fewer context tokens "
                "(n_ctx) or a shorter class name")


class CoOp(nn.Module):
    """Frozen CLIP + PromptLearner: logits (B, n_cls) = exp(logit_scale) * cos(f, g(t_i))."""

    def __init__(self, clip_model, classnames, n_ctx=16, ctx_init="", csc=False,
                 class_token_position="end"):
        super().__init__()
        clip_model.requires_grad_(False)  # both encoders and logit_scale stay frozen
        self.clip_model = clip_model
        self.prompt_learner = PromptLearner(clip_model, classnames, n_ctx, ctx_init, csc,
                                            class_token_position)  # the only trained parameters
        # Class-specific context has one row per training class: it fits only those classes (not
        # base -> new, not another dataset). Unified context fits any classes.
        self.per_class = self.prompt_learner.ctx.dim() == 3

    def train(self, mode=True):
        # NOTE(official code): Dassl puts only the prompt learner in train mode; CLIP stays in
        # eval mode, so an RN50's BatchNorm keeps its pretrained running statistics.
        super().train(mode)
        self.clip_model.eval()
        return self

    def text_features(self):
        """Normalised class features g(t_i) (n_cls, E). They do not depend on the image (the
        context is image-agnostic), so evaluation computes them once for all test batches."""
        prompts = self.prompt_learner()  # (n_cls, L, D), t_i = [SOS] [V]_1 .. [V]_M [CLASS]_i
        g = self.clip_model.encode_text_embeddings(prompts, self.prompt_learner.tokenized_prompts)
        return F.normalize(g, dim=-1)  # (n_cls, E)

    def forward(self, images, text_features=None):
        with torch.no_grad():  # frozen image encoder: no autograd graph needed
            f = F.normalize(self.clip_model.encode_image(images), dim=-1)  # (B, E)
        g = self.text_features() if text_features is None else text_features  # (n_cls, E)
        # p(y=i|x) ∝ exp(cos(g(t_i), f) / τ), with 1/τ = exp(logit_scale), frozen as in CoOp
        return self.clip_model.logit_scale.exp() * f @ g.t()  # (B, n_cls)


if __name__ == "__main__":
    # Self-check with a tiny random CLIP: no weights, no data.
    torch.manual_seed(0)
    tiny = clip.CLIP(embed_dim=32, image_resolution=32, vision_layers=2, vision_width=64,
                     vision_patch_size=8, context_length=77, vocab_size=49408,
                     transformer_width=64, transformer_heads=1, transformer_layers=2)
    names = ["cat", "dog", "red fox", "golden_retriever", "airplane"]
    for kwargs in (dict(), dict(csc=True), dict(n_ctx=4, ctx_init="a photo of a"),
                   dict(class_token_position="middle")):
        model = CoOp(tiny, names, **kwargs)
        logits = model(torch.randn(2, 3, 32, 32))
        n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
        print(f"{kwargs}: ctx {tuple(model.prompt_learner.ctx.shape)}, prompts "
              f"{tuple(model.prompt_learner().shape)}, logits {tuple(logits.shape)}, "
              f"trainable parameters {n_train:,}")
