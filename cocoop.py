"""CoCoOp: Conditional Prompt Learning for Vision-Language Models.

Kaiyang Zhou, Jingkang Yang, Chen Change Loy, Ziwei Liu. CVPR 2022. arXiv:2203.05557v2.
Equations are quoted by content, not number (numbers were not checked against v2).

CoOp learns one static prompt (静态提示) per dataset: the same context vectors for every image.
Trained on a few base classes, that context overfits them (记忆化): it pulls every class
prototype toward whatever separates the base classes, so unseen classes are scored with a bias
tuned for other classes and accuracy on them drops below zero-shot CLIP. CoCoOp keeps CoOp's
context and adds a tiny meta-net (Meta-Net) that reads the image feature and emits one token
pi(x), added to every context vector: an instance-conditional prompt that follows the image's
own attributes (the notes' instance attributes, 实例属性, which a static context cannot
follow) instead of memorising the base classes. It sits between CoOp ("specialised and
precise", “专”而“精”) and CLIP's hand-written prompt ("broad but coarse", “广”而“糙”).
Base/new accuracy, 11-dataset averages, ViT-B/16: CLIP 69.34/74.22, CoOp 82.69/63.22, CoCoOp
80.47/71.69.

    pi = h_theta(x)                        one shift per image, from its image feature
    v_m(x) = v_m + pi,   m = 1..M          the same shift for every context token
    t_i(x) = [SOS, v_1(x), ..., v_M(x), c_i, ".", EOT]
    p(y = i | x) = exp(cos(x, g(t_i(x))) / tau) / sum_j exp(cos(x, g(t_j(x))) / tau)

Symbol -> code:
    M <-> n_ctx            v_m <-> ctx[m]               c_i <-> class tokens in token_suffix[i]
    h_theta <-> meta_net   pi <-> bias                  x <-> image_features (L2-normalised)
    t_i(x) <-> PromptLearner.forward(x)[:, i]          tau <-> 1 / clip_model.logit_scale.exp()
    g(.) <-> clip_model.encode_text_embeddings (in CoCoOp.encode_text's batched pass)

Context rule (the same in every prompt learner here): ctx_init, when given, initialises the
context: its first n_ctx tokens become the learned vectors and any further words stay fixed in
the prompt; n_ctx larger than ctx_init's token count is an error; ctx_init "" gives n_ctx random
vectors. NOTE(official code): CoCoOp's code ignores N_CTX when CTX_INIT is set and learns every
word (n_ctx = the word count); its configs pair N_CTX 4 with "a photo of a" (4 tokens), where the
two rules agree.

Shape legend: B images, n_cls classes, n_ctx context tokens (M), L prompt positions kept (up to
the longest prompt's EOT, <= 77), D text width (512 for ViT-B/16), E joint embedding dim (512).

Notes: prompt-learning-notes.md, "CoOp和CoCoOp" (static prompts, CoCoOp between CoOp and CLIP).
Run: python train.py --method cocoop --dataset dtd --root DATA   (base -> new protocol)
"""
from collections import OrderedDict

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import clip
from clip.tokenizer import encode

DEFAULTS = dict(
    backbone="ViT-B/16",  # configs/trainers/CoCoOp/vit_b16_c4_ep10_batch1_ctxv1.yaml
    n_ctx=4,  # same config (N_CTX); the tokens of ctx_init learned (the context rule)
    ctx_init="a photo of a",  # same config (CTX_INIT), the base->new scripts' default
    lr=0.002,  # same config (OPTIM.LR), SGD
    epochs=10,  # same config (OPTIM.MAX_EPOCH)
    batch_size=1,  # same config (DATALOADER.TRAIN_X.BATCH_SIZE); memory, see CoCoOp.forward
    shots=16,  # scripts/cocoop/base2new_train.sh (NUM_SHOTS)
    print_freq=20,  # same config (TRAIN.PRINT_FREQ)
)
# Every protocol uses these: CoOp:scripts/cocoop/xd_train.sh trains the cross-dataset source
# model (ImageNet, 16 shots) with the same config.


def _tokenize_prompts(prompts, classnames, context_length):
    """Tokenize one prompt per class; a prompt over CLIP's context raises naming the class."""
    rows = []
    for name, text in zip(classnames, prompts):
        try:
            rows.append(clip.tokenize(text, context_length))  # (1, 77)
        except RuntimeError as e:
            raise ValueError(f"class name {name!r} makes the prompt too long: {e} Shorten the "
                             "class name or ctx_init.") from None
    return torch.cat(rows)  # (n_cls, 77)


class PromptLearner(nn.Module):
    """The learned context ctx and the meta-net h_theta: all of CoCoOp's trainable weights."""

    def __init__(self, clip_model, classnames, n_ctx=4, ctx_init="a photo of a"):
        super().__init__()
        if not isinstance(n_ctx, int) or n_ctx < 1:
            raise ValueError(f"n_ctx must be a positive int, got {n_ctx!r}")
        if n_ctx > clip_model.context_length - 4:  # before allocating: SOS, a name, ".", EOT
            raise ValueError(f"n_ctx={n_ctx} context tokens do not fit the text encoder's "
                             f"{clip_model.context_length} positions with SOS, a class name, '.' "
                             f"and EOT: pass n_ctx <= {clip_model.context_length - 4}")
        D = clip_model.ln_final.weight.shape[0]  # text width, read from the model
        E = clip_model.visual.output_dim  # image feature dim = meta-net input
        embed = clip_model.token_embedding
        device = embed.weight.device  # build on CLIP's device; lookups need ids there
        if ctx_init:  # the context rule: see the module docstring
            ctx_init = ctx_init.replace("_", " ")
            init_ids = encode(ctx_init)  # BPE ids of the init words, no SOS/EOT
            if n_ctx > len(init_ids):
                raise ValueError(f"n_ctx={n_ctx} is more than the {len(init_ids)} tokens of "
                                 f"ctx_init={ctx_init!r}: pass n_ctx <= {len(init_ids)}, or "
                                 f"ctx_init='' for {n_ctx} random context vectors")
            with torch.no_grad():
                ids = torch.tensor(init_ids[:n_ctx], device=device)  # (n_ctx,)
                ctx_vectors = embed(ids).float()  # (n_ctx, D)
            prefix = ctx_init
        else:
            ctx_vectors = torch.randn(n_ctx, D) * 0.02  # (n_ctx, D), N(0, 0.02) as CoOp
            # "X X ... X" only reserves n_ctx positions, so that the tokenized prompt has the
            # right length and its EOT sits where the text encoder will read the feature.
            prefix = " ".join(["X"] * n_ctx)
        # Precision, the same in every method file here: learned tensors are fp32 and the
        # frozen CLIP casts them to its own dtype where they enter it (fp16 after
        # clip.load(fp16=True)). NOTE(simplification): the official fp16 mode converts ctx and
        # the meta-net to fp16 and lets SGD update fp16 values directly.
        self.ctx = nn.Parameter(ctx_vectors)  # (n_ctx, D)
        # Meta-Net: a Linear-ReLU-Linear bottleneck that shrinks E by 16 (E=512: hidden 32).
        self.meta_net = nn.Sequential(OrderedDict([
            ("linear1", nn.Linear(E, E // 16)),  # (E,) -> (E/16,)
            ("relu", nn.ReLU(inplace=True)),
            ("linear2", nn.Linear(E // 16, D)),  # (E/16,) -> (D,)
        ]))
        self.n_ctx = n_ctx

        classnames = [name.replace("_", " ") for name in classnames]
        tokens = _tokenize_prompts([f"{prefix} {name}." for name in classnames], classnames,
                                   clip_model.context_length)  # (n_cls, 77)
        # Exact cut: the text tower is causal and read at EOT, so positions after the longest
        # prompt's EOT never matter. Keeping only L positions keeps the B*n_cls copies small.
        L = int(tokens.argmax(dim=-1).max()) + 1  # EOT has the largest id, so argmax finds it
        tokens = tokens[:, :L]  # (n_cls, L)
        with torch.no_grad():
            embedding = embed(tokens.to(device)).float()  # (n_cls, L, D)
        # Frozen embeddings that depend on the class names: SOS before the context, then class
        # tokens, ".", EOT and padding. persistent=False keeps them out of state_dict(), so the
        # learned state loads into a model built for other class names (base -> new).
        self.register_buffer("token_prefix", embedding[:, :1], persistent=False)  # (n_cls, 1, D)
        self.register_buffer("token_suffix", embedding[:, 1 + n_ctx:],
                             persistent=False)  # (n_cls, L-1-n_ctx, D)
        self.register_buffer("tokenized_prompts", tokens, persistent=False)  # (n_cls, L)
        self.to(device)

    def context(self, image_features):
        """Normalised image features (B, E) -> each image's context v_m(x) (B, n_ctx, D)."""
        bias = self.meta_net(image_features)  # (B, D)   pi = h_theta(x)
        return self.ctx + bias[:, None, :]  # (B, n_ctx, D)   v_m(x) = v_m + pi

    def forward(self, image_features):
        """Normalised image features (B, E) -> one prompt per image and class (B, n_cls, L, D)."""
        ctx = self.context(image_features)  # (B, n_ctx, D)
        B, n_cls = ctx.shape[0], self.token_prefix.shape[0]
        ctx = ctx[:, None].expand(-1, n_cls, -1, -1)  # (B, n_cls, n_ctx, D)
        prefix = self.token_prefix.expand(B, -1, -1, -1)  # (B, n_cls, 1, D)
        suffix = self.token_suffix.expand(B, -1, -1, -1)  # (B, n_cls, L-1-n_ctx, D)
        return torch.cat([prefix, ctx, suffix], dim=2)  # (B, n_cls, L, D)   t_i(x)


class CoCoOp(nn.Module):
    """Frozen CLIP + PromptLearner. forward(images) -> logits (B, n_cls); no loss inside.

    chunk_size: at most this many of the B*n_cls prompts per text-encoder pass; None: all in
    one pass. Without gradients (evaluation, test batch 100) chunks cost nothing extra. When
    training, each chunk is recomputed in backward (activation checkpointing, about a third more
    text-encoder work), so the stored activations are one chunk's instead of all B*n_cls
    sequences'. The default 1024 leaves the paper's setting (batch 1, <= 1000 classes) in one
    pass. The result is the same either way (up to float rounding)."""

    def __init__(self, clip_model, classnames, n_ctx=4, ctx_init="a photo of a",
                 chunk_size=1024):
        super().__init__()
        if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
            raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
        self.clip_model = clip_model.requires_grad_(False).eval()  # frozen, never fine-tuned
        self.prompt_learner = PromptLearner(clip_model, classnames, n_ctx, ctx_init)
        self.chunk_size = chunk_size
        self.per_class = False  # the context and the meta-net fit any classes

    def train(self, mode=True):
        # The frozen CLIP always stays in eval mode, as in the official trainer (which puts only
        # the prompt learner in train mode): ResNet BatchNorm keeps its running statistics.
        super().train(mode)
        self.clip_model.eval()
        return self

    def forward(self, images):
        with torch.no_grad():  # the image encoder is frozen: no graph needed
            image_features = F.normalize(self.clip_model.encode_image(images), dim=-1)  # (B, E)
        # NOTE(official code): the meta-net reads the L2-normalised feature, not the raw one.
        prompts = self.prompt_learner(image_features.float())  # (B, n_cls, L, D), t_i(x)
        B, n_cls = prompts.shape[:2]
        # All B*n_cls prompts in one batched pass instead of the official loop over images (the
        # same text encoder, one call). Its memory grows with B*n_cls, the reason the paper
        # trains with batch 1; chunk_size bounds it.
        tokens = self.prompt_learner.tokenized_prompts.repeat(B, 1)  # (B*n_cls, L)
        g = self.encode_text(prompts.flatten(0, 1), tokens)  # (B*n_cls, L, D) -> (B*n_cls, E)
        text_features = F.normalize(g, dim=-1).view(B, n_cls, -1)  # (B, n_cls, E)
        # logit_i = cos(x, g(t_i(x))) / tau: each image has its own n_cls text features.
        logits = torch.einsum("be,bce->bc", image_features, text_features)  # (B, n_cls)
        return self.clip_model.logit_scale.exp() * logits  # 1/tau, frozen

    def encode_text(self, prompts, tokens):
        """g(.) over prompts (N, L, D) with their tokens (N, L) -> (N, E), at most chunk_size
        prompts per text-encoder pass."""
        g = self.clip_model.encode_text_embeddings
        if self.chunk_size is None or len(prompts) <= self.chunk_size:
            return g(prompts, tokens)  # (N, E)
        chunks = []
        for i in range(0, len(prompts), self.chunk_size):
            args = prompts[i:i + self.chunk_size], tokens[i:i + self.chunk_size]
            if torch.is_grad_enabled():  # keep only the chunk's input; recompute in backward
                chunks.append(checkpoint(g, *args, use_reentrant=False))  # (chunk, E)
            else:
                chunks.append(g(*args))  # (chunk, E)
        return torch.cat(chunks)  # (N, E)


if __name__ == "__main__":  # self-check on a tiny random CLIP: no weights, no data
    torch.manual_seed(0)
    tiny = clip.CLIP(embed_dim=32, image_resolution=32, vision_layers=2, vision_width=64,
                     vision_patch_size=8, context_length=77, vocab_size=49408,
                     transformer_width=64, transformer_heads=1, transformer_layers=2)
    model = CoCoOp(tiny.eval(), ["cat", "dog", "sea_lion", "fox", "golden retriever"])
    images = torch.randn(2, 3, 32, 32)  # (B, 3, H, W)
    with torch.no_grad():
        feats = F.normalize(tiny.encode_image(images), dim=-1)  # (B, E)
        print("prompts", tuple(model.prompt_learner(feats).shape))
    logits = model(images)
    logits.logsumexp(-1).sum().backward()  # gradients reach ctx and the meta-net
    print("logits", tuple(logits.shape))
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"trainable parameters {n:,}:", [k for k, _ in model.prompt_learner.named_parameters()])
