"""Tokenizer tests: golden ids from the reference tokenizer, tokenize() contract, laziness."""
import gzip
import hashlib
import importlib.util
import json
import os
import sys

import pytest
import torch

import clip.tokenizer as tok
from clip.tokenizer import EOT_TOKEN, SOT_TOKEN, decode, encode, token_strings, tokenize

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
with open(os.path.join(ROOT, "tests", "fixtures", "tokenizer.json"), encoding="utf-8") as f:
    GOLDEN = json.load(f)  # {"encode": {text: ids}, "tokenize_77": {text: 77 ids}}

# Ids between SOT and EOT, computed with the reference algorithm (openai/CLIP's
# simple_tokenizer.py; the CoOp/MaPLe copies are the same).
REFERENCE_VECTORS = {
    "Hello World!": [3306, 1002, 256],
    "a photo of a": [320, 1125, 539, 320],
    "a photo of a dog.": [320, 1125, 539, 320, 1929, 269],
    "X": [343],
    ".": [269],
    "a photo of a tench.": [320, 1125, 539, 320, 1149, 634, 269],
    "X " * 16 + "pink primrose.": [343] * 16 + [3360, 45891, 269],
    "2012 Tesla Model S Sedan": [273, 271, 272, 273, 12254, 2863, 338, 24237],
    "it's": [585, 568],
}
# Class names from the benchmarks (CoOp:datasets/*.py), "_" replaced by " " as the trainers do.
BENCHMARK_NAMES = ["Annual Crop Land", "2012 Tesla Model S Sedan", "pink primrose",
                   "Apply_Eye_Makeup".replace("_", " "), "Black-footed Albatross",
                   "american pit bull terrier", "Highway or Road", "tench, Tinca tinca"]


def test_vocab_file_sha256():
    with open(tok.VOCAB_PATH, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    assert digest == "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"


@pytest.mark.parametrize("text", sorted(GOLDEN["encode"]))
def test_golden_encode(text):
    assert encode(text) == GOLDEN["encode"][text]


@pytest.mark.parametrize("text", sorted(GOLDEN["tokenize_77"]))
def test_golden_tokenize_77(text):
    assert tokenize(text)[0].tolist() == GOLDEN["tokenize_77"][text]


@pytest.mark.parametrize("text", sorted(REFERENCE_VECTORS))
def test_facts_vectors(text):
    ids = REFERENCE_VECTORS[text]
    row = tokenize(text)[0].tolist()
    assert row == [SOT_TOKEN] + ids + [EOT_TOKEN] + [0] * (77 - len(ids) - 2)
    assert row.index(EOT_TOKEN) == int(tokenize(text)[0].argmax())  # EOT is the largest id


def test_vocabulary_layout():
    vocab = token_strings()
    assert len(vocab) == 49408 and len(set(vocab)) == 49408
    assert vocab[0] == "!" and vocab[256] == "!</w>"  # bytes, then bytes ending a word
    assert vocab[512] == "in" and vocab[49405] == "jekyll</w>"  # first and last merge
    assert vocab[SOT_TOKEN] == "<|startoftext|>" and vocab[EOT_TOKEN] == "<|endoftext|>"
    assert vocab[1125] == "photo</w>" and vocab[343] == "x</w>"


def test_bytes_to_unicode():
    table = tok.bytes_to_unicode()
    assert sorted(table) == list(range(256)) and len(set(table.values())) == 256
    assert sum(chr(b) == c for b, c in table.items()) == 188  # printable bytes map to themselves
    assert table[ord(" ")] == "Ġ" == chr(256 + 32)  # the 33rd shifted byte
    assert list(table.values())[:3] == ["!", '"', "#"]  # value order gives ids 0, 1, 2


def test_special_tokens_in_text_are_kept_whole():
    # Reference behaviour: the literal special strings map to their ids.
    assert encode("a <|endoftext|>") == [320, EOT_TOKEN]


def test_too_long_raises_with_text_and_length():
    text = " ".join(["dog"] * 80)  # 80 ids + SOT + EOT = 82
    with pytest.raises(RuntimeError) as err:
        tokenize(["fine", text])
    message = str(err.value)
    assert "dog dog" in message and "82" in message and "77" in message
    assert "truncate=True" in message and "Shorten" in message


def test_too_long_message_shortens_very_long_text():
    text = "start " + "word " * 2000 + "end"
    with pytest.raises(RuntimeError) as err:
        tokenize(text)
    message = str(err.value)
    assert len(message) < 300 and "start" in message and "end" in message
    assert str(len(encode(text)) + 2) in message


def test_context_length_boundary():
    fits = " ".join(["dog"] * 75)  # exactly 77 with SOT and EOT
    row = tokenize(fits)[0]
    assert row[0] == SOT_TOKEN and row[-1] == EOT_TOKEN and (row[1:-1] == 1929).all()
    with pytest.raises(RuntimeError):
        tokenize(fits + " dog")


def test_truncate_keeps_first_ids_and_ends_in_eot():
    text = " ".join(f"word{i}" for i in range(60))  # digits are single tokens: far over 77
    full = [SOT_TOKEN] + encode(text)
    row = tokenize(text, truncate=True)
    assert row.shape == (1, 77) and row[0, -1] == EOT_TOKEN
    assert row[0, :76].tolist() == full[:76]
    short = tokenize("a photo of a", truncate=True)  # truncate does nothing to short texts
    assert torch.equal(short, tokenize("a photo of a"))


def test_str_and_list_inputs_and_dtype():
    one = tokenize("a photo of a cat.")
    many = tokenize(["a photo of a cat.", "X X X X dog."])
    assert one.dtype == torch.long and many.dtype == torch.long
    assert one.shape == (1, 77) and many.shape == (2, 77)
    assert torch.equal(one[0], many[0])
    assert torch.equal(many, tokenize(("a photo of a cat.", "X X X X dog.")))
    assert tokenize([]).shape == (0, 77)
    assert tokenize("a cat", context_length=10).tolist() == [
        [SOT_TOKEN, 320, 2368, EOT_TOKEN, 0, 0, 0, 0, 0, 0]]


def test_bad_input_types_raise():
    with pytest.raises(TypeError, match="str or a list of str"):
        tokenize(3)
    with pytest.raises(TypeError, match="str or a list of str"):
        tokenize(["a", None])
    with pytest.raises(TypeError, match="expects a str"):
        encode(["a"])
    with pytest.raises(ValueError, match="context_length"):
        tokenize("a", context_length=0)


@pytest.mark.parametrize("text", ["a photo of a dog", "the quick brown fox jumps over",
                                  "jekyll", "pink primrose", "a"])
def test_decode_round_trip(text):
    assert decode(encode(text)) == text
    assert decode(tokenize(text)[0]) == text  # SOT, EOT and padding dropped


def test_decode_details():
    assert decode(encode("a dog.")) == "a dog ."  # pieces come back space-separated
    assert decode([0, 0]) == "!!"  # zeros outside a tokenize() row are the token '!'
    assert decode(torch.tensor([SOT_TOKEN, 320, EOT_TOKEN])) == "a"
    assert decode([]) == ""
    with pytest.raises(ValueError, match="one row"):
        decode(tokenize(["a", "b"]))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        decode([49408])


def test_benchmark_names_same_without_ftfy(monkeypatch):
    with_ftfy = [encode(name) for name in BENCHMARK_NAMES]
    monkeypatch.setattr(tok, "_fix_text", lambda text: text)  # the no-ftfy fallback
    assert [encode(name) for name in BENCHMARK_NAMES] == with_ftfy
    assert encode("mojibake: Ã©") != GOLDEN["encode"]["mojibake: Ã©"]  # the patch is in effect


def test_vocabulary_not_loaded_at_import_and_ftfy_fallback(monkeypatch):
    # Execute clip/tokenizer.py afresh as a new module (what `import` does), with ftfy made
    # unimportable and gzip.open watched: importing must not read the vocabulary file.
    opened, real_open = [], gzip.open
    monkeypatch.setattr(gzip, "open", lambda *a, **k: opened.append(a[0]) or real_open(*a, **k))
    monkeypatch.setitem(sys.modules, "ftfy", None)  # `import ftfy` now raises ImportError
    spec = importlib.util.spec_from_file_location("fresh_tokenizer", tok.__file__)
    fresh = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fresh)
    assert fresh._tokenizer.cache_info().currsize == 0 and opened == []
    assert fresh._fix_text("Ã©") == "Ã©"  # the identity fallback is in use
    assert [fresh.encode(name) for name in BENCHMARK_NAMES] == [
        encode(name) for name in BENCHMARK_NAMES]
    assert opened == [tok.VOCAB_PATH]  # loaded once, on first use
