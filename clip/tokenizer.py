"""CLIP's byte-level BPE tokenizer: text -> the integer ids the text encoder reads.

Re-implementation of openai/CLIP's clip/simple_tokenizer.py and clip.tokenize (MIT), written
to be read like minGPT's bpe.py. The merges file bpe_simple_vocab_16e6.txt.gz beside this
module is OpenAI's vocabulary; our copy comes from the PyPI package open-clip-torch (MIT) and
is byte-identical to openai/CLIP's, SHA-256
924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a.

One text goes through four steps (tokenize):
  1. clean: ftfy, html.unescape twice, collapse whitespace, lowercase;
  2. pre-tokenise: a regex cuts the text into pieces ("a", "photo", "of", "a", "dog", ".");
  3. BPE each piece: UTF-8 bytes -> printable characters -> learned merges -> vocabulary ids;
  4. wrap in [SOT] ... [EOT] and zero-pad to context_length.

How CLIP differs from GPT-2's BPE (same byte-level idea, different details):
  - the text is cleaned and lowercased first; GPT-2 keeps case and raw whitespace;
  - whitespace never becomes a token. GPT-2 glues a leading space onto a word ("Ġcat"); CLIP
    marks the END of a word with "</w>" instead ("cat</w>"), see _BPE.bpe;
  - each digit is its own piece ("2012" -> 2, 0, 1, 2);
  - every text is wrapped in <|startoftext|> (SOT, 49406) and <|endoftext|> (EOT, 49407).

Public API: tokenize, encode, decode, token_strings, SOT_TOKEN, EOT_TOKEN; and for prompt
templates ("a photo of a {}.") PHOTO and check_template.
Shape legend: N = texts, L = context_length (77).
"""
import gzip
import html
import math
import os
from functools import lru_cache

import regex  # not `re`: we need \p{L} (any letter) and \p{N} (any digit) in every script
import torch

try:
    from ftfy import fix_text as _fix_text  # repairs broken unicode, e.g. mojibake "Ã©" -> "é"
except ImportError:
    # ftfy is a declared dependency, but the class names of the 11 benchmark datasets are plain
    # ASCII, where ftfy changes nothing; without it only messy web text would tokenize differently.
    def _fix_text(text):
        return text

SOT_TOKEN = 49406  # <|startoftext|>
EOT_TOKEN = 49407  # <|endoftext|>: the largest id, so the text encoder finds it with argmax
VOCAB_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                          "bpe_simple_vocab_16e6.txt.gz")
# NOTE(official code): only the first 49152 - 256 - 2 = 48,894 merges of the file are used.
# 256 bytes + 256 bytes-with-</w> + 48,894 merges + 2 specials = 49,408 ids = token_embedding rows.
N_MERGES = 49152 - 256 - 2
SPECIALS = ("<|startoftext|>", "<|endoftext|>")

# Pre-tokenisation: cut the cleaned text into pieces; BPE never merges across two pieces.
# At each position the alternatives are tried left to right and the first match wins:
PIECE = regex.compile(
    r"<\|startoftext\|>|<\|endoftext\|>"  # 1. a literal special token, kept whole
    r"|'s|'t|'re|'ve|'m|'ll|'d"  # 2. English contractions: "it's" -> "it", "'s"
    r"|[\p{L}]+"  # 3. a run of letters of any script: "photo", "café", "猫"
    r"|[\p{N}]"  # 4. a SINGLE digit, so numbers are spelt digit by digit
    r"|[^\s\p{L}\p{N}]+",  # 5. a run of anything else but whitespace: ".", "...", "@", "🐱🐶"
    regex.IGNORECASE)  # NOTE(official code): kept, though the text is already lowercase
# Whitespace matches no alternative, so it is simply dropped between pieces.
WHITESPACE = regex.compile(r"\s+")


def bytes_to_unicode():
    """Map each byte 0..255 to one printable unicode character (the byte's stand-in).

    BPE works on unicode strings of visible symbols, but UTF-8 text is bytes, and many bytes
    (space, newline, control bytes, the halves of a two-byte 'é') are not printable alone. So
    the 188 printable bytes '!'..'~', '¡'..'¬', '®'..'ÿ' stand for themselves, and the other 68
    (0-32, 127-160 and 173), in byte order, are shifted to chr(256 + n): the space byte 32 is
    the 33rd of them and becomes 'Ġ' (chr(288)). Any text is some sequence of these 256
    symbols, so there is never an unknown token. The dict order fixes ids 0..255.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    shifted = [b for b in range(256) if b not in printable]
    chars = [chr(b) for b in printable] + [chr(256 + n) for n in range(len(shifted))]
    return dict(zip(printable + shifted, chars))


class _BPE:
    """The loaded vocabulary: merge ranks, id <-> token tables and a cache of finished pieces."""

    def __init__(self, path=VOCAB_PATH):
        lines = gzip.open(path).read().decode("utf-8").split("\n")
        # Line 0 is a header; then one merge "left right" per line, in the order training
        # learned them (most frequent pair first). A pair's line index is its rank.
        merges = [tuple(line.split()) for line in lines[1:1 + N_MERGES]]
        if len(merges) != N_MERGES or any(len(m) != 2 for m in merges):
            raise RuntimeError(f"{path} is not CLIP's merges file; restore it from the repo")
        self.ranks = {pair: rank for rank, pair in enumerate(merges)}
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {char: byte for byte, char in self.byte_encoder.items()}
        base = list(self.byte_encoder.values())
        # ids: the 256 byte symbols, the same 256 ending a word, each merge's result, specials
        self.vocab = tuple(base + [c + "</w>" for c in base] + ["".join(m) for m in merges]
                           + list(SPECIALS))
        self.encoder = {token: i for i, token in enumerate(self.vocab)}
        self.cache = {s: (s,) for s in SPECIALS}  # a special piece is one token, no </w>

    def bpe(self, piece):
        """Merge one piece's symbols into vocabulary tokens: 'photos' -> ('photos</w>',)."""
        if piece in self.cache:
            return self.cache[piece]
        # Start from single symbols. The last one carries the end-of-word marker </w>, so the
        # vocabulary tells "cat" ending a word ('cat</w>') from "cat" inside 'category' ('cat').
        word = list(piece[:-1]) + [piece[-1] + "</w>"]
        while len(word) > 1:
            # The adjacent pair that training merged earliest (lowest rank) is merged first.
            best = min(zip(word, word[1:]), key=lambda pair: self.ranks.get(pair, math.inf))
            if best not in self.ranks:
                break  # no learned merge applies any more
            merged, i = [], 0
            while i < len(word):  # merge every occurrence, left to right, without overlaps
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        self.cache[piece] = tuple(word)
        return self.cache[piece]


@lru_cache(maxsize=None)
def _tokenizer():
    """The one _BPE instance, built on first use (about 0.3 s), never at import."""
    return _BPE()


def _clean(text):
    text = html.unescape(html.unescape(_fix_text(text)))  # twice: web text is often escaped twice
    return WHITESPACE.sub(" ", text.strip()).strip().lower()


def encode(text):
    """BPE ids of one text, without SOT/EOT: encode('a photo of a dog.') -> [320, ..., 269]."""
    if not isinstance(text, str):
        raise TypeError(f"encode expects a str, got {type(text).__name__}")
    bpe, ids = _tokenizer(), []
    for piece in PIECE.findall(_clean(text)):
        symbols = "".join(bpe.byte_encoder[b] for b in piece.encode("utf-8"))
        ids.extend(bpe.encoder[token] for token in bpe.bpe(symbols))
    return ids


def decode(ids):
    """Ids (list or 1-D tensor) -> text; '</w>' becomes a space, the final one is dropped.

    A tokenize() row (it starts with SOT) loses its SOT and everything from its first EOT on,
    i.e. EOT and the zero padding (id 0 is the real token '!', so zeros elsewhere are kept).
    Other ids decode as they are, specials included. Pieces come back space-separated, so
    decode(encode(s)) == s for lowercase words with single spaces, but 'a dog.' -> 'a dog .'.
    """
    if isinstance(ids, torch.Tensor):
        if ids.dim() != 1:
            raise ValueError(f"decode takes one row of ids, got shape {tuple(ids.shape)}; "
                             "call it once per row")
        ids = ids.tolist()
    ids = [int(i) for i in ids]
    if ids and ids[0] == SOT_TOKEN:
        ids = ids[1:ids.index(EOT_TOKEN)] if EOT_TOKEN in ids else ids[1:]
    bpe = _tokenizer()
    bad = [i for i in ids if not 0 <= i < len(bpe.vocab)]
    if bad:
        raise ValueError(f"ids {bad[:5]} are outside the vocabulary 0..{len(bpe.vocab) - 1}")
    symbols = "".join(bpe.vocab[i] for i in ids)
    text = bytes(bpe.byte_decoder[c] for c in symbols).decode("utf-8", errors="replace")
    return text.replace("</w>", " ").removesuffix(" ")


PHOTO = "a photo of a {}."  # CLIP's and CoOp's default prompt template


def check_template(template):
    """A prompt template holds exactly one "{}", where the class name goes, and no other braces
    (str.format would read them as fields). -> template; ValueError saying what is wrong."""
    rest = template.replace("{}", "", 1) if isinstance(template, str) else "{"
    if not isinstance(template, str) or "{}" not in template or "{" in rest or "}" in rest:
        raise ValueError(f"template {template!r} must hold exactly one {{}}, where the class "
                         "name goes, and no other braces (e.g. 'a photo of a {}.')")
    return check_words(template, "template")


def check_words(text, what="text"):
    """Words for a prompt (a template, context words, a class name) -> text; ValueError if they
    hold a special token: encode() keeps "<|endoftext|>" (also HTML-escaped) as EOT, and the
    text feature would be read there, at the first EOT, instead of at the prompt's end."""
    if {SOT_TOKEN, EOT_TOKEN} & set(encode(text)):
        raise ValueError(f"{what} {text!r} holds CLIP's special token <|startoftext|> or "
                         "<|endoftext|>, which would cut the prompt short: remove it")
    return text


def token_strings():
    """All 49,408 vocabulary strings, indexed by id: token_strings()[1125] == 'photo</w>'."""
    return _tokenizer().vocab


def tokenize(texts, context_length=77, truncate=False):
    """A str or list of str -> LongTensor (N, context_length): SOT, ids, EOT, zero padding.

    A text longer than context_length (SOT and EOT included) raises, unless truncate=True:
    then it keeps the first context_length ids and overwrites the last with EOT.
    """
    if isinstance(texts, str):
        texts = [texts]
    if not isinstance(texts, (list, tuple)) or not all(isinstance(t, str) for t in texts):
        raise TypeError("tokenize expects a str or a list of str, got "
                        f"{type(texts).__name__} {str(texts)[:60]}")
    if not isinstance(context_length, int) or context_length < 1:
        raise ValueError(f"context_length must be a positive int, got {context_length!r}")
    # NOTE(official code): openai/CLIP returns int32 on torch >= 1.8; the CoOp/MaPLe copies
    # return int64, which nn.Embedding and argmax take just as well. We follow CoOp.
    result = torch.zeros(len(texts), context_length, dtype=torch.long)  # (N, L)
    for row, text in enumerate(texts):
        ids = [SOT_TOKEN] + encode(text) + [EOT_TOKEN]
        if len(ids) > context_length:
            if not truncate:
                shown = text if len(text) <= 80 else text[:60] + " ... " + text[-15:]
                raise RuntimeError(
                    f"Input {shown!r} is too long for context length {context_length}: it is "
                    f"{len(ids)} tokens with SOT and EOT. Shorten the text, or pass "
                    f"truncate=True to keep its first {context_length} tokens.")
            ids = ids[:context_length]
            ids[-1] = EOT_TOKEN  # keep an EOT: the text encoder reads the sentence feature there
        result[row, :len(ids)] = torch.tensor(ids)
    return result
