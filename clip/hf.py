"""Hugging Face `transformers` CLIPModel folders, read without transformers.

A CLIP model from the Hugging Face hub is a folder: `config.json` beside `model.safetensors` or
`pytorch_model.bin` (or the shards a `*.index.json` lists), in transformers' CLIPModel layout
(huggingface/transformers: src/transformers/models/clip/modeling_clip.py). It is the same
network as OpenAI's, under other names. `clip.load(folder)` reads it in three steps:
- `read_config`: config.json must describe a full CLIPModel (both towers); it gives what the
  weights do not show: the head counts and the MLP activation (`hidden_act`);
- `weight_files`: the file or files that hold the weights;
- `to_openai`: renames every key with the table HF_TO_OPENAI, merging q, k, v into OpenAI's
  `in_proj` and transposing the two projections. A key the table does not know is an error,
  so another architecture is refused, not half-loaded.
`clip.build_model` then builds the model and loads the renamed weights strictly.

Text pooling: transformers reads the text feature at the end-of-text token, as OpenAI does;
our `encode_text` finds it with argmax, right for CLIP's vocabularies (EOT is the highest id).
"""
import json
import os
import re

import torch

from .model import CheckpointError

WEIGHTS = ("model.safetensors", "model.safetensors.index.json",  # transformers' file names,
           "pytorch_model.bin", "pytorch_model.bin.index.json")  # in its order of preference

# The entries read from text_config / vision_config, with transformers' defaults for a config
# that leaves them out (src/transformers/models/clip/configuration_clip.py).
_DEFAULTS = {"text": dict(num_attention_heads=8, hidden_act="quick_gelu", layer_norm_eps=1e-5),
             "vision": dict(num_attention_heads=12, hidden_act="quick_gelu",
                            layer_norm_eps=1e-5)}
_QUICK_GELU = {"quick_gelu": True, "gelu": False}  # hidden_act -> CLIP(quick_gelu=...)

# Hugging Face CLIPModel key -> OpenAI key, and the transform: "" as is; "T" transposed
# (nn.Linear stores (out, in), OpenAI's projections are (in, out) matrices, x @ proj);
# "qkv" one third of OpenAI's in_proj, q, k, v stacked in that order. {i}: block index,
# {wb}: weight or bias, {qkv}: q, k or v. An OpenAI key None: not a weight, dropped.
_TOP = [
    ("logit_scale", "logit_scale", ""),
    ("text_model.embeddings.token_embedding.weight", "token_embedding.weight", ""),
    ("text_model.embeddings.position_embedding.weight", "positional_embedding", ""),
    ("text_model.final_layer_norm.{wb}", "ln_final.{wb}", ""),
    ("text_projection.weight", "text_projection", "T"),
    ("vision_model.embeddings.class_embedding", "visual.class_embedding", ""),
    ("vision_model.embeddings.patch_embedding.weight", "visual.conv1.weight", ""),
    ("vision_model.embeddings.position_embedding.weight", "visual.positional_embedding", ""),
    ("vision_model.pre_layrnorm.{wb}", "visual.ln_pre.{wb}", ""),  # sic, "layrnorm"
    ("vision_model.post_layernorm.{wb}", "visual.ln_post.{wb}", ""),
    ("visual_projection.weight", "visual.proj", "T"),
    ("text_model.embeddings.position_ids", None, ""),  # arange(L) buffers that older
    ("vision_model.embeddings.position_ids", None, ""),  # transformers versions saved
]
_BLOCK = [  # inside block {i} of either tower
    ("self_attn.{qkv}_proj.{wb}", "attn.in_proj_{wb}", "qkv"),
    ("self_attn.out_proj.{wb}", "attn.out_proj.{wb}", ""),
    ("layer_norm1.{wb}", "ln_1.{wb}", ""),
    ("mlp.fc1.{wb}", "mlp.c_fc.{wb}", ""),
    ("mlp.fc2.{wb}", "mlp.c_proj.{wb}", ""),
    ("layer_norm2.{wb}", "ln_2.{wb}", ""),
]
_TOWERS = {"text_model.encoder.layers.{i}.": "transformer.resblocks.{i}.",
           "vision_model.encoder.layers.{i}.": "visual.transformer.resblocks.{i}."}
HF_TO_OPENAI = _TOP + [(hf + a, oa + b, t) for hf, oa in _TOWERS.items() for a, b, t in _BLOCK]

_FIELDS = dict(i=r"(?P<i>\d+)", wb=r"(?P<wb>weight|bias)", qkv=r"(?P<qkv>[qkv])")
_PATTERNS = [(re.compile(hf.replace(".", r"\.").format(**_FIELDS)), oa, t)
             for hf, oa, t in HF_TO_OPENAI]


def is_hf(path):
    """A folder, or a weights file with a transformers name and config.json beside it."""
    return os.path.isdir(path) or (
        os.path.basename(path) in WEIGHTS and
        os.path.isfile(os.path.join(os.path.dirname(path), "config.json")))


def read_config(folder):
    """config.json -> the build_model arguments the weights do not show (heads, activation)."""
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        raise CheckpointError(
            f"not a Hugging Face model folder: {folder} has no config.json. clip.load takes a "
            "model name, a checkpoint file, or a transformers CLIPModel folder (config.json "
            "with model.safetensors or pytorch_model.bin)")
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise CheckpointError(f"{path} is not valid JSON ({e})") from None
    kind = config.get("model_type") if isinstance(config, dict) else None
    names = ", ".join(config.get("architectures") or []) if isinstance(config, dict) else ""
    if kind in ("clip_text_model", "clip_vision_model"):
        has, lacks = ("text", "vision") if kind == "clip_text_model" else ("vision", "text")
        raise CheckpointError(
            f"{folder} holds a {has}-only CLIP ({names or kind}): the {lacks} tower is "
            "missing. clip.load needs both towers: a CLIPModel folder (model_type \"clip\").")
    if kind != "clip":
        raise CheckpointError(
            f"{folder} holds a {kind!r} model ({names or 'no architectures listed'}), not "
            "CLIP: clip.load reads transformers CLIPModel folders (model_type \"clip\").")
    towers = {}
    for tower, defaults in _DEFAULTS.items():
        # transformers lets an older `*_config_dict` entry override `*_config` (configuration_
        # clip.py, CLIPConfig.__init__), and fills what is left out with its defaults.
        sub = config.get(f"{tower}_config_dict") or config.get(f"{tower}_config") or {}
        towers[tower] = {key: sub.get(key, default) for key, default in defaults.items()}
        act, eps = towers[tower]["hidden_act"], towers[tower]["layer_norm_eps"]
        if act not in _QUICK_GELU:
            raise CheckpointError(f"{path}: {tower}_config.hidden_act is {act!r}; clip/ builds "
                                  f"CLIP's transformers with {' or '.join(_QUICK_GELU)}")
        if eps != 1e-5:
            raise CheckpointError(f"{path}: {tower}_config.layer_norm_eps is {eps}; clip/'s "
                                  "LayerNorm uses CLIP's 1e-5")
    if towers["text"]["hidden_act"] != towers["vision"]["hidden_act"]:
        raise CheckpointError(
            f"{path}: the text tower uses {towers['text']['hidden_act']!r} and the vision tower "
            f"{towers['vision']['hidden_act']!r}; clip/ builds both with one activation")
    return dict(quick_gelu=_QUICK_GELU[towers["text"]["hidden_act"]],
                transformer_heads=towers["text"]["num_attention_heads"],
                vision_heads=towers["vision"]["num_attention_heads"])


def weight_files(path):
    """The weight files of a folder (or the one named, beside its config.json): one file, or
    the shards that a `*.index.json` lists."""
    folder, names = (path, WEIGHTS) if os.path.isdir(path) else \
        (os.path.dirname(path), [os.path.basename(path)])
    for name in names:
        file = os.path.join(folder, name)
        if os.path.isfile(file):
            return _shards(file) if name.endswith(".index.json") else [file]
    present = sorted(os.listdir(folder))
    shards = [n for n in present if re.fullmatch(r"(pytorch_)?model-\d+-of-\d+\.\w+", n)]
    if shards:
        raise CheckpointError(
            f"{folder} holds a sharded checkpoint ({', '.join(shards)}) without its index: "
            "copy model.safetensors.index.json (or pytorch_model.bin.index.json) from the "
            "same model into it")
    raise CheckpointError(f"{folder} has a config.json but no model.safetensors or "
                          f"pytorch_model.bin (it holds {present[:10]}): download the weights")


def _shards(index):
    try:
        with open(index, encoding="utf-8") as f:
            weight_map = json.load(f)["weight_map"]
        files = list(dict.fromkeys(weight_map.values()))  # each shard once, in order
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{index} is not a sharded checkpoint's index (a JSON object "
                              f"whose weight_map maps keys to files): {e!r}") from None
    folder = os.path.dirname(index)
    missing = [f for f in files if not os.path.isfile(os.path.join(folder, f))]
    if missing:
        raise CheckpointError(f"{index} lists shards that are not in {folder}: {missing}; "
                              "download them too")
    return [os.path.join(folder, f) for f in files]


def to_openai(state_dict, source):
    """A CLIPModel state dict -> OpenAI's layout, through HF_TO_OPENAI; every key must match."""
    for tower, lacks in (("text_model.", "text"), ("vision_model.", "vision")):
        if not any(k.startswith(tower) for k in state_dict):
            raise CheckpointError(f"{source} holds no {tower}* weights: the {lacks} tower is "
                                  "missing. clip.load needs a full CLIPModel.")
    out, thirds, unknown = {}, {}, []
    for key, tensor in state_dict.items():
        row = next(((p.fullmatch(key), oa, t) for p, oa, t in _PATTERNS if p.fullmatch(key)),
                   None)  # (the match, the OpenAI name, the transform) of the row that fits
        if row is None:
            unknown.append(key)
            continue
        m, name, transform = row
        if name is None:  # a buffer, not a weight
            continue
        name = name.format(**m.groupdict())
        if transform == "qkv":
            thirds.setdefault(name, {})[m["qkv"]] = tensor
        else:
            out[name] = tensor.t() if transform == "T" else tensor  # (E, D) -> (D, E)
    if unknown:
        raise CheckpointError(
            f"{source} has weights that CLIPModel does not: {unknown[:8]}"
            f"{' ...' if len(unknown) > 8 else ''} ({len(unknown)}). Is it another "
            "architecture, or a CLIP with extra layers?")
    for name, parts in thirds.items():
        if set(parts) != {"q", "k", "v"}:
            raise CheckpointError(f"{source}: {name} needs the q, k and v projections; it "
                                  f"has only {sorted(parts)}")
        out[name] = torch.cat([parts["q"], parts["k"], parts["v"]])  # (3D, D) or (3D,)
    return out
