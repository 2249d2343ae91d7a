"""clip/: golden parity, architecture inference, loading formats and error messages."""
import hashlib
import os
import re

import pytest
import torch
from PIL import Image

import clip
from clip import loading as clip_load
from clip.model import CLIP, config_from_state_dict

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")


def golden(name):
    return torch.load(os.path.join(FIXTURES, f"{name}.pt"))


@pytest.mark.parametrize("name", ["tiny_vit", "tiny_rn"])
def test_golden_parity(name):
    g = golden(name)
    model = clip.build_model(g["state_dict"])  # strict load inside
    assert not model.training and model.dtype == torch.float32
    assert torch.equal(clip.tokenize(g["texts"]), g["tokens"])
    with torch.no_grad():
        img = model.encode_image(g["images"])
        txt = model.encode_text(g["tokens"])
        logits, logits_t = model(g["images"], g["tokens"])
    torch.testing.assert_close(img, g["image_features"], atol=1e-5, rtol=0)
    torch.testing.assert_close(txt, g["text_features"], atol=1e-5, rtol=0)
    torch.testing.assert_close(logits, g["logits_per_image"], atol=1e-5, rtol=0)
    assert torch.equal(logits_t, logits.t())


def test_text_shortcut_is_exact():
    """Running only max(EOT)+1 positions equals running all 77 (the causal mask)."""
    model = clip.build_model(golden("tiny_vit")["state_dict"])
    tokens = clip.tokenize(["a photo of a cat.", "a dog"])
    with torch.no_grad():
        fast = model.encode_text(tokens)
        x = model.token_embedding(tokens) + model.positional_embedding  # all 77 positions
        x = model.transformer(x)
        slow = model.pool_text(x, tokens.argmax(-1))
    torch.testing.assert_close(fast, slow, atol=1e-6, rtol=0)


def shapes_state_dict(section):
    """A state dict of empty tensors with the shapes listed in clip_state_dict_keys.txt."""
    sd, current = {}, None
    with open(os.path.join(FIXTURES, "clip_state_dict_keys.txt")) as f:
        for line in f:
            if line.startswith("###"):
                current = line.split()[1].rstrip(":")
            elif current == section and re.match(r"^[\w.\-]+ \[", line):
                key, shape = line.split(" ", 1)
                sd[key] = torch.empty(eval(shape), device="meta")
    return sd


@pytest.mark.parametrize("section, n_params, arch", [
    ("ViT-B/16", 149_620_737, dict(vision_width=768, vision_layers=12, vision_patch_size=16,
                                  image_resolution=224, embed_dim=512)),
    ("RN50", 102_007_137, dict(vision_width=64, vision_layers=(3, 4, 6, 3),
                              vision_patch_size=None, image_resolution=224, embed_dim=1024)),
])
def test_full_size_architecture_from_shapes(section, n_params, arch):
    sd = shapes_state_dict(section)
    cfg = config_from_state_dict(sd)
    assert {k: cfg[k] for k in arch} == arch
    assert (cfg["transformer_width"], cfg["transformer_heads"], cfg["transformer_layers"]) == \
        (512, 8, 12)
    with torch.device("meta"):
        model = CLIP(**cfg)
    assert sum(p.numel() for p in model.parameters()) == n_params
    keys = {k for k in model.state_dict() if not k.endswith("num_batches_tracked")}
    assert keys == {k for k in sd if not k.endswith("num_batches_tracked")}
    for k, v in model.state_dict().items():
        if k in sd:
            assert v.shape == sd[k].shape, k


def test_load_plain_and_wrapped_state_dict(tmp_path):
    g = golden("tiny_vit")
    plain, wrapped = tmp_path / "plain.pt", tmp_path / "wrapped.pt"
    torch.save(g["state_dict"], plain)
    torch.save({"state_dict": g["state_dict"], "epoch": 3}, wrapped)
    for path in (plain, wrapped):
        model, preprocess = clip.load(str(path), device="cpu")
        assert model.visual.input_resolution == 32
        with torch.no_grad():
            feats = model.encode_image(g["images"])
        torch.testing.assert_close(feats, g["image_features"], atol=1e-5, rtol=0)


def test_load_torchscript_archive(tmp_path):
    """OpenAI publishes TorchScript archives with three extra scalar entries."""
    g = golden("tiny_vit")
    model = clip.build_model(g["state_dict"])
    for key, value in (("input_resolution", 32), ("context_length", 77), ("vocab_size", 49408)):
        if hasattr(model, key):
            delattr(model, key)  # plain attributes here; buffers in OpenAI's archives
        model.register_buffer(key, torch.tensor(value))
    with torch.no_grad():
        traced = torch.jit.trace(model, (g["images"], g["tokens"]), check_trace=False)
    path = tmp_path / "ViT-tiny.pt"
    traced.save(str(path))
    assert clip_load._is_torchscript(str(path))
    loaded, _ = clip.load(str(path), device="cpu")
    with torch.no_grad():
        logits, _ = loaded(g["images"], g["tokens"])
    torch.testing.assert_close(logits, g["logits_per_image"], atol=1e-5, rtol=0)


def test_preprocess_handles_image_modes():
    t = clip.preprocess(32)
    rgb = Image.new("RGB", (48, 40), (200, 100, 50))
    ref = t(rgb)
    assert ref.shape == (3, 32, 32)
    expected = (torch.tensor([200, 100, 50]) / 255 - torch.tensor(clip.MEAN)) / \
        torch.tensor(clip.STD)
    torch.testing.assert_close(ref[:, 16, 16], expected, atol=1e-3, rtol=0)
    for mode in ("L", "P", "RGBA", "CMYK"):
        out = t(rgb.convert(mode))
        assert out.shape == (3, 32, 32), mode
    assert torch.allclose(t(rgb.convert("RGBA")), ref)
    palette = rgb.convert("P", palette=Image.Palette.ADAPTIVE)  # exact colours in the palette
    assert torch.allclose(t(palette), ref, atol=1e-5)


def test_unknown_model_name_lists_available():
    with pytest.raises(clip.CheckpointError, match="available models.*ViT-B/16"):
        clip.load("ViT-B/17x")


def test_missing_file():
    with pytest.raises(clip.CheckpointError, match="no/such/file.pt"):
        clip.load("no/such/file.pt")


def test_corrupt_and_truncated_checkpoints(tmp_path):
    good = tmp_path / "good.pt"
    torch.save(golden("tiny_vit")["state_dict"], good)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"this is not a checkpoint" * 100)
    for path, message in ((truncated, "truncated or corrupt: delete it and download it again"),
                          (garbage, r"not a PyTorch checkpoint at all \(it starts with "
                                    r"b'this is not '\)")):
        with pytest.raises(clip.CheckpointError, match=message):
            clip.load(str(path), device="cpu")


def test_state_dict_that_is_not_clip(tmp_path):
    path = tmp_path / "resnet.pt"
    torch.save({"conv1.weight": torch.zeros(4, 3, 3, 3), "fc.weight": torch.zeros(2, 4)}, path)
    with pytest.raises(clip.CheckpointError, match="missing.*text_projection"):
        clip.load(str(path), device="cpu")
    sd = dict(golden("tiny_vit")["state_dict"])
    del sd["visual.ln_post.bias"]
    sd["visual.extra.weight"] = torch.zeros(3)
    with pytest.raises(clip.CheckpointError, match=r"missing keys \['visual.ln_post.bias'\].*"
                                                  r"unexpected keys \['visual.extra.weight'\]"):
        clip.build_model(sd)


def test_download_checksum_and_no_network(tmp_path, monkeypatch):
    payload = b"pretend checkpoint bytes"
    sha = hashlib.sha256(payload).hexdigest()

    class FakeResponse:
        headers = {"Content-Length": str(len(payload))}

        def __init__(self, data):
            self.data = [data]

        def read(self, n):
            return self.data.pop() if self.data else b""

        def __enter__(self):
            return self

        def __exit__(self, *a):
            return False

    monkeypatch.setattr(clip_load.urllib.request, "urlopen",
                        lambda url, timeout: FakeResponse(payload))
    path = clip_load._download(f"https://example.invalid/models/{sha}/M.pt", str(tmp_path))
    assert open(path, "rb").read() == payload and not os.path.exists(path + ".part")
    # a cached file with the right hash is reused without a download
    monkeypatch.setattr(clip_load.urllib.request, "urlopen", lambda *a, **k: 1 / 0)
    assert clip_load._download(f"https://example.invalid/models/{sha}/M.pt", str(tmp_path)) == path
    # checksum mismatch: said, and the bad file is removed
    monkeypatch.setattr(clip_load.urllib.request, "urlopen",
                        lambda url, timeout: FakeResponse(b"bad"))
    with pytest.raises(clip.DownloadError, match="SHA-256 does not match.*removed"):
        clip_load._download(f"https://example.invalid/models/{'0' * 64}/N.pt", str(tmp_path))
    assert os.listdir(tmp_path) == ["M.pt"]

    # no network: the message says to download by hand and pass the path
    def offline(url, timeout):
        raise clip_load.urllib.error.URLError("Name or service not known")
    monkeypatch.setattr(clip_load.urllib.request, "urlopen", offline)
    with pytest.raises(clip.DownloadError, match="download that URL by hand.*pass the file's path"):
        clip.load("RN50", device="cpu", download_root=str(tmp_path))
    assert os.listdir(tmp_path) == ["M.pt"]


def test_fp16_needs_gpu(tmp_path):
    path = tmp_path / "m.pt"
    torch.save(golden("tiny_vit")["state_dict"], path)
    with pytest.raises(ValueError, match="fp16 weights need a GPU"):
        clip.load(str(path), device="cpu", fp16=True)


@pytest.mark.parametrize("tower", ["text", "vision"])
def test_multi_head_attention_equals_torch_multihead_attention(tower):
    """Every block's attention, in both towers, with 2 and 4 heads (the golden models have one
    head): our Attention equals nn.MultiheadAttention with the same weights, causal for text."""
    torch.manual_seed(0)
    model = CLIP(embed_dim=32, image_resolution=32, vision_layers=2, vision_width=128,
                 vision_patch_size=8, context_length=77, vocab_size=49408,
                 transformer_width=256, transformer_heads=4, transformer_layers=2).eval()
    blocks = (model.transformer if tower == "text" else model.visual.transformer).resblocks
    width, heads = (256, 4) if tower == "text" else (128, 2)  # vision heads = width // 64
    assert all(b.attn.n_head == heads for b in blocks)
    x = torch.randn(3, 17, width)  # (B, L, D)
    mask = torch.triu(torch.full((17, 17), float("-inf")), 1) if tower == "text" else None
    for block in blocks:
        mha = torch.nn.MultiheadAttention(width, heads, batch_first=True).eval()
        mha.load_state_dict(block.attn.state_dict())  # the same parameter names
        with torch.no_grad():
            want = mha(x, x, x, attn_mask=mask, need_weights=False)[0]
            torch.testing.assert_close(block.attn(x), want, atol=1e-5, rtol=1e-5)


def test_shipped_toy_clip_loads_and_reads_the_toy_world():
    """clip.load("toy"): the committed checkpoint, its architecture, and a sanity check that
    the weights are the trained ones: "an outline of a {}." names the outlined test shapes."""
    from toy import pretrain, world
    model, preprocess = clip.load("toy", "cpu")
    assert "toy" in clip.available_models() and model.dtype == torch.float32
    assert config_from_state_dict(model.state_dict()) == pretrain.CONFIG
    images, labels, _ = world.task_split("test")
    pick = slice(0, None, 16)  # 60 images, 5 per class
    x = torch.stack([preprocess(Image.fromarray(im)) for im in images[pick]])  # (60, 3, 32, 32)
    names = world.TASK["classes"]
    with torch.no_grad():
        f = torch.nn.functional.normalize(model.encode_image(x), dim=-1)
        acc = {}
        for template in ("an outline of a {}.", "a photo of a {}."):
            g = torch.nn.functional.normalize(model.encode_text(
                clip.tokenize([template.format(c) for c in names])), dim=-1)
            acc[template] = (f @ g.t()).argmax(-1).eq(torch.tensor(labels[pick])).float().mean()
    assert acc["an outline of a {}."] >= 0.95 > acc["a photo of a {}."] >= 0.5


def test_convert_weights_is_openais_fp16():
    """clip.load(fp16=True) converts as OpenAI's convert_weights: convolutions, linear layers,
    attention and projections fp16; LayerNorm, embeddings and logit_scale fp32. LayerNorm
    computes in fp32, and the features stay close to the fp32 model's (CPU half kernels)."""
    from clip.model import convert_weights
    g = golden("tiny_vit")
    model = convert_weights(clip.build_model(g["state_dict"]))
    dtypes = {k: v.dtype for k, v in model.state_dict().items()}
    fp32 = {k for k, d in dtypes.items() if d == torch.float32}
    assert fp32 == {k for k in dtypes if k in ("logit_scale", "positional_embedding",
                                               "token_embedding.weight",
                                               "visual.class_embedding",
                                               "visual.positional_embedding")
                    or ".ln_" in k or k.startswith(("ln_final", "visual.ln_"))}
    assert dtypes["visual.proj"] == dtypes["text_projection"] == torch.float16
    assert dtypes["transformer.resblocks.0.attn.in_proj_weight"] == torch.float16
    assert model.dtype == torch.float16
    with torch.no_grad():
        img, txt = model.encode_image(g["images"]), model.encode_text(g["tokens"])
    assert img.dtype == txt.dtype == torch.float16
    torch.testing.assert_close(img.float(), g["image_features"], atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(txt.float(), g["text_features"], atol=2e-2, rtol=2e-2)
