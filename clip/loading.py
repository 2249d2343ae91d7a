"""Model names, download with checksum, checkpoint loading and image preprocessing.

The OpenAI-compatible entry points `available_models()` and `load()`, re-implemented after
openai/CLIP's `clip/clip.py` (MIT licence, see LICENSE). `load` rebuilds an eager model from the
checkpoint's state dict (OpenAI publishes TorchScript archives; we only read the weights out of
them, which is what openai/CLIP does with jit=False). It also reads Hugging Face CLIPModel
folders (clip/hf.py) and .safetensors files, with a small reader of that format below.
"""
import hashlib
import json
import os
import sys
import urllib.error
import urllib.request
import warnings
import zipfile

import torch

from . import hf
from .model import CheckpointError, build_model, convert_weights

_URL = "https://openaipublic.azureedge.net/clip/models"
# name -> URL; the SHA-256 of the file is the second-to-last path component.
_MODELS = {
    "RN50": f"{_URL}/afeb0e10f9e5a86da6080e35cf09123aca3b358a0c3e3b6c78a7b63bc04b6762/RN50.pt",
    "RN101": f"{_URL}/8fa8567bab74a42d41c5915025a8e4538c3bdbe8804a470a72f30b0d94fab599/RN101.pt",
    "RN50x4": f"{_URL}/7e526bd135e493cef0776de27d5f42653e6b4c8bf9e0f653bb11773263205fdd/RN50x4.pt",
    "RN50x16":
        f"{_URL}/52378b407f34354e150460fe41077663dd5b39c54cd0bfd2b27167a4a06ec9aa/RN50x16.pt",
    "RN50x64":
        f"{_URL}/be1cfb55d75a9666199fb2206c106743da0f6468c9d327f3e0d0a543a9919d9c/RN50x64.pt",
    "ViT-B/32":
        f"{_URL}/40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af/ViT-B-32.pt",
    "ViT-B/16":
        f"{_URL}/5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f/ViT-B-16.pt",
    "ViT-L/14":
        f"{_URL}/b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836/ViT-L-14.pt",
    "ViT-L/14@336px": f"{_URL}/3035c92b350959924f9f00213499208652fc7ea050643e8b385c2dac08641f02"
                      "/ViT-L-14-336px.pt",
}
# Checkpoints that ship inside this package and load without a download.
_BUILTIN = {"toy": os.path.join(os.path.dirname(__file__), "weights", "toy-vit.pt")}

# CLIP's image normalisation: per-channel mean and std of its pretraining images (RGB).
MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)


class DownloadError(RuntimeError):
    """A checkpoint could not be downloaded or failed its checksum."""


def available_models():
    """Names `load` accepts (besides a checkpoint's file path)."""
    return list(_MODELS) + list(_BUILTIN)


def _sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _download(url, root):
    """Stream `url` into `root`, through a temporary file renamed when complete and verified."""
    try:
        os.makedirs(root, exist_ok=True)
    except OSError as e:
        raise DownloadError(f"cannot create the download folder {root} ({e.strerror}): pass "
                            "download_root (train.py: set HOME, or --backbone a downloaded "
                            "file)") from None
    expected = url.split("/")[-2]
    target = os.path.join(root, os.path.basename(url))
    if os.path.isfile(target):
        if _sha256(target) == expected:
            return target
        warnings.warn(f"{target} exists but its SHA-256 does not match; removing it and "
                      "downloading again")
        os.remove(target)
    partial = target + ".part"
    try:
        with urllib.request.urlopen(url, timeout=60) as source, open(partial, "wb") as out:
            total = int(source.headers.get("Content-Length") or 0)
            done = 0
            for chunk in iter(lambda: source.read(1 << 16), b""):
                out.write(chunk)
                done += len(chunk)
                if total:
                    print(f"\rdownloading {os.path.basename(url)}: {done / 2**20:.0f}/"
                          f"{total / 2**20:.0f} MiB", end="", file=sys.stderr, flush=True)
            print(file=sys.stderr)
    except (urllib.error.URLError, OSError) as e:
        if os.path.exists(partial):
            os.remove(partial)
        raise DownloadError(
            f"could not download {url} ({e}). Without network access, download that URL by hand "
            f"(on any machine) and pass the file's path: clip.load('/path/to/"
            f"{os.path.basename(url)}') or --backbone /path/to/{os.path.basename(url)}") from None
    if _sha256(partial) != expected:
        os.remove(partial)
        raise DownloadError(f"the download of {url} is corrupt: its SHA-256 does not match "
                            f"{expected}. The bad file was removed; try again.")
    os.replace(partial, target)  # atomic: a half-written file never has the final name
    return target


def _is_torchscript(path):
    """OpenAI's .pt files are TorchScript archives: zips whose record holds `constants.pkl`."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(name.endswith("/constants.pkl") for name in z.namelist())


# safetensors dtype names -> torch dtypes (huggingface/safetensors: safetensors/src/tensor.rs)
_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
                       "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32,
                       "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


def read_safetensors(path):
    """The tensors of a .safetensors file, read without the safetensors package (no pickle).

    The format: an 8-byte little-endian header length n; n bytes of JSON {name: {"dtype",
    "shape", "data_offsets": [begin, end]}} (plus an optional "__metadata__"); then the raw
    little-endian bytes, offsets counted from the end of the header. The tensors are views of
    one buffer read from the file."""
    def bad(what, truncated=False):
        advice = "The file may be truncated or corrupt: delete it and download it again." \
            if truncated else "Pass a safetensors file written by the safetensors library."
        return CheckpointError(f"could not read {path} as a safetensors file: {what}. {advice}")
    data = bytearray(os.path.getsize(path))
    with open(path, "rb") as f:
        f.readinto(data)
    n = int.from_bytes(data[:8], "little")
    if len(data) < 9 or data[8:9] != b"{":
        raise bad(f"it does not start with a safetensors header (it starts with "
                  f"{bytes(data[:12])!r})")
    if 8 + n > len(data):
        raise bad(f"its {n}-byte header runs past the end of the file", truncated=True)
    try:
        header = json.loads(data[8:8 + n])
    except ValueError as e:
        raise bad(f"its header is not JSON ({e})") from None
    if not isinstance(header, dict):
        raise bad("its header is not a JSON object")
    start, size = 8 + n, len(data) - 8 - n  # the data section: `size` bytes from `start`
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
            numel = int(torch.Size(shape).numel())
        except (TypeError, KeyError, ValueError):
            raise bad(f"the header entry of {name!r} is malformed: {info!r}") from None
        if dtype not in _SAFETENSORS_DTYPES:
            raise bad(f"{name!r} has the dtype {dtype!r}, which this reader does not know "
                      f"(it reads {', '.join(_SAFETENSORS_DTYPES)})")
        dt = _SAFETENSORS_DTYPES[dtype]
        if not (isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end <= size):
            raise bad(f"the bytes of {name!r}, [{begin}, {end}), lie outside the file's "
                      f"{size} data bytes", truncated=True)
        if end - begin != numel * dt.itemsize:
            raise bad(f"{name!r} has {end - begin} bytes for shape {shape} of {dtype}")
        tensors[name] = torch.frombuffer(data, dtype=dt, count=numel, offset=start + begin) \
            .view(shape) if numel else torch.empty(shape, dtype=dt)
    return tensors


def load_state_dict(path):
    """The CLIP state dict stored in `path`: a TorchScript archive, a plain state dict or a
    .safetensors file.

    Plain files are read with weights_only=True: a checkpoint is data and must never run code."""
    if str(path).endswith(".safetensors"):
        return read_safetensors(path)
    try:
        if _is_torchscript(path):
            with warnings.catch_warnings():  # torch.jit is deprecated; the archives remain
                warnings.simplefilter("ignore", FutureWarning)
                sd = torch.jit.load(path, map_location="cpu").state_dict()
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a bad file (zip, pickle, EOF ...)
        with open(path, "rb") as f:
            start = f.read(12)
        # A checkpoint starts as a zip ("PK") or a pickle (protocol opcode 0x80); anything else
        # is another kind of file, not a damaged checkpoint.
        advice = "The file may be truncated or corrupt: delete it and download it again." if \
            start[:2] == b"PK" or start[:1] == b"\x80" else \
            f"It is not a PyTorch checkpoint at all (it starts with {start!r}): pass a CLIP " \
            "checkpoint (.pt) or a model name."
        raise CheckpointError(f"could not read {path} as a checkpoint ({type(e).__name__}: "
                              f"{str(e)[:200]}). {advice}") from None
    if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]  # a {"state_dict": ...} wrapper, as training scripts often save
    if not isinstance(sd, dict) or not all(torch.is_tensor(v) for v in sd.values()):
        raise CheckpointError(f"{path} does not hold a state dict (a dict of tensors).")
    return sd


def _resolve(name, download_root):
    if name in _MODELS:
        root = download_root or os.path.expanduser("~/.cache/clip")
        return _download(_MODELS[name], root)
    if name in _BUILTIN:
        if not os.path.isfile(_BUILTIN[name]):
            raise CheckpointError(f"the built-in checkpoint {_BUILTIN[name]} is missing; "
                                  "rebuild it with `python -m toy.pretrain` (see README)")
        return _BUILTIN[name]
    if os.path.exists(name):
        return name
    if name.endswith((".pt", ".pth", ".bin", ".safetensors")) or \
            name.startswith((".", "/", "~")):
        raise CheckpointError(f"checkpoint file not found: {name} (pass a checkpoint file, a "
                              f"Hugging Face CLIP folder, or one of the model names "
                              f"{available_models()})")
    raise CheckpointError(f"unknown model {name!r}; available models are {available_models()}, "
                          "or pass the path of a checkpoint file or of a Hugging Face CLIP folder")


def _load_hf(path):
    """A transformers CLIPModel folder (or its weights file beside config.json) -> CLIP."""
    arch = hf.read_config(path if os.path.isdir(path) else os.path.dirname(path))
    sd = {}
    for file in hf.weight_files(path):
        sd.update(load_state_dict(file))
    return _build(hf.to_openai(sd, path), path, **arch)


def _load_file(path):
    """An OpenAI-layout checkpoint file -> CLIP, with OpenAI's QuickGELU."""
    sd = load_state_dict(path)
    if any(k.startswith(("text_model.", "vision_model.")) for k in sd):
        raise CheckpointError(
            f"{path} holds a Hugging Face CLIPModel's weights: pass the folder that holds it "
            "with its config.json (which says the activation and the head counts)")
    return _build(sd, path)


def _build(state_dict, path, **arch):
    """build_model, its CheckpointError naming the file it came from."""
    try:
        return build_model(state_dict, **arch)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None


def load(name, device=None, download_root=None, fp16=False, jit=False):
    """Load a CLIP model: a name from `available_models()`, a checkpoint's path, or a Hugging
    Face CLIPModel folder (config.json with model.safetensors or pytorch_model.bin).

    Returns (model, preprocess): an eval-mode model on `device` and the PIL -> tensor transform
    at its input resolution. Weights are fp32; `fp16=True` converts them as OpenAI's
    `convert_weights` does (GPU only; LayerNorm and the embeddings stay fp32)."""
    if jit:
        raise ValueError("jit=True is not supported: this package rebuilds an eager model from "
                         "the checkpoint's weights (openai/CLIP's jit=False)")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    path = _resolve(name, download_root)
    model = (_load_hf(path) if hf.is_hf(path) else _load_file(path)).to(device)
    if fp16:
        if device.type == "cpu":
            raise ValueError("fp16 weights need a GPU; on the CPU use the default fp32")
        convert_weights(model)
    return model, preprocess(model.visual.input_resolution)


def preprocess(n_px):
    """CLIP's test-time transform: RGB, bicubic resize of the short side, centre crop, normalise.

    The RGB conversion comes first (openai/CLIP converts after the crop; for RGB input the two
    are identical, and converting first resizes palette images in colour, not by nearest index).
    Every PIL mode works: clip/image.py's to_rgb scales 16-bit and float pixels to 8 bits."""
    from torchvision import transforms  # here, not at import: it costs ~1 s per process
    from .image import to_rgb
    return transforms.Compose([
        transforms.Lambda(to_rgb),
        transforms.Resize(n_px, interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(n_px),
        transforms.ToTensor(),
        transforms.Normalize(MEAN, STD),
    ])
