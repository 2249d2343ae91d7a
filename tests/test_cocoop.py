"""CoCoOp (cocoop.py) on tiny random CLIPs: parameter count, equivalences, frozen backbone."""
import pytest
import torch
import torch.nn.functional as F

import clip
import cocoop
import coop
from conftest import check_step_changes_only_prompts, make_tiny_clip

CLASSNAMES = ["cat", "dog", "sea_lion", "red fox", "golden retriever"]


def tiny_clip(vision_layers=2, vision_width=64, vision_patch_size=8):
    return make_tiny_clip(vision_layers=vision_layers, vision_width=vision_width,
                          vision_patch_size=vision_patch_size)


@pytest.fixture(scope="module")
def clip_model():
    return tiny_clip()


def randomise_meta_net(model, images, seed=2, check=True):
    """Make pi(x) clearly image-dependent: the tiny model's hidden layer has only E/16 = 2
    units, which the default init often leaves both off (ReLU) for every image."""
    g = torch.Generator().manual_seed(seed)
    meta_net = model.prompt_learner.meta_net
    with torch.no_grad():
        meta_net.linear1.weight.copy_(3 * torch.randn(meta_net.linear1.weight.shape, generator=g))
        meta_net.linear1.bias.fill_(2.0)  # keep the ReLU open
        meta_net.linear2.weight.copy_(0.05 * torch.randn(meta_net.linear2.weight.shape,
                                                         generator=g))
        feats = F.normalize(model.clip_model.encode_image(images), dim=-1)
        bias = meta_net(feats)  # (B, D)
    assert not check or (bias[0] - bias[1]).norm() > 0.1 * bias.norm(dim=-1).mean()


def coop_logits(clip_model, images, ctx, init="a photo of a"):
    """Reference CoOp ("end" layout, unified context) written out independently of cocoop.py."""
    names = [n.replace("_", " ") for n in CLASSNAMES]
    tokens = clip.tokenize([f"{init} {n}." for n in names])  # (n_cls, 77)
    with torch.no_grad():
        emb = clip_model.token_embedding(tokens)  # (n_cls, 77, D)
    n_ctx = ctx.shape[0]
    prompts = torch.cat([emb[:, :1], ctx.expand(len(names), -1, -1), emb[:, 1 + n_ctx:]], 1)
    text = F.normalize(clip_model.encode_text_embeddings(prompts, tokens), dim=-1)
    image = F.normalize(clip_model.encode_image(images), dim=-1)
    return clip_model.logit_scale.exp() * image @ text.t()


def test_trainable_parameters_at_vit_b16_widths():
    # Only D (text width 512) and E (embed dim 512) matter; everything else is kept tiny.
    m = clip.CLIP(embed_dim=512, image_resolution=16, vision_layers=1, vision_width=64,
                  vision_patch_size=16, context_length=77, vocab_size=49408,
                  transformer_width=512, transformer_heads=8, transformer_layers=1)
    model = cocoop.CoCoOp(m, CLASSNAMES)  # n_ctx 4 from "a photo of a"
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == 35_360 == 4 * 512 + (512 * 32 + 32) + (32 * 512 + 512)
    assert trainable == sum(p.numel() for p in model.prompt_learner.parameters())


def test_shapes_and_context_init(clip_model, images):
    model = cocoop.CoCoOp(clip_model, CLASSNAMES)
    pl = model.prompt_learner
    init = clip_model.token_embedding(clip.tokenize("a photo of a"))[0, 1:5]
    assert pl.ctx.shape == (4, 64) and torch.equal(pl.ctx.data, init)
    L = int(pl.tokenized_prompts.argmax(-1).max()) + 1
    feats = F.normalize(clip_model.encode_image(images), dim=-1)
    assert pl(feats).shape == (2, len(CLASSNAMES), L, 64)
    assert model(images).shape == (2, len(CLASSNAMES))


def test_random_init_and_the_context_rule(clip_model):
    random_ctx = cocoop.CoCoOp(clip_model, CLASSNAMES, n_ctx=8, ctx_init="")
    assert random_ctx.prompt_learner.ctx.shape == (8, 64)
    with pytest.raises(ValueError, match="n_ctx=16 is more than the 4 tokens of ctx_init"):
        cocoop.CoCoOp(clip_model, CLASSNAMES, n_ctx=16, ctx_init="a_photo_of_a")
    # n_ctx 2: "a photo" learned, "of a" fixed words before the class name
    two = cocoop.CoCoOp(clip_model, CLASSNAMES, n_ctx=2, ctx_init="a photo of a").prompt_learner
    four = cocoop.CoCoOp(clip_model, CLASSNAMES, n_ctx=4, ctx_init="a photo of a").prompt_learner
    assert two.ctx.shape == (2, 64)
    torch.testing.assert_close(two.ctx, four.ctx[:2])
    torch.testing.assert_close(two.token_suffix[:, :2], four.ctx[2:].expand(len(CLASSNAMES), -1,
                                                                         -1))


def test_zero_meta_net_equals_coop(clip_model, images):
    model = cocoop.CoCoOp(clip_model, CLASSNAMES)
    with torch.no_grad():
        model.prompt_learner.meta_net.linear2.weight.zero_()
        model.prompt_learner.meta_net.linear2.bias.zero_()
        # At initialisation the context is "a photo of a": zero-shot CLIP's prompt exactly.
        names = [n.replace("_", " ") for n in CLASSNAMES]
        text = F.normalize(clip_model.encode_text(
            clip.tokenize([f"a photo of a {n}." for n in names])), dim=-1)
        image = F.normalize(clip_model.encode_image(images), dim=-1)
        zero_shot = clip_model.logit_scale.exp() * image @ text.t()
        torch.testing.assert_close(model(images), zero_shot, rtol=1e-5, atol=1e-4)
        # With a learned (here: perturbed) context it is CoOp with that context.
        model.prompt_learner.ctx.add_(0.05 * torch.randn(4, 64))
        ctx = model.prompt_learner.ctx.detach().clone()
        torch.testing.assert_close(model(images), coop_logits(clip_model, images, ctx),
                                   rtol=1e-5, atol=1e-4)
        assert not torch.allclose(model(images), zero_shot, atol=1e-3)


def test_zero_meta_net_equals_coop_py(clip_model, images):
    model = cocoop.CoCoOp(clip_model, CLASSNAMES)
    reference = coop.CoOp(clip_model, CLASSNAMES, n_ctx=4, ctx_init="a photo of a")
    with torch.no_grad():
        model.prompt_learner.meta_net.linear2.weight.zero_()
        model.prompt_learner.meta_net.linear2.bias.zero_()
        model.prompt_learner.ctx.add_(0.05 * torch.randn(4, 64))
        reference.prompt_learner.ctx.copy_(model.prompt_learner.ctx)
        torch.testing.assert_close(model(images), reference(images), rtol=1e-5, atol=1e-4)


def per_image_loop(model, images):
    """The official forward: one text-encoder pass over all classes per image."""
    cm, pl = model.clip_model, model.prompt_learner
    feats = F.normalize(cm.encode_image(images), dim=-1)
    rows = []
    for f in feats:
        ctx = pl.ctx + pl.meta_net(f[None])  # (n_ctx, D)
        n_cls = pl.token_prefix.shape[0]
        prompts = torch.cat([pl.token_prefix, ctx.expand(n_cls, -1, -1), pl.token_suffix], 1)
        text = F.normalize(cm.encode_text_embeddings(prompts, pl.tokenized_prompts), dim=-1)
        rows.append(cm.logit_scale.exp() * f @ text.t())
    return torch.stack(rows)


def grads_of(model, logits):
    model.zero_grad()
    F.cross_entropy(logits, torch.tensor([1, 3])).backward()
    return {k: p.grad.clone() for k, p in model.prompt_learner.named_parameters()}


def test_batched_equals_per_image_loop(clip_model, images):
    model = cocoop.CoCoOp(clip_model, CLASSNAMES)
    randomise_meta_net(model, images)
    batched, loop = model(images), per_image_loop(model, images)
    torch.testing.assert_close(batched, loop, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(batched[0], batched[1])  # the two images get different prompts
    g_batched = grads_of(model, model(images))
    g_loop = grads_of(model, per_image_loop(model, images))
    for k in g_batched:
        torch.testing.assert_close(g_batched[k], g_loop[k], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("chunk_size", [1, 3, 10, 100])
def test_chunked_equals_one_pass(clip_model, images, chunk_size):
    model = cocoop.CoCoOp(clip_model, CLASSNAMES, chunk_size=None)
    randomise_meta_net(model, images)
    chunked = cocoop.CoCoOp(clip_model, CLASSNAMES, chunk_size=chunk_size)
    chunked.prompt_learner.load_state_dict(model.prompt_learner.state_dict())
    full, part = model(images), chunked(images)  # B*n_cls = 10 text rows
    torch.testing.assert_close(part, full, rtol=1e-5, atol=1e-5)
    g_full, g_part = grads_of(model, full), grads_of(chunked, part)
    for k in g_full:
        torch.testing.assert_close(g_part[k], g_full[k], rtol=1e-4, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(chunked(images), full, rtol=1e-5, atol=1e-5)


def check_training_step_freezes_clip(clip_model, images, **kwargs):
    model = cocoop.CoCoOp(clip_model, CLASSNAMES, **kwargs).train()
    randomise_meta_net(model, images, check=False)  # open ReLUs: every weight gets a gradient
    check_step_changes_only_prompts(model, images, torch.tensor([1, 3]))


def test_training_step_changes_only_prompts(clip_model, images):
    check_training_step_freezes_clip(clip_model, images)


def test_training_step_keeps_resnet_batchnorm_statistics(images):
    rn = tiny_clip(vision_layers=(1, 1, 1, 1), vision_width=8, vision_patch_size=None)
    check_training_step_freezes_clip(rn, images, chunk_size=4)


def test_state_dict_holds_only_learned_tensors_and_moves_to_new_classes(clip_model, images):
    base = cocoop.CoCoOp(clip_model, CLASSNAMES)
    randomise_meta_net(base, images)
    sd = base.prompt_learner.state_dict()
    assert set(sd) == {"ctx", "meta_net.linear1.weight", "meta_net.linear1.bias",
                       "meta_net.linear2.weight", "meta_net.linear2.bias"}
    new = cocoop.CoCoOp(clip_model, ["airplane", "mountain bike", "tree"])
    new.prompt_learner.load_state_dict(sd)  # strict: no class-dependent keys to delete
    assert new(images).shape == (2, 3)


def test_bad_input_gives_clear_errors(clip_model):
    with pytest.raises(ValueError, match="'" + "very " * 80):
        cocoop.CoCoOp(clip_model, ["cat", "very " * 80 + "long name"])
    with pytest.raises(ValueError, match="chunk_size"):
        cocoop.CoCoOp(clip_model, CLASSNAMES, chunk_size=0)
    with pytest.raises(ValueError, match="n_ctx"):
        cocoop.CoCoOp(clip_model, CLASSNAMES, n_ctx=0, ctx_init="")


def test_defaults_are_the_papers():
    d = cocoop.DEFAULTS
    assert (d["n_ctx"], d["ctx_init"], d["lr"], d["epochs"], d["batch_size"], d["shots"]) == \
        (4, "a photo of a", 0.002, 10, 1, 16)


@pytest.mark.parametrize("chunk_size", [1024, 3])
def test_forward_runs_the_prompt_learner(clip_model, images, monkeypatch, chunk_size):
    """t_i(x) = [SOS, v_1(x) .. v_M(x), c_i, ...] is built by PromptLearner.forward on the
    default path, chunked or not, and those prompts are what the text encoder reads."""
    model = cocoop.CoCoOp(clip_model, CLASSNAMES, chunk_size=chunk_size)
    built, encoded = [], []
    forward = cocoop.PromptLearner.forward
    monkeypatch.setattr(cocoop.PromptLearner, "forward",
                        lambda self, f: built.append(forward(self, f)) or built[-1])
    encode = clip_model.encode_text_embeddings
    monkeypatch.setattr(clip_model, "encode_text_embeddings",
                        lambda x, t: encoded.append(x) or encode(x, t))
    model(images)
    assert len(built) == 1 and built[0].shape[:2] == (2, len(CLASSNAMES))
    assert torch.equal(torch.cat(encoded), built[0].flatten(0, 1))
