"""coop.py on tiny random CLIPs: no weights, no data, CPU only."""
import runpy

import pytest
import torch
import torch.nn.functional as F

import clip
import coop
from clip.tokenizer import EOT_TOKEN, encode
from conftest import make_tiny_clip

NAMES = ["cat", "sea_lion", "golden retriever", "red fox", "airplane"]


def tiny_clip(width=64, heads=1, layers=2, seed=0):
    return make_tiny_clip(seed, transformer_width=width, transformer_heads=heads,
                          transformer_layers=layers)


@pytest.fixture(scope="module")
def model():
    return tiny_clip()


@pytest.fixture(scope="module")
def images():
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))  # (B, 3, H, W)


def zero_shot_logits(clip_model, images, template):
    tokens = clip.tokenize([template.format(c.replace("_", " ")) for c in NAMES])
    with torch.no_grad():
        f = F.normalize(clip_model.encode_image(images), dim=-1)
        g = F.normalize(clip_model.encode_text(tokens), dim=-1)
        return clip_model.logit_scale.exp() * f @ g.t()


def test_init_from_words_gives_zero_shot_logits(model, images):
    coop_model = coop.CoOp(model, NAMES, n_ctx=4, ctx_init="a photo of a")
    assert coop_model.prompt_learner.ctx.shape == (4, 64)  # n_ctx = the 4 init words
    with torch.no_grad():
        logits = coop_model(images)
    expected = zero_shot_logits(model, images, "a photo of a {}.")
    assert logits.shape == (3, len(NAMES))
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)


def test_text_features_computed_once_give_the_same_logits(model, images):
    coop_model = coop.CoOp(model, NAMES)
    with torch.no_grad():
        g = coop_model.text_features()
        assert g.shape == (len(NAMES), 32)
        torch.testing.assert_close(g.norm(dim=-1), torch.ones(len(NAMES)))
        torch.testing.assert_close(coop_model(images, text_features=g), coop_model(images))


def test_training_step_changes_only_ctx():
    clip_model = tiny_clip(seed=3)
    before = {k: v.clone() for k, v in clip_model.state_dict().items()}
    coop_model = coop.CoOp(clip_model, NAMES).train()
    trainable = [name for name, p in coop_model.named_parameters() if p.requires_grad]
    assert trainable == ["prompt_learner.ctx"]
    assert not clip_model.training  # the frozen CLIP stays in eval mode
    ctx0 = coop_model.prompt_learner.ctx.detach().clone()
    params = [p for p in coop_model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=5e-4)
    loss = F.cross_entropy(coop_model(torch.randn(4, 3, 32, 32)), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    opt.step()
    assert not torch.equal(coop_model.prompt_learner.ctx, ctx0)
    after = clip_model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "a CLIP tensor changed"


def test_class_specific_context_shapes(model, images):
    coop_model = coop.CoOp(model, NAMES, n_ctx=8, csc=True)
    learner = coop_model.prompt_learner
    assert learner.ctx.shape == (len(NAMES), 8, 64)  # (n_cls, n_ctx, D)
    L = learner.tokenized_prompts.shape[1]  # up to the longest prompt's EOT
    assert learner().shape == (len(NAMES), L, 64) and L < 77  # (n_cls, L, D)
    assert not torch.equal(learner.ctx[0], learner.ctx[1])  # one context per class
    assert coop_model(images).shape == (3, len(NAMES))
    with pytest.warns(UserWarning, match="csc is ignored"):
        init = coop.CoOp(model, NAMES, n_ctx=4, csc=True, ctx_init="a photo of a")
    assert init.prompt_learner.ctx.shape == (4, 64)  # unified, as the official code


@pytest.mark.parametrize("position", ["middle", "front"])
def test_middle_and_front_keep_eot_and_class_tokens(model, images, position):
    n_ctx = 6
    end = coop.CoOp(model, NAMES, n_ctx=n_ctx).prompt_learner
    other = coop.CoOp(model, NAMES, n_ctx=n_ctx, class_token_position=position).prompt_learner
    with torch.no_grad():
        other.ctx.copy_(end.ctx)
        p_end, p_other = end(), other()  # (n_cls, L, D)
    table = model.token_embedding.weight
    eot = other.tokenized_prompts.argmax(dim=-1)
    assert torch.equal(eot, end.tokenized_prompts.argmax(dim=-1))
    for i, name in enumerate(NAMES):
        ids = encode(name.replace("_", " "))
        start = 1 + n_ctx // 2 if position == "middle" else 1
        assert torch.equal(p_other[i, start:start + len(ids)], table[ids])  # class tokens
        assert torch.equal(p_other[i, eot[i]], table[EOT_TOKEN])  # EOT where argmax finds it
        assert torch.equal(p_other[i, eot[i]:], p_end[i, eot[i]:])  # EOT and padding unchanged
        ctx_rows = torch.cat([p_other[i, 1:start], p_other[i, start + len(ids):eot[i] - 1]])
        assert torch.equal(ctx_rows, end.ctx)  # all the context, split around the name
    coop_model = coop.CoOp(model, NAMES, n_ctx=n_ctx, class_token_position=position)
    assert coop_model(images).shape == (3, len(NAMES))


def test_saved_prompts_load_for_other_classes(model, images):
    trained = coop.CoOp(model, NAMES, n_ctx=4)
    with torch.no_grad():
        trained.prompt_learner.ctx.add_(0.1)
    state = trained.prompt_learner.state_dict()
    assert list(state) == ["ctx"]  # class-dependent buffers are not saved
    others = ["dog", "cat", "hot air balloon"]
    other = coop.CoOp(model, others, n_ctx=4)
    other.prompt_learner.load_state_dict(state)  # strict
    with torch.no_grad():
        logits, logits_trained = other(images), trained(images)
    assert logits.shape == (3, len(others))
    # The class "cat" gets the same logit whatever the other classes are.
    torch.testing.assert_close(logits[:, 1], logits_trained[:, 0])


def test_too_long_prompt_names_the_class(model):
    long_name = " ".join(["word"] * 57)  # 1 + 16 + 57 + 1 + 1 = 76 tokens: fits
    coop.CoOp(model, ["cat", long_name], n_ctx=16)
    longer = long_name + " word word"  # 78 tokens
    with pytest.raises(ValueError, match=r"class 'word word.*78 tokens.*context length is 77"):
        coop.CoOp(model, ["cat", longer], n_ctx=16)


def test_trainable_parameters_at_vit_b16_text_width():
    # Text width 512 as ViT-B/16; everything else tiny.
    clip_model = tiny_clip(width=512, heads=8, layers=1)
    count = lambda m: sum(p.numel() for p in m.parameters() if p.requires_grad)  # noqa: E731
    assert count(coop.CoOp(clip_model, NAMES, n_ctx=16)) == 8192
    assert count(coop.CoOp(clip_model, NAMES, n_ctx=4, ctx_init="a photo of a")) == 2048
    assert count(coop.CoOp(clip_model, NAMES, n_ctx=16, csc=True)) == len(NAMES) * 8192


def test_epochs_per_shots_and_defaults():
    assert [coop.epochs_for(s, "dtd") for s in (1, 2, 4, 8, 16)] == [50, 100, 100, 200, 200]
    assert coop.epochs_for(16, "imagenet") == 50
    assert coop.DEFAULTS["n_ctx"] == 16 and coop.DEFAULTS["ctx_init"] == ""
    assert coop.PROTOCOLS["base2new"] == dict(n_ctx=4, ctx_init="a photo of a")
    with pytest.raises(ValueError, match="class_token_position"):
        coop.CoOp(tiny_clip(), NAMES, class_token_position="start")


def test_self_check_runs(capsys):
    runpy.run_path(coop.__file__, run_name="__main__")
    out = capsys.readouterr().out
    assert "logits (2, 5)" in out and "trainable parameters 1,024" in out


def test_forward_runs_the_prompt_learner(model, images, monkeypatch):
    """The paper's prompt t_i = [SOS] [V]_1 .. [V]_M [CLASS]_i is built by
    PromptLearner.forward on the default path (not bypassed by a shortcut)."""
    coop_model = coop.CoOp(model, NAMES, n_ctx=4, ctx_init="a photo of a")
    calls = []
    forward = coop.PromptLearner.forward
    monkeypatch.setattr(coop.PromptLearner, "forward",
                        lambda self: calls.append(1) or forward(self))
    coop_model(images)
    assert calls == [1]
