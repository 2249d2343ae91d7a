"""A compact CLIP, compatible with OpenAI's checkpoints and API.

    import clip
    model, preprocess = clip.load("ViT-B/16")  # or "toy", a checkpoint, a Hugging Face folder
    logits_per_image, _ = model(preprocess(image)[None], clip.tokenize(["a photo of a dog."]))

Re-implementation of openai/CLIP (MIT licence; see LICENSE).
"""
from .loading import MEAN, STD, DownloadError, available_models, load, load_state_dict, preprocess
from .model import CLIP, CheckpointError, build_model
from .tokenizer import PHOTO, check_template, check_words, decode, tokenize

__all__ = ["available_models", "load", "tokenize", "decode", "build_model", "preprocess",
           "load_state_dict", "CLIP", "MEAN", "STD", "CheckpointError", "DownloadError", "PHOTO",
           "check_template", "check_words"]
