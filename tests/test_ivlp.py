"""IVLP and its one-tower variants (ivlp.py) on tiny random CLIPs: what each official variant
trains, where its prompts sit, MaPLe's model without the coupling, frozen backbone, the configs."""
import pytest
import torch
import torch.nn.functional as F

import clip
import ivlp
import maple
from clip.model import convert_weights
from conftest import check_step_changes_only_prompts, make_tiny_clip, run_recorded

CLASSNAMES = ["cat", "dog", "sea_lion", "red fox", "golden retriever"]
N_CTX, DEPTH = 2, 3
MODEL_ARGS = ("n_ctx_text", "n_ctx_vision", "text_depth", "vision_depth", "ctx_init")


def variant(name, depth=DEPTH):
    """A variant's IVLP(...) arguments, its depth 12 scaled down to `depth` for the tiny CLIP."""
    args = {k: v for k, v in ivlp.VARIANTS[name].items() if k in MODEL_ARGS}
    return {k: (depth if k.endswith("depth") and v == 12 else v) for k, v in args.items()}


def tiny_clip(layers=4, vision_width=128):
    """Text width 64 and vision width 128 differ on purpose (D != Dv)."""
    return make_tiny_clip(vision_layers=layers, vision_width=vision_width,
                          transformer_layers=layers)


@pytest.fixture(scope="module")
def clip_model():
    return tiny_clip()


# What the official trainers train, by their names (MaPLe:clip/model.py fork; independentVL.py
# and vpt.py enable "prompt_learner" and every name with "VPT"), at ViT-B/16 widths, depth 12:
# ours -> theirs: ctx -> prompt_learner.ctx, compound_prompts_text.{i} ->
# transformer.resblocks.{i+1}.VPT_shallow, vision_ctx -> visual.VPT,
# compound_prompts_vision.{i} -> visual.transformer.resblocks.{i+1}.VPT_shallow.
TEXT = {"ctx", *(f"compound_prompts_text.{i}" for i in range(11))}
VISION = {"vision_ctx", *(f"compound_prompts_vision.{i}" for i in range(11))}
OFFICIAL = {"vpt": (VISION, 12 * 8 * 768), "ivlp_text": (TEXT, 12 * 4 * 512),
            "ivlp": (TEXT | VISION, 12 * 2 * 512 + 12 * 2 * 768)}


@pytest.mark.parametrize("name", list(OFFICIAL))
def test_each_variant_trains_what_the_official_one_trains(name):
    # D 512, Dv 768; the prompt learner alone (depths are checked against the towers by IVLP)
    m = clip.CLIP(embed_dim=512, image_resolution=16, vision_layers=1, vision_width=768,
                  vision_patch_size=16, context_length=77, vocab_size=49408,
                  transformer_width=512, transformer_heads=8, transformer_layers=1)
    pl = ivlp.VLPromptLearner(m, CLASSNAMES, **variant(name, depth=12))
    names, count = OFFICIAL[name]
    assert {k for k, _ in pl.named_parameters()} == names == set(pl.state_dict())
    assert sum(p.numel() for p in pl.parameters()) == count
    assert OFFICIAL["ivlp"][1] == 30_720 and OFFICIAL["vpt"][1] == 73_728


def test_widths_and_lengths_are_per_tower(clip_model, images):
    model = ivlp.IVLP(clip_model, CLASSNAMES, **variant("ivlp"))
    pl = model.prompt_learner
    assert pl.ctx.shape == (N_CTX, 64)
    assert [p.shape for p in pl.compound_prompts_text] == [(N_CTX, 64)] * (DEPTH - 1)
    assert [tuple(v.shape) for v in pl.vision_prompts()] == [(N_CTX, 128)] * DEPTH
    assert model(images).shape == (2, len(CLASSNAMES))
    other = ivlp.IVLP(clip_model, CLASSNAMES, n_ctx_vision=3, text_depth=2,
                      vision_depth=4).prompt_learner
    assert [p.shape for p in other.compound_prompts_text] == [(N_CTX, 64)]
    assert [tuple(v.shape) for v in other.vision_prompts()] == [(3, 128)] * 4


def test_context_init_keeps_the_other_words_fixed(clip_model):
    pl = ivlp.IVLP(clip_model, CLASSNAMES, **variant("ivlp")).prompt_learner
    tokens = clip.tokenize([f"a photo of a {n.replace('_', ' ')}." for n in CLASSNAMES])
    emb = clip_model.token_embedding(tokens)[:, :pl.tokenized_prompts.shape[1]]
    assert torch.equal(pl.text_prompts(), emb)  # "a photo" learned, "of a {class}." fixed
    assert torch.equal(pl.ctx.data, emb[0, 1:1 + N_CTX])


def test_without_the_coupling_it_is_maple(clip_model, images):
    """Give IVLP MaPLe's text prompts and, as its free vision prompts, the values MaPLe's
    coupling computes, P~_k = F_k(P_k): the logits are MaPLe's, bit for bit."""
    torch.manual_seed(0)
    mp = maple.MaPLe(clip_model, CLASSNAMES, prompt_depth=DEPTH)
    iv = ivlp.IVLP(clip_model, CLASSNAMES, **variant("ivlp"))
    with torch.no_grad():
        for p in mp.prompt_learner.parameters():  # away from the initialisation
            p.add_(0.1 * torch.randn_like(p))
        iv.prompt_learner.ctx.copy_(mp.prompt_learner.ctx)
        for mine, theirs in zip(iv.prompt_learner.compound_prompts_text,
                                mp.prompt_learner.compound_prompts_text):
            mine.copy_(theirs)
        for mine, coupled in zip(iv.prompt_learner.vision_prompts(),
                                 mp.prompt_learner.vision_prompts()):
            mine.copy_(coupled)
        assert torch.equal(iv(images), mp(images))


def split(vision):
    """[P~_0, P~_1, ..] -> (P~_0, [P~_1, ..]): encode_image's arguments."""
    return vision[0], vision[1:]


def test_vision_prompts_do_not_depend_on_the_text_prompts(clip_model, images):
    """MaPLe's image features move with every P_k; IVLP's only with its own P~_k."""
    model = ivlp.IVLP(clip_model, CLASSNAMES, **variant("ivlp"))
    pl = model.prompt_learner
    with torch.no_grad():
        before = model.encode_image(images, *split(pl.vision_prompts()))
        pl.ctx.add_(0.5)
        for p in pl.compound_prompts_text:
            p.add_(0.5)
        assert torch.equal(model.encode_image(images, *split(pl.vision_prompts())), before)
        pl.compound_prompts_vision[0].add_(0.5)
        assert not torch.allclose(model.encode_image(images, *split(pl.vision_prompts())), before)
    model.encode_image(images, *split(pl.vision_prompts())).sum().backward()  # the image side only
    assert pl.ctx.grad is None and all(p.grad is None for p in pl.compound_prompts_text)
    assert all(p.grad.abs().sum() > 0 for p in pl.vision_prompts())


def test_prompts_sit_in_the_right_slots(clip_model, images):
    # the text tower 2 tokens at 3 layers, the vision tower 3 tokens at 2 layers
    model = ivlp.IVLP(clip_model, CLASSNAMES, n_ctx_vision=3, text_depth=DEPTH, vision_depth=2)
    pl, visual = model.prompt_learner, clip_model.visual
    seen, outs, vis, x0 = run_recorded(model, clip_model, images)
    P = (32 // 8) ** 2
    assert len(vis) == 2 and all(x.shape == (2, 1 + P + 3, 128) for x in seen["vision"])
    # Layer 0: P~_0 after the patches, no positional embedding, through ln_pre with the rest.
    torch.testing.assert_close(seen["vision"][0][:, :1 + P], visual.ln_pre(x0))
    torch.testing.assert_close(seen["vision"][0][:, -3:], visual.ln_pre(vis[0]).expand(2, -1, -1))
    assert torch.equal(seen["vision"][1][:, -3:], vis[1].expand(2, -1, -1))  # block 1: P~_1
    for k in (2, 3):  # later vision blocks: the slots carry the previous block's output
        assert torch.equal(seen["vision"][k], outs["vision"][k - 1])
    pos = clip_model.positional_embedding[1:1 + N_CTX]
    torch.testing.assert_close(seen["text"][0][:, 1:1 + N_CTX],
                               (pl.ctx + pos).expand(len(CLASSNAMES), -1, -1))
    for k in range(1, DEPTH):  # text blocks 1..J-1: that layer's own P_k in the slots
        p_k = pl.compound_prompts_text[k - 1].detach()
        assert torch.equal(seen["text"][k][:, 1:1 + N_CTX], p_k.expand(len(CLASSNAMES), -1, -1))
    assert torch.equal(seen["text"][3], outs["text"][2])


def test_deep_language_prompting_keeps_clips_image_encoder(clip_model, images):
    """ivlp_text (the official language-only config): vision depth 0, no vision prompt."""
    model = ivlp.IVLP(clip_model, CLASSNAMES, **variant("ivlp_text"))
    pl = model.prompt_learner
    assert pl.vision_prompts() == [] and pl.vision_ctx is None and pl.ctx.shape == (4, 64)
    with torch.no_grad():
        f = F.normalize(clip_model.encode_image(images), dim=-1)  # (B, Dj), CLIP's own
        want = clip_model.logit_scale.exp() * f @ model.text_features().t()  # (B, n_cls)
        torch.testing.assert_close(model(images), want)


def test_deep_vision_prompting_keeps_the_hand_written_prompt(clip_model, images):
    """vpt: the text side is CLIP's features of "a photo of a {class}.", computed once, and
    not saved; only the vision prompts train."""
    model = ivlp.IVLP(clip_model, CLASSNAMES, **variant("vpt"))
    pl = model.prompt_learner
    assert pl.ctx is None and len(pl.compound_prompts_text) == 0
    assert [tuple(v.shape) for v in pl.vision_prompts()] == [(8, 128)] * DEPTH
    tokens = clip.tokenize([f"a photo of a {n.replace('_', ' ')}." for n in CLASSNAMES])
    with torch.no_grad():
        zero_shot = F.normalize(clip_model.encode_text(tokens), dim=-1)
    torch.testing.assert_close(model.text_features(), zero_shot, rtol=1e-5, atol=1e-6)
    assert "fixed_text_features" not in model.state_dict()
    check_step_changes_only_prompts(model.train(), images, torch.tensor([1, 3]))
    torch.testing.assert_close(model.text_features(), zero_shot, rtol=1e-5, atol=1e-6)


def test_precomputed_text_features_give_the_same_logits(clip_model, images):
    model = ivlp.IVLP(clip_model, CLASSNAMES, **variant("ivlp"))
    with torch.no_grad():
        torch.testing.assert_close(model(images, text_features=model.text_features()),
                                   model(images))


@pytest.mark.parametrize("name", ["ivlp", "ivlp_text"])
def test_training_step_changes_only_prompts(clip_model, images, name):
    model = ivlp.IVLP(clip_model, CLASSNAMES, **variant(name)).train()
    assert not model.clip_model.training
    check_step_changes_only_prompts(model, images, torch.tensor([1, 3]))


def test_learned_tensors_stay_fp32_with_an_fp16_clip(images):
    half = convert_weights(tiny_clip(layers=2))
    for name in ("ivlp", "vpt"):
        model = ivlp.IVLP(half, CLASSNAMES, **variant(name, depth=2))
        assert {p.dtype for p in model.prompt_learner.parameters()} == {torch.float32}
        model(images).float().logsumexp(-1).sum().backward()
        assert all(p.grad is not None and p.grad.dtype == torch.float32
                   for p in model.prompt_learner.parameters())


@pytest.mark.parametrize("name", list(OFFICIAL))
def test_learned_state_moves_to_new_classes(clip_model, images, name):
    base = ivlp.IVLP(clip_model, CLASSNAMES, **variant(name))
    sd = base.prompt_learner.state_dict()
    assert set(sd) == {k for k, _ in base.prompt_learner.named_parameters()}  # no buffers
    new = ivlp.IVLP(clip_model, ["airplane", "mountain bike", "tree"], **variant(name))
    new.prompt_learner.load_state_dict(sd)  # strict: no class-dependent keys to delete
    assert new(images).shape == (2, 3)


def test_bad_input_gives_clear_errors(clip_model):
    rn = clip.CLIP(embed_dim=32, image_resolution=32, vision_layers=(1, 1, 1, 1), vision_width=8,
                   vision_patch_size=None, context_length=77, vocab_size=49408,
                   transformer_width=64, transformer_heads=1, transformer_layers=2)
    with pytest.raises(ValueError, match="IVLP needs a ViT backbone"):
        ivlp.IVLP(rn, CLASSNAMES, text_depth=1, vision_depth=1)
    uneven = make_tiny_clip(transformer_layers=4)  # 4 text layers, 2 vision layers
    for depth in (-1, 5, 2.0):
        with pytest.raises(ValueError, match=r"text_depth must be an int in 0\.\.4"):
            ivlp.IVLP(uneven, CLASSNAMES, text_depth=depth, vision_depth=1)
    with pytest.raises(ValueError,
                       match=r"vision_depth must be an int in 0\.\.2 .*vision tower.* got 12"):
        ivlp.IVLP(uneven, CLASSNAMES, text_depth=2)  # the default 12
    with pytest.raises(ValueError, match="both 0: nothing would be learned"):
        ivlp.IVLP(clip_model, CLASSNAMES, text_depth=0, vision_depth=0)
    with pytest.raises(ValueError, match="n_ctx_text must be a positive int, got 0"):
        ivlp.IVLP(clip_model, CLASSNAMES, n_ctx_text=0, ctx_init="", text_depth=DEPTH,
                  vision_depth=DEPTH)
    with pytest.raises(ValueError, match="n_ctx_vision must be a positive int, got 0"):
        ivlp.IVLP(clip_model, CLASSNAMES, n_ctx_vision=0, text_depth=DEPTH, vision_depth=DEPTH)
    with pytest.raises(ValueError, match="n_ctx_text=5 is more than the 4 tokens"):
        ivlp.IVLP(clip_model, CLASSNAMES, n_ctx_text=5, text_depth=DEPTH, vision_depth=DEPTH)
    for name in ("ivlp", "vpt"):
        with pytest.raises(ValueError, match="'" + "very " * 80):
            ivlp.IVLP(clip_model, ["cat", "very " * 80 + "long name"], **variant(name))


def test_random_context(clip_model, images):
    model = ivlp.IVLP(clip_model, CLASSNAMES, n_ctx_text=4, ctx_init="", text_depth=DEPTH,
                      vision_depth=DEPTH)
    assert model.prompt_learner.ctx.shape == (4, 64)
    assert model(images).shape == (2, len(CLASSNAMES))


def test_variants_are_the_official_configs():
    v = ivlp.VARIANTS
    keys = MODEL_ARGS + ("lr", "epochs", "batch_size", "shots", "backbone")
    assert {name: tuple(cfg[k] for k in keys) for name, cfg in v.items()} == {
        "vpt": (0, 8, 0, 12, "a photo of a", 0.0025, 5, 4, 16, "ViT-B/16"),
        "ivlp_text": (4, 0, 12, 0, "a photo of a", 0.0025, 5, 4, 16, "ViT-B/16"),
        "ivlp": (2, 2, 12, 12, "a photo of a", 0.0035, 5, 4, 16, "ViT-B/16")}
    assert ivlp.DEFAULTS is v["ivlp"] and ivlp.PROTOCOLS == {}
    for cfg in v.values():  # every key is IVLP's or the run's (train.py's RUN)
        assert set(cfg) - set(MODEL_ARGS) == {"lr", "epochs", "batch_size", "shots",
                                              "print_freq", "backbone"}
