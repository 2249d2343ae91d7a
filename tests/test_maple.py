"""MaPLe (maple.py) on tiny random CLIPs: parameter count, prompt placement, frozen backbone."""
import pytest
import torch
import torch.nn.functional as F

import clip
import maple
from conftest import (check_step_changes_only_prompts, make_tiny_clip, record_blocks,
                      run_recorded)

CLASSNAMES = ["cat", "dog", "sea_lion", "red fox", "golden retriever"]
N_CTX, DEPTH = 2, 3


def tiny_clip(layers=4, vision_width=128, vision_layers=None):
    """Text width 64 and vision width 128 differ on purpose (D != Dv)."""
    return make_tiny_clip(vision_layers=layers if vision_layers is None else vision_layers,
                          vision_width=vision_width, transformer_layers=layers)


@pytest.fixture(scope="module")
def clip_model():
    return tiny_clip()


def prompt_text(names=CLASSNAMES, init="a photo of a"):
    return [f"{init} {n.replace('_', ' ')}." for n in names]


def test_trainable_parameters_at_vit_b16_widths():
    # D 512, Dv 768, 9 layers per tower (depth 9 needs them); depth of nothing else matters.
    m = clip.CLIP(embed_dim=512, image_resolution=16, vision_layers=9, vision_width=768,
                  vision_patch_size=16, context_length=77, vocab_size=49408,
                  transformer_width=512, transformer_heads=8, transformer_layers=9)
    model = maple.MaPLe(m, CLASSNAMES)  # n_ctx 2, depth 9
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    per_layer = 2 * 512 + (512 * 768 + 768)  # P_i and F_i
    assert trainable == 3_555_072 == 9 * per_layer
    assert trainable == sum(p.numel() for p in model.prompt_learner.parameters())


def test_widths_are_read_from_the_model(clip_model, images):
    model = maple.MaPLe(clip_model, CLASSNAMES, prompt_depth=DEPTH)
    pl = model.prompt_learner
    assert pl.ctx.shape == (N_CTX, 64) and pl.proj.weight.shape == (128, 64)
    assert [p.shape for p in pl.compound_prompts_text] == [(N_CTX, 64)] * (DEPTH - 1)
    assert [tuple(v.shape) for v in pl.vision_prompts()] == [(N_CTX, 128)] * DEPTH
    # NOTE(official code): the deep coupling layers start as copies of one layer.
    w = [f.weight for f in pl.compound_prompt_projections]
    assert torch.equal(w[0], w[1]) and w[0] is not w[1]
    assert model(images).shape == (2, len(CLASSNAMES))


def test_context_init_keeps_the_other_words_fixed(clip_model):
    pl = maple.MaPLe(clip_model, CLASSNAMES, prompt_depth=DEPTH).prompt_learner
    tokens = clip.tokenize(prompt_text())
    emb = clip_model.token_embedding(tokens)[:, :pl.tokenized_prompts.shape[1]]
    # "a photo" learned, "of a {class}." fixed: at init the prompt is the plain sentence.
    assert torch.equal(pl.text_prompts(), emb)
    assert torch.equal(pl.ctx.data, emb[0, 1:1 + N_CTX])


def test_no_vision_prompts_is_clip_image_encoder(clip_model, images):
    model = maple.MaPLe(clip_model, CLASSNAMES, prompt_depth=DEPTH)
    with torch.no_grad():
        assert torch.equal(model.encode_image(images), clip_model.encode_image(images))


def test_depth_1_text_branch_is_coop(clip_model):
    model = maple.MaPLe(clip_model, CLASSNAMES, prompt_depth=1)
    pl = model.prompt_learner
    assert len(pl.compound_prompts_text) == 0 and len(pl.vision_prompts()) == 1
    tokens = clip.tokenize(prompt_text())
    with torch.no_grad():
        zero_shot = F.normalize(clip_model.encode_text(tokens), dim=-1)
        torch.testing.assert_close(model.text_features(), zero_shot, rtol=1e-5, atol=1e-6)
        pl.ctx.add_(0.1 * torch.randn(N_CTX, 64))
        emb = clip_model.token_embedding(tokens)  # CoOp "end" with the same M = 2 context
        prompts = torch.cat([emb[:, :1], pl.ctx.expand(len(CLASSNAMES), -1, -1),
                             emb[:, 1 + N_CTX:]], dim=1)
        coop = F.normalize(clip_model.encode_text_embeddings(prompts, tokens), dim=-1)
        torch.testing.assert_close(model.text_features(), coop, rtol=1e-5, atol=1e-6)
        assert not torch.allclose(coop, zero_shot, atol=1e-3)


def test_prompts_sit_in_the_right_slots(clip_model, images):
    model = maple.MaPLe(clip_model, CLASSNAMES, prompt_depth=DEPTH)
    pl, visual = model.prompt_learner, clip_model.visual
    seen, outs, vis, x0 = run_recorded(model, clip_model, images)
    P = (32 // 8) ** 2
    assert all(x.shape == (2, 1 + P + N_CTX, 128) for x in seen["vision"])
    # Layer 0: P~_0 after the patches, no positional embedding, through ln_pre with the rest.
    torch.testing.assert_close(seen["vision"][0][:, :1 + P], visual.ln_pre(x0))
    torch.testing.assert_close(seen["vision"][0][:, -N_CTX:],
                               visual.ln_pre(vis[0]).expand(2, -1, -1))
    pos = clip_model.positional_embedding[1:1 + N_CTX]
    torch.testing.assert_close(seen["text"][0][:, 1:1 + N_CTX],
                               (pl.ctx + pos).expand(len(CLASSNAMES), -1, -1))
    for k in range(1, DEPTH):  # blocks 1..J-1: that layer's own prompts, replacing the slots
        assert torch.equal(seen["vision"][k][:, -N_CTX:], vis[k].expand(2, -1, -1))
        p_k = pl.compound_prompts_text[k - 1].detach()
        assert torch.equal(seen["text"][k][:, 1:1 + N_CTX], p_k.expand(len(CLASSNAMES), -1, -1))
    for k in range(DEPTH, 4):  # later blocks: the slots carry the previous block's output
        assert torch.equal(seen["vision"][k], outs["vision"][k - 1])
        assert torch.equal(seen["text"][k], outs["text"][k - 1])


@pytest.mark.parametrize("k", [1, 2])
def test_deep_prompt_k_changes_nothing_before_layer_k(clip_model, images, k):
    model = maple.MaPLe(clip_model, CLASSNAMES, prompt_depth=DEPTH)
    runs = []
    for _ in range(2):
        outs, handles = record_blocks(clip_model, pre=False)
        with torch.no_grad():
            model(images)
            model.prompt_learner.compound_prompts_text[k - 1].add_(0.5)  # P_k (and P~_k)
        for h in handles:
            h.remove()
        runs.append(outs)
    for tower in ("text", "vision"):
        before, after = runs[0][tower], runs[1][tower]
        for i in range(k):
            assert torch.equal(before[i], after[i]), (tower, i)
        assert not torch.allclose(before[k], after[k]), tower


def test_precomputed_text_features_give_the_same_logits(clip_model, images):
    model = maple.MaPLe(clip_model, CLASSNAMES, prompt_depth=DEPTH)
    with torch.no_grad():
        torch.testing.assert_close(model(images, text_features=model.text_features()),
                                   model(images))


def test_training_step_changes_only_prompts(clip_model, images):
    model = maple.MaPLe(clip_model, CLASSNAMES, prompt_depth=DEPTH).train()
    assert not model.clip_model.training
    # both branches reach every P_i: each prompt parameter gets a gradient
    check_step_changes_only_prompts(model, images, torch.tensor([1, 3]))


def test_state_dict_holds_only_learned_tensors_and_moves_to_new_classes(clip_model, images):
    base = maple.MaPLe(clip_model, CLASSNAMES, prompt_depth=DEPTH)
    sd = base.prompt_learner.state_dict()
    assert set(sd) == {"ctx", "proj.weight", "proj.bias",
                       *(f"compound_prompts_text.{i}" for i in range(DEPTH - 1)),
                       *(f"compound_prompt_projections.{i}.{w}" for i in range(DEPTH - 1)
                         for w in ("weight", "bias"))}
    new = maple.MaPLe(clip_model, ["airplane", "mountain bike", "tree"], prompt_depth=DEPTH)
    new.prompt_learner.load_state_dict(sd)  # strict: no class-dependent keys to delete
    assert new(images).shape == (2, 3)


def test_bad_input_gives_clear_errors(clip_model):
    rn = clip.CLIP(embed_dim=32, image_resolution=32, vision_layers=(1, 1, 1, 1), vision_width=8,
                   vision_patch_size=None, context_length=77, vocab_size=49408,
                   transformer_width=64, transformer_heads=1, transformer_layers=2)
    with pytest.raises(ValueError, match="MaPLe needs a ViT backbone"):
        maple.MaPLe(rn, CLASSNAMES, prompt_depth=1)
    for depth in (0, 5):
        with pytest.raises(ValueError, match=r"prompt_depth must be an int in 1\.\.4"):
            maple.MaPLe(clip_model, CLASSNAMES, prompt_depth=depth)
    with pytest.raises(ValueError, match="n_ctx"):
        maple.MaPLe(clip_model, CLASSNAMES, n_ctx=0, ctx_init="", prompt_depth=DEPTH)
    with pytest.raises(ValueError, match="n_ctx=5 is more than the 4 tokens"):
        maple.MaPLe(clip_model, CLASSNAMES, n_ctx=5, prompt_depth=DEPTH)
    with pytest.raises(ValueError, match="'" + "very " * 80):
        maple.MaPLe(clip_model, ["cat", "very " * 80 + "long name"], prompt_depth=DEPTH)


def test_random_context(clip_model, images):
    model = maple.MaPLe(clip_model, CLASSNAMES, n_ctx=4, ctx_init="", prompt_depth=DEPTH)
    assert model.prompt_learner.ctx.shape == (4, 64)
    assert model(images).shape == (2, len(CLASSNAMES))


def test_defaults_are_the_papers():
    d = maple.DEFAULTS
    assert (d["n_ctx"], d["ctx_init"], d["prompt_depth"], d["lr"], d["epochs"],
            d["batch_size"], d["shots"]) == (2, "a photo of a", 9, 0.0035, 5, 4, 16)


def test_coupling_restated(clip_model, images):
    """P~_0 = F_0(P_0) and P~_k = F_k(P_k), written out as matrix products, are what enters the
    vision blocks: appended (through ln_pre) at layer 0, in the last n_ctx slots at layer k."""
    model = maple.MaPLe(clip_model, CLASSNAMES, prompt_depth=DEPTH)
    pl = model.prompt_learner
    with torch.no_grad():
        for p in pl.parameters():  # away from the initialisation (F_1 = F_2 there)
            p.add_(0.1 * torch.randn_like(p))
        F = [pl.proj, *pl.compound_prompt_projections]  # F_0 .. F_{J-1}
        P = [pl.ctx, *pl.compound_prompts_text]  # P_0 .. P_{J-1}
        want = [P[k] @ F[k].weight.t() + F[k].bias for k in range(DEPTH)]  # (n_ctx, Dv) each
        seen, handles = record_blocks(clip_model, pre=True)
        model(images)
    for h in handles:
        h.remove()
    vision = seen["vision"]
    torch.testing.assert_close(vision[0][:, -N_CTX:],
                               clip_model.visual.ln_pre(want[0]).expand(2, -1, -1))
    for k in range(1, DEPTH):
        torch.testing.assert_close(vision[k][:, -N_CTX:], want[k].expand(2, -1, -1))
    assert not torch.allclose(want[1], want[2])  # each layer its own coupled prompt
