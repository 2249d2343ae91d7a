"""KgCoOp: Knowledge-guided Context Optimization.

Hantao Yao, Rui Zhang, Changsheng Xu. "Visual-Language Prompt Tuning with Knowledge-guided
Context Optimization". CVPR 2023, arXiv:2303.13283. Official code: htyao89/KgCoOp
(KgCoOp/trainers/kgcoop.py, built on CoOp's trainer).

Idea. CoOp's static prompt (静态提示), trained on the base classes, moves every class prototype
in the direction that separates the base classes: prototype distortion (原型扭曲), which the
unseen (new) classes pay for. KgCoOp's authors measured it: over the 11 datasets, the further
the learned class embeddings w_i drift from the hand-written prompt's w_i^clip, the more
new-class accuracy drops. The hand-written prompt's embeddings carry what CLIP knew before the
few shots (zero-shot CLIP generalises to any class), so KgCoOp trains CoOp's context with one
more loss term that keeps each w_i near its w_i^clip. Everything else is CoOp: the same prompt,
logits and trainable tensor, and the same cost per step (the w_i^clip are computed once).

Equations (paper Sec. 3; CoOp's prompt and prediction):
    prompt      t_i = [V]_1 [V]_2 ... [V]_M [CLASS]_i,     w_i = g(t_i)
    hand-made   w_i^clip = g("a photo of a [CLASS]_i.")   (the dataset's template; frozen)
    predict     p(y = i | x) = exp(cos(w_i, f) / τ) / Σ_j exp(cos(w_j, f) / τ)
    paper       L = L_ce + λ L_kg,   L_kg = 1/N_c Σ_i ||w_i - w_i^clip||²
    code        L = L_ce + λ (1 - 1/N_c Σ_i cos(w_i, w_i^clip)),   λ = 8
NOTE(official code): the code computes 1 - mean cosine of the normalised embeddings; for unit
vectors ||a - b||² = 2 (1 - cos(a, b)), so the code's term is half the paper's L_kg on
normalised embeddings, and its λ = 8 weighs like λ = 4 in the paper's form.

Symbol -> code:
    M           n_ctx                      [V]_m       prompt_learner.ctx[m]
    [CLASS]_i   class-name token embeddings at the start of token_suffix[i]
    g(·)        clip_model.encode_text_embeddings (frozen text encoder)
    w_i         KgCoOp.text_features()[i] (normalised)
    w_i^clip    KgCoOp.clip_text_features[i] (normalised, computed once)
    f           normalised clip_model.encode_image(x) (frozen image encoder)
    τ           1 / clip_model.logit_scale.exp()   (frozen; 1/100 with OpenAI's weights)
    λ           w          λ · (1 - mean cos)  loss_terms()["kg"]
    N_c         the number of training classes

Context rule (the same in every prompt learner here): ctx_init, when given, initialises the
context: its first n_ctx tokens become the learned vectors and any further words stay fixed in
the prompt; n_ctx larger than ctx_init's token count is an error; ctx_init "" gives n_ctx random
vectors.

Shape legend: B images, n_cls classes (N_c), n_ctx context tokens (M), L prompt positions kept (up
to the longest prompt's EOT, <= 77), D text width (512 for ViT-B/16), E joint embedding dim (512).

Notes: prompt-learning-notes.md, "CoOp和CoCoOp" (static prompt, prototype distortion).
Run: python train.py --method kgcoop --dataset oxford_pets --root DATA   (base -> new)
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

import clip
from clip.tokenizer import encode

# Base-to-new defaults. train.py passes n_ctx, ctx_init, w and template to KgCoOp(...), the
# rest is the run's. The official base-to-new runs (KgCoOp/scripts/base2new_train.sh, weight
# from KgCoOp/scripts/run.sh) use configs/trainers/KgCoOp/vit_b16_ep100_ctxv1.yaml.
DEFAULTS = dict(
    n_ctx=4,                      # M; scripts/base2new_train.sh NCTX=4
    ctx_init="a photo of a",      # vit_b16_ep100_ctxv1.yaml CTX_INIT True (see PromptLearner)
    w=8.0,                        # λ; scripts/base2new_train.sh WEIGHT=8.0 (TRAINER.COOP.W)
    template=None,                # w_i^clip's template; None: the dataset's (see KgCoOp)
    lr=0.002,                     # vit_b16_ep100_ctxv1.yaml OPTIM.LR
    epochs=100,                   # vit_b16_ep100_ctxv1.yaml OPTIM.MAX_EPOCH
    batch_size=128,               # vit_b16_ep100_ctxv1.yaml DATALOADER.TRAIN_X.BATCH_SIZE
    print_freq=5,                 # vit_b16_ep100_ctxv1.yaml TRAIN.PRINT_FREQ
    shots=16,                     # scripts/base2new_train.sh SHOTS=16
    backbone="ViT-B/16",          # vit_b16_ep100_ctxv1.yaml MODEL.BACKBONE.NAME
)
# Other protocols' changes (train.py --protocol). KgCoOp/scripts/xd_train.sh trains every dataset
# (ImageNet included) on all its classes with 4 shots and the same config and weight: the
# few-shot runs. NOTE(inferred): the repository has no other transfer script, so its ImageNet
# run is taken as the one evaluated on the other datasets (crossdataset).
# NOTE(official code): one stored version of scripts/base2new_train.sh names rn50_ep100.yaml,
# which is this config with the RN50 backbone; the paper's base-to-new numbers are ViT-B/16.
PROTOCOLS = {"fewshot": dict(shots=4), "crossdataset": dict(shots=4)}
PHOTO = clip.PHOTO  # "a photo of a {}.": CLIP's and CoOp's default template
# NOTE(official code): KgCoOp's CUSTOM_TEMPLATES (trainers/kgcoop.py) are CoOp's, which train.py
# passes as `template`, except DTD's: "a photo of a {}, a type of texture." for "{} texture.".
KGCOOP_TEMPLATES = {"{} texture.": "a photo of a {}, a type of texture."}


class PromptLearner(nn.Module):
    """The learned context vectors and the frozen token embeddings around them.

    NOTE(official code): CoOp's, less its variants: KgCoOp's forward always puts the class name
    at the end (it reads CLASS_TOKEN_POSITION and ignores it) and its scripts use unified
    context (CSC=False), so there is no `csc` and no `class_token_position` here."""

    def __init__(self, clip_model, classnames, n_ctx=4, ctx_init="a photo of a"):
        super().__init__()
        embedding = clip_model.token_embedding
        D = clip_model.ln_final.weight.shape[0]  # the text width, read from the model, not 512
        classnames = [name.replace("_", " ") for name in classnames]
        self.n_cls = len(classnames)

        if not isinstance(n_ctx, int) or n_ctx < 1:
            raise ValueError(f"n_ctx must be a positive int, got {n_ctx!r}")
        if n_ctx > clip_model.context_length - 4:  # before allocating: SOS, a name, ".", EOT
            raise ValueError(f"n_ctx={n_ctx} context tokens do not fit the text encoder's "
                             f"{clip_model.context_length} positions with SOS, a class name, '.' "
                             f"and EOT: pass n_ctx <= {clip_model.context_length - 4}")
        # notes: "什么是上下文" -- the context replaces the words of "a photo of a {}.".
        if ctx_init:  # the context rule: see the module docstring
            # NOTE(official code): KgCoOp reads CTX_INIT as a flag and always starts from "a
            # photo of a"; here the words are an option, with those as the default.
            ctx_init = ctx_init.replace("_", " ")
            init_ids = encode(ctx_init)
            if n_ctx > len(init_ids):
                raise ValueError(f"n_ctx={n_ctx} is more than the {len(init_ids)} tokens of "
                                 f"ctx_init={ctx_init!r}: pass n_ctx <= {len(init_ids)}, or "
                                 f"ctx_init='' for {n_ctx} random context vectors")
            with torch.no_grad():
                ids = torch.tensor(init_ids[:n_ctx], device=embedding.weight.device)
                ctx = embedding(ids).float()  # (n_ctx, D)
            prefix_text = ctx_init
        else:
            ctx = torch.empty(n_ctx, D, device=embedding.weight.device)
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
        self.ctx = nn.Parameter(ctx)  # (n_ctx, D)

        prompts = [f"{prefix_text} {name}." for name in classnames]
        check_lengths(classnames, prompts, n_ctx, clip_model.context_length)
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
        ctx = self.ctx.unsqueeze(0).expand(self.n_cls, -1, -1)  # (n_ctx, D) -> (n_cls, n_ctx, D)
        # t_i = [SOS] [V]_1 ... [V]_M [CLASS]_i . [EOT] (CoOp Sec. 3.2)
        return torch.cat([self.token_prefix, ctx, self.token_suffix], dim=1)  # (n_cls, L, D)


def check_lengths(classnames, prompts, n_ctx, context_length):
    """SOS + context + class name + "." + EOT must fit in the context length (77)."""
    for name, prompt in zip(classnames, prompts):
        n = len(encode(prompt)) + 2  # + SOS and EOT
        if n > context_length:
            raise ValueError(
                f"the prompt for class {name!r} is {n} tokens (SOS, the {n_ctx} context tokens "
                f"and any fixed words, the class name, '.', EOT) but the context length is "
                f"{context_length}: use a shorter ctx_init, fewer context tokens (n_ctx) or a "
                "shorter class name")


class KgCoOp(nn.Module):
    """Frozen CLIP + PromptLearner: CoOp's logits, and the loss term λ (1 - mean_i cos(w_i,
    w_i^clip)) for the last training batch (loss_terms())."""
    per_class = False  # one context for all classes: it fits any classes (base -> new)

    def __init__(self, clip_model, classnames, n_ctx=4, ctx_init="a photo of a", w=8.0,
                 template=PHOTO):
        super().__init__()
        if not isinstance(w, (int, float)) or w < 0:
            raise ValueError(f"w (the weight λ of the knowledge-guided loss) must be a number "
                             f">= 0, got {w!r}; 0 gives CoOp")
        template = clip.check_template(KGCOOP_TEMPLATES.get(template, template or PHOTO))
        clip_model.requires_grad_(False)  # both encoders and logit_scale stay frozen
        self.clip_model = clip_model
        self.prompt_learner = PromptLearner(clip_model, classnames, n_ctx,
                                            ctx_init)  # the only trained parameters
        self.w = w
        names = [name.replace("_", " ") for name in classnames]
        try:
            tokens = clip.tokenize([template.format(name) for name in names],
                                   clip_model.context_length)  # (n_cls, L)
        except RuntimeError as e:  # a class name in the template over the context length
            raise ValueError(f"{e} Shorten the class name or the template.") from None
        # w_i^clip: the frozen CLIP's features of the hand-written prompts, computed once.
        # NOTE(official code): from a second CLIP load kept in fp16; here the same frozen CLIP.
        with torch.no_grad():
            w_clip = clip_model.encode_text(tokens.to(clip_model.logit_scale.device))  # (n_cls, E)
        self.register_buffer("clip_text_features", F.normalize(w_clip.float(), dim=-1),
                             persistent=False)  # (n_cls, E), class-name-dependent, not saved
        self._terms = {}

    def train(self, mode=True):
        # NOTE(official code): Dassl puts only the prompt learner in train mode; CLIP stays in
        # eval mode, so an RN50's BatchNorm keeps its pretrained running statistics.
        super().train(mode)
        self.clip_model.eval()
        return self

    def text_features(self):
        """Normalised class features w_i = g(t_i) (n_cls, E): image-agnostic, so evaluation
        computes them once for all test batches."""
        prompts = self.prompt_learner()  # (n_cls, L, D), t_i = [SOS] [V]_1 .. [V]_M [CLASS]_i
        g = self.clip_model.encode_text_embeddings(prompts, self.prompt_learner.tokenized_prompts)
        return F.normalize(g, dim=-1)  # (n_cls, E)

    def kg_loss(self, text_features):
        """The knowledge-guided term as the official code computes it: 1 - mean_i cos(w_i,
        w_i^clip) (torch's cosine similarity, eps 1e-7); text_features (n_cls, E) -> scalar."""
        cos = F.cosine_similarity(text_features.float(), self.clip_text_features, dim=-1,
                                  eps=1e-7)  # (n_cls,)
        return 1 - cos.mean()

    def loss_terms(self):
        """{"kg": λ L_kg} of the last training forward (train.py adds it to the cross-entropy)."""
        return dict(self._terms)

    def forward(self, images, text_features=None):
        with torch.no_grad():  # frozen image encoder: no autograd graph needed
            f = F.normalize(self.clip_model.encode_image(images), dim=-1)  # (B, E)
        g = self.text_features() if text_features is None else text_features  # (n_cls, E)
        if self.training:  # L = L_ce + λ L_kg: train.py adds the cross-entropy
            self._terms = {"kg": self.w * self.kg_loss(g)}
        # p(y=i|x) ∝ exp(cos(w_i, f) / τ), with 1/τ = exp(logit_scale), frozen as in CoOp
        return self.clip_model.logit_scale.exp() * f @ g.t()  # (B, n_cls)


if __name__ == "__main__":
    # Self-check with a tiny random CLIP: no weights, no data.
    torch.manual_seed(0)
    tiny = clip.CLIP(embed_dim=32, image_resolution=32, vision_layers=2, vision_width=64,
                     vision_patch_size=8, context_length=77, vocab_size=49408,
                     transformer_width=64, transformer_heads=1, transformer_layers=2)
    names = ["cat", "dog", "red fox", "golden_retriever", "airplane"]
    model = KgCoOp(tiny, names).train()
    logits = model(torch.randn(2, 3, 32, 32))  # (B, n_cls)
    loss = F.cross_entropy(logits, torch.tensor([0, 1])) + sum(model.loss_terms().values())
    loss.backward()  # the kg term reaches ctx too
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"ctx {tuple(model.prompt_learner.ctx.shape)}, logits {tuple(logits.shape)}, "
          f"kg term {model.loss_terms()['kg'].item():.2e} (0 at the init from the template's "
          f"words), trainable parameters {n_train:,}")
