"""clip.load on Hugging Face CLIPModel folders: parity with transformers' own outputs (QuickGELU
and exact GELU), the built-in safetensors reader, shards, and the errors for what is not a CLIP.
The fixture (tests/fixtures/hf_clip_tiny) was written by transformers; see fixtures/README.md."""
import json
import os
import shutil

import pytest
import torch

import clip
import runs
import train
from clip import hf
from clip.loading import read_safetensors
from conftest import folder_dataset

HF = os.path.join(os.path.dirname(__file__), "fixtures", "hf_clip_tiny")
REF = torch.load(os.path.join(HF, "reference_outputs.pt"))


def hf_folder(tmp_path, weights=("model.safetensors",), name="m", **config_changes):
    """A copy of the fixture with only `weights` and config.json's entries changed
    (text_config={"hidden_act": ...} updates that sub-config)."""
    folder = tmp_path / name
    folder.mkdir()
    for w in weights:
        shutil.copy(os.path.join(HF, w), folder / w)
    with open(os.path.join(HF, "config.json")) as f:
        config = json.load(f)
    for key, value in config_changes.items():
        config[key] = {**config.get(key, {}), **value} if isinstance(value, dict) else value
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def features(model):
    with torch.no_grad():
        return model.encode_image(REF["pixel_values"]), model.encode_text(REF["input_ids"])


def write_safetensors(path, tensors, header_changes=None):
    """A .safetensors file written by hand: 8-byte length, JSON header, raw bytes."""
    names = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
             torch.int64: "I64", torch.bool: "BOOL"}
    header, blobs, offset = {"__metadata__": {"format": "pt"}}, [], 0
    for name, t in tensors.items():
        blob = t.contiguous().view(-1).view(torch.uint8).numpy().tobytes()
        header[name] = dict(dtype=names[t.dtype], shape=list(t.shape),
                            data_offsets=[offset, offset + len(blob)])
        blobs.append(blob)
        offset += len(blob)
    for name, change in (header_changes or {}).items():
        header[name].update(change)
    text = json.dumps(header).encode()
    path.write_bytes(len(text).to_bytes(8, "little") + text + b"".join(blobs))
    return path


@pytest.mark.parametrize("weights", ["model.safetensors", "pytorch_model.bin"])
def test_features_match_transformers(tmp_path, weights):
    folder = hf_folder(tmp_path, (weights,))
    for path in (folder, folder / weights):  # the folder, or its weights file
        model, preprocess = clip.load(str(path), device="cpu")
        assert model.quick_gelu and model.vocab_size == 1000
        assert model.visual.input_resolution == 32 and not model.training
        image, text = features(model)
        torch.testing.assert_close(image, REF["image_features"], atol=1e-5, rtol=0)
        torch.testing.assert_close(text, REF["text_features"], atol=1e-5, rtol=0)
        assert torch.equal(model.logit_scale.detach(), REF["logit_scale"])


def test_exact_gelu_config_gives_exact_gelu_features(tmp_path):
    gelu = torch.load(os.path.join(HF, "reference_outputs_gelu.pt"))
    folder = hf_folder(tmp_path, text_config={"hidden_act": "gelu"},
                       vision_config={"hidden_act": "gelu"})
    model, _ = clip.load(str(folder), device="cpu")
    assert not model.quick_gelu
    image, text = features(model)
    torch.testing.assert_close(image, gelu["image_features"], atol=1e-5, rtol=0)
    torch.testing.assert_close(text, gelu["text_features"], atol=1e-5, rtol=0)
    assert (text - REF["text_features"]).abs().max() > 1e-2  # not QuickGELU's features


def test_build_model_takes_the_activation_and_heads():
    """OpenAI-layout state dicts: QuickGELU unless told; heads default to width // 64."""
    sd = torch.load(os.path.join(os.path.dirname(HF), "tiny_vit.pt"))["state_dict"]
    quick, exact = clip.build_model(sd), clip.build_model(sd, quick_gelu=False)
    tokens = clip.tokenize(["a photo of a cat."])
    with torch.no_grad():
        assert (quick.encode_text(tokens) - exact.encode_text(tokens)).abs().max() > 1e-3
    assert type(exact.transformer.resblocks[0].mlp.gelu) is torch.nn.GELU
    assert type(exact.visual.transformer.resblocks[1].mlp.gelu) is torch.nn.GELU
    heads = clip.build_model(sd, vision_heads=4, transformer_heads=2)
    assert heads.visual.transformer.resblocks[0].attn.n_head == 4
    assert heads.transformer.resblocks[0].attn.n_head == 2
    assert quick.visual.transformer.resblocks[0].attn.n_head == 1  # 64 // 64


def test_config_heads_reach_the_model(tmp_path):
    folder = hf_folder(tmp_path, text_config={"num_attention_heads": 4},
                       vision_config={"num_attention_heads": 8})
    model, _ = clip.load(str(folder), device="cpu")
    assert {b.attn.n_head for b in model.transformer.resblocks} == {4}
    assert {b.attn.n_head for b in model.visual.transformer.resblocks} == {8}
    # older configs: text_config_dict wins over text_config, transformers' defaults fill in
    older = hf_folder(tmp_path, name="older", text_config_dict={"num_attention_heads": 2},
                      vision_config={"num_attention_heads": 8})
    model, _ = clip.load(str(older), device="cpu")
    assert {b.attn.n_head for b in model.transformer.resblocks} == {2} and model.quick_gelu
    odd = hf_folder(tmp_path, name="odd", vision_config={"num_attention_heads": 3})
    with pytest.raises(clip.CheckpointError, match="a width of 128 does not split into 3 "
                                                   "attention heads"):
        clip.load(str(odd), device="cpu")


def test_older_checkpoints_with_position_ids(tmp_path):
    """transformers < 4.31 saved the position_ids buffers; they are not weights."""
    sd = read_safetensors(os.path.join(HF, "model.safetensors"))
    sd["text_model.embeddings.position_ids"] = torch.arange(77)[None]
    sd["vision_model.embeddings.position_ids"] = torch.arange(17)[None]
    folder = hf_folder(tmp_path, ())
    torch.save(sd, folder / "pytorch_model.bin")
    image, text = features(clip.load(str(folder), device="cpu")[0])
    torch.testing.assert_close(image, REF["image_features"], atol=1e-5, rtol=0)
    torch.testing.assert_close(text, REF["text_features"], atol=1e-5, rtol=0)


def test_safetensors_reader_equals_the_bin():
    st = read_safetensors(os.path.join(HF, "model.safetensors"))
    pt = torch.load(os.path.join(HF, "pytorch_model.bin"), weights_only=True)
    raw = open(os.path.join(HF, "model.safetensors"), "rb").read()
    header = json.loads(raw[8:8 + int.from_bytes(raw[:8], "little")])
    assert list(st) == [k for k in header if k != "__metadata__"]  # the file's order
    assert set(st) == set(pt)
    for k in pt:
        assert st[k].dtype == pt[k].dtype and torch.equal(st[k], pt[k]), k


def test_safetensors_dtypes_and_shapes(tmp_path):
    tensors = {"h": torch.randn(3, 2).half(), "b": torch.randn(5).bfloat16(),
               "i": torch.arange(-3, 3), "m": torch.tensor([True, False, True]),
               "s": torch.tensor(2.5), "e": torch.zeros(0, 4)}
    out = read_safetensors(write_safetensors(tmp_path / "t.safetensors", tensors))
    assert list(out) == list(tensors)
    for k, t in tensors.items():
        assert out[k].dtype == t.dtype and out[k].shape == t.shape and torch.equal(out[k], t), k


def test_bad_safetensors_files(tmp_path):
    good = (tmp_path / "good.safetensors")
    good.write_bytes(open(os.path.join(HF, "model.safetensors"), "rb").read())
    cases = {"half": (good.read_bytes()[: good.stat().st_size // 2],
                      r"lie outside the file's \d+ data bytes.*truncated or corrupt"),
             "header": (good.read_bytes()[:100], "header runs past the end.*truncated"),
             "garbage": (b"this is not a checkpoint" * 100,
                         r"does not start with a safetensors header \(it starts with b'this"),
             "empty": (b"", "does not start with a safetensors header")}
    for name, (data, message) in cases.items():
        path = tmp_path / f"{name}.safetensors"
        path.write_bytes(data)
        with pytest.raises(clip.CheckpointError, match=rf"{name}.safetensors.*{message}"):
            read_safetensors(str(path))
    t = {"w": torch.ones(2, 3), "v": torch.ones(4)}
    for change, message in (({"w": {"dtype": "F8_E4M3"}}, "'w' has the dtype 'F8_E4M3'"),
                            ({"v": {"data_offsets": [24, 99]}}, r"\[24, 99\), lie outside"),
                            ({"w": {"shape": [2, 2]}}, r"'w' has 24 bytes for shape \[2, 2\]"),
                            ({"v": {"data_offsets": 7}}, "header entry of 'v' is malformed")):
        path = write_safetensors(tmp_path / "bad.safetensors", t, change)
        with pytest.raises(clip.CheckpointError, match=rf"bad.safetensors.*{message}"):
            read_safetensors(str(path))


def split_in_two(tmp_path, kind):
    """The fixture's weights as two shards plus their index, as transformers saves big models."""
    folder = hf_folder(tmp_path, (), name=kind)
    sd = read_safetensors(os.path.join(HF, "model.safetensors"))
    keys = list(sd)
    ext = "safetensors" if kind == "safetensors" else "bin"
    stem = "model" if kind == "safetensors" else "pytorch_model"
    shards = [f"{stem}-0000{i}-of-00002.{ext}" for i in (1, 2)]
    weight_map = {}
    for shard, part in zip(shards, (keys[:40], keys[40:])):
        chunk = {k: sd[k] for k in part}
        write_safetensors(folder / shard, chunk) if ext == "safetensors" else \
            torch.save(chunk, folder / shard)
        weight_map.update({k: shard for k in part})
    index = folder / f"{stem}.{ext}.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder, index, shards


@pytest.mark.parametrize("kind", ["safetensors", "bin"])
def test_sharded_checkpoint(tmp_path, kind):
    folder, index, shards = split_in_two(tmp_path, kind)
    for path in (folder, index):
        image, text = features(clip.load(str(path), device="cpu")[0])
        torch.testing.assert_close(image, REF["image_features"], atol=1e-5, rtol=0)
        torch.testing.assert_close(text, REF["text_features"], atol=1e-5, rtol=0)
    os.remove(folder / shards[1])
    with pytest.raises(clip.CheckpointError, match=rf"lists shards that are not in .*"
                                                   rf"\['{shards[1]}'\]; download them too"):
        clip.load(str(folder), device="cpu")
    os.remove(index)
    with pytest.raises(clip.CheckpointError, match=rf"sharded checkpoint \({shards[0]}\) "
                                                   "without its index: copy model.safetensors"):
        clip.load(str(folder), device="cpu")


def test_folders_that_are_not_a_clip(tmp_path):
    def refused(folder, message):
        with pytest.raises(clip.CheckpointError, match=message):
            clip.load(str(folder), device="cpu")

    (tmp_path / "empty").mkdir()
    refused(tmp_path / "empty", "not a Hugging Face model folder: .*empty has no config.json")
    refused(hf_folder(tmp_path, (), name="now"),
            r"has a config.json but no model.safetensors or pytorch_model.bin \(it holds "
            r"\['config.json'\]\)")
    refused(hf_folder(tmp_path, name="bert", model_type="bert", architectures=["BertModel"]),
            r"holds a 'bert' model \(BertModel\), not CLIP")
    refused(hf_folder(tmp_path, name="siglip", model_type="siglip"), "a 'siglip' model")
    refused(hf_folder(tmp_path, name="text", model_type="clip_text_model",
                      architectures=["CLIPTextModelWithProjection"]),
            r"a text-only CLIP \(CLIPTextModelWithProjection\): the vision tower is missing")
    refused(hf_folder(tmp_path, name="vision", model_type="clip_vision_model",
                      architectures=["CLIPVisionModel"]),
            r"a vision-only CLIP \(CLIPVisionModel\): the text tower is missing")
    refused(hf_folder(tmp_path, name="relu", vision_config={"hidden_act": "relu"}),
            "vision_config.hidden_act is 'relu'")
    refused(hf_folder(tmp_path, name="mixed", vision_config={"hidden_act": "gelu"}),
            "the text tower uses 'quick_gelu' and the vision tower 'gelu'")
    refused(hf_folder(tmp_path, name="eps", text_config={"layer_norm_eps": 1e-6}),
            "text_config.layer_norm_eps is 1e-06")
    (tmp_path / "json").mkdir()
    (tmp_path / "json" / "config.json").write_text("{not json")
    refused(tmp_path / "json", "config.json is not valid JSON")


def test_weights_that_are_not_clipmodels(tmp_path):
    sd = read_safetensors(os.path.join(HF, "model.safetensors"))
    cases = {"extra": ({**sd, "classifier.weight": torch.zeros(2, 48)},
                       r"weights that CLIPModel does not: \['classifier.weight'\]"),
             "textonly": ({k: v for k, v in sd.items() if not k.startswith("vision_model.")},
                          r"holds no vision_model.\* weights: the vision tower is missing"),
             "noq": ({k: v for k, v in sd.items() if ".layers.1.self_attn.q_proj" not in k},
                     r"resblocks.1.attn.in_proj_bias needs the q, k and v projections; it has "
                     r"only \['k', 'v'\]")}
    for name, (weights, message) in cases.items():
        folder = hf_folder(tmp_path, (), name=name)
        write_safetensors(folder / "model.safetensors", weights)
        with pytest.raises(clip.CheckpointError, match=message):
            clip.load(str(folder), device="cpu")
    lone = tmp_path / "lone" / "pytorch_model.bin"  # no config.json beside it
    lone.parent.mkdir()
    shutil.copy(os.path.join(HF, "pytorch_model.bin"), lone)
    with pytest.raises(clip.CheckpointError, match="holds a Hugging Face CLIPModel's weights: "
                                                   "pass the folder"):
        clip.load(str(lone), device="cpu")


def test_key_table_covers_every_clip_key():
    """Every OpenAI key of a ViT CLIP has exactly one row in HF_TO_OPENAI."""
    targets = {oa.replace("{i}", "0").replace("{wb}", wb)
               for _, oa, _ in hf.HF_TO_OPENAI if oa for wb in ("weight", "bias")}
    model = clip.build_model(torch.load(os.path.join(os.path.dirname(HF), "tiny_vit.pt"))
                             ["state_dict"])
    block0 = {k for k in model.state_dict() if ".resblocks." not in k or ".resblocks.0." in k}
    assert block0 <= targets


def full_vocabulary_copy(tmp_path):
    """The fixture with CLIP's 49,408-token vocabulary, so clip.tokenize fits it: zero rows
    added, SOS/EOT (998/999) moved to OpenAI's ids 49406/49407."""
    folder = hf_folder(tmp_path, (), name="full", text_config={
        "vocab_size": 49408, "bos_token_id": 49406, "eos_token_id": 49407})
    sd = read_safetensors(os.path.join(HF, "model.safetensors"))
    small = sd["text_model.embeddings.token_embedding.weight"]  # (1000, D)
    big = torch.zeros(49408, small.shape[1])  # (49408, D)
    big[:1000], big[49406:] = small, small[998:]
    sd["text_model.embeddings.token_embedding.weight"] = big
    torch.save(sd, folder / "pytorch_model.bin")
    return folder


def test_train_coop_on_a_hugging_face_folder(tmp_path):
    folder = full_vocabulary_copy(tmp_path)
    model, _ = clip.load(str(folder), device="cpu")
    ids = REF["input_ids"].clone()
    ids[ids == 998], ids[ids == 999] = 49406, 49407
    with torch.no_grad():
        text = model.encode_text(ids)
    torch.testing.assert_close(text, REF["text_features"], atol=1e-5, rtol=0)
    root = folder_dataset(tmp_path / "pets", ["cat", "dog", "red fox", "owl"])
    out = tmp_path / "run"
    results = train.main(["--method", "coop", "--backbone", str(folder), "--dataset", "folder",
                          "--root", root, "--epochs", "1", "--shots", "1", "--batch-size", "2",
                          "--device", "cpu", "--out", str(out), "--protocol", "fewshot"])
    saved = json.loads((out / "results.json").read_text())
    assert saved["backbone"] == str(folder) and "accuracy" in results
    # the fixture itself has a 1,000-token vocabulary: refused before training, not an IndexError
    with pytest.raises(runs.UsageError, match="has a vocabulary of 1,000 tokens; the prompts are "
                                              "tokenized with OpenAI's BPE"):
        train.main(["--method", "coop", "--backbone", HF, "--dataset", "folder", "--root",
                    root, "--device", "cpu", "--out", str(tmp_path / "small_vocab")])
    assert not (tmp_path / "small_vocab" / "checkpoint.pt").exists()
