"""The caption (TEXT) auxiliary target of the paper's LAION-COCO variant: an auxiliary decoder predicts the
caption's CLIP BPE token ids from the latent tokens, trained with cross-entropy (classification).

The BPE tokenizer is written here (byte-level BPE in the manner of CLIP's ``simple_tokenizer``); only its
merges file ``bpe_simple_vocab_16e6.txt.gz`` is taken from the PyPI package ``open_clip_torch==3.3.0``
(located without importing the package) or from the path in ``$MAETOK_BPE_VOCAB``.
Vocabulary: 256 byte symbols + 256 with ``</w>`` + 48894 merges + ``<|startoftext|>`` (49406) +
``<|endoftext|>`` (49407) = 49408 ids. Id 0 (the symbol ``!``) doubles as padding, as in CLIP.

Differences from CLIP: no ``ftfy`` text fixing (only HTML unescaping and whitespace cleanup). When the
``regex`` module is missing, the token pattern falls back to a ``re``-based splitter that approximates
``\\p{L}`` / ``\\p{N}`` with ``str.isalpha`` / ``str.isdigit``.
"""

from __future__ import annotations

import gzip
import html
import importlib.util
import os
import re
from functools import lru_cache
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from maetok.errors import AssetError, ConfigError
from maetok.global_batch import global_weighted_mean
from maetok.targets.base import FeatureTarget, register_target

VOCAB_FILENAME = "bpe_simple_vocab_16e6.txt.gz"
INSTALL_LINE = "pip install --no-deps open_clip_torch==3.3.0"
SOT_TOKEN = "<|startoftext|>"
EOT_TOKEN = "<|endoftext|>"
SOT_ID = 49406
EOT_ID = 49407
VOCAB_SIZE = 49408
DEFAULT_CONTEXT_LENGTH = 77  # CLIP's caption length (SOT + up to 75 tokens + EOT)
PAD_ID = 0
NUM_MERGES = 49152 - 256 - 2  # merges lines used by CLIP

try:  # the exact CLIP pattern needs unicode classes
    import regex as _regex

    _TOKEN_PATTERN = _regex.compile(
        r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
        _regex.IGNORECASE,
    )

    def _split_words(text: str) -> list[str]:
        return _TOKEN_PATTERN.findall(text)

except ImportError:  # pragma: no cover - exercised only without `regex`
    _SPECIAL = re.compile(r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d", re.IGNORECASE)

    def _split_words(text: str) -> list[str]:
        """Approximation of CLIP's pattern: letter runs, single digits, runs of other non-space symbols."""
        words: list[str] = []
        i, n = 0, len(text)
        while i < n:
            ch = text[i]
            special = _SPECIAL.match(text, i)
            if special:
                words.append(special.group(0))
                i = special.end()
            elif ch.isspace():
                i += 1
            elif ch.isalpha():
                j = i + 1
                while j < n and text[j].isalpha():
                    j += 1
                words.append(text[i:j])
                i = j
            elif ch.isnumeric():  # (covers isdigit)
                words.append(ch)
                i += 1
            else:
                j = i + 1
                while j < n and not (text[j].isspace() or text[j].isalpha() or text[j].isnumeric()):
                    if _SPECIAL.match(text, j):
                        break
                    j += 1
                words.append(text[i:j])
                i = j
        return words


def bytes_to_unicode() -> dict[int, str]:
    """Byte value (0..255) -> a printable unicode character; printable latin bytes map to themselves.

    The dict's order (printable bytes first, then the rest) is the order of the first 256 vocabulary ids."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    mapping = {b: chr(b) for b in keep}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def bpe_vocab_path() -> Path:
    """The merges file: ``$MAETOK_BPE_VOCAB`` if set, else the one inside the installed ``open_clip`` package."""
    env = os.environ.get("MAETOK_BPE_VOCAB")
    if env:
        path = Path(env).expanduser()
        if not path.is_file():
            raise AssetError(f"MAETOK_BPE_VOCAB={env} is not a file (expected {VOCAB_FILENAME})")
        return path
    spec = importlib.util.find_spec("open_clip")
    if spec is not None and spec.submodule_search_locations:
        path = Path(list(spec.submodule_search_locations)[0]) / VOCAB_FILENAME
        if path.is_file():
            return path
    raise AssetError(
        f"the CLIP BPE vocabulary {VOCAB_FILENAME} was not found: install it with `{INSTALL_LINE}` "
        "or set MAETOK_BPE_VOCAB to the file's path"
    )


def _clean(text: str) -> str:
    text = html.unescape(html.unescape(text))
    return re.sub(r"\s+", " ", text).strip().lower()


class ClipBPETokenizer:
    """CLIP's byte-level BPE. ``encode(texts) -> (B, context_length)`` int64 ids: SOT, tokens, EOT, then 0."""

    def __init__(self, vocab_path: Optional[Union[str, Path]] = None):
        path = Path(vocab_path) if vocab_path is not None else bpe_vocab_path()
        try:
            lines = gzip.open(path, "rt", encoding="utf-8").read().split("\n")
        except OSError as err:
            raise AssetError(f"{path} is not a gzip BPE merges file ({VOCAB_FILENAME}): {err}") from None
        merges = [tuple(line.split()) for line in lines[1 : NUM_MERGES + 1]]
        if len(merges) != NUM_MERGES or any(len(m) != 2 for m in merges):
            raise AssetError(f"{path}: expected {NUM_MERGES} merge lines of two symbols each")
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        symbols = list(self.byte_encoder.values())
        symbols = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [SOT_TOKEN, EOT_TOKEN]
        self.encoder = {s: i for i, s in enumerate(symbols)}
        self.decoder = {i: s for s, i in self.encoder.items()}
        if len(self.encoder) != VOCAB_SIZE or self.encoder[SOT_TOKEN] != SOT_ID:
            raise AssetError(f"{path}: the vocabulary has {len(self.encoder)} symbols, expected {VOCAB_SIZE}")
        self.bpe_ranks = {m: r for r, m in enumerate(merges)}
        self.cache: dict[str, str] = {SOT_TOKEN: SOT_TOKEN, EOT_TOKEN: EOT_TOKEN}
        self.vocab_size = VOCAB_SIZE

    def _bpe(self, token: str) -> str:
        if token in self.cache:
            return self.cache[token]
        word = list(token[:-1]) + [token[-1] + "</w>"]
        while len(word) > 1:
            pairs = {(word[i], word[i + 1]) for i in range(len(word) - 1)}
            best = min(pairs, key=lambda p: self.bpe_ranks.get(p, float("inf")))
            if best not in self.bpe_ranks:
                break
            merged: list[str] = []
            i = 0
            while i < len(word):
                if i < len(word) - 1 and (word[i], word[i + 1]) == best:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        result = " ".join(word)
        if len(self.cache) < 100_000:
            self.cache[token] = result
        return result

    def encode_text(self, text: str) -> list[int]:
        """One string -> its BPE ids (no SOT / EOT)."""
        if not isinstance(text, str):
            raise TypeError(f"captions must be strings, got {type(text).__name__}")
        ids: list[int] = []
        for word in _split_words(_clean(text)):
            mapped = "".join(self.byte_encoder[b] for b in word.encode("utf-8"))
            ids.extend(self.encoder[piece] for piece in self._bpe(mapped).split(" "))
        return ids

    def encode(self, texts: Union[str, Sequence[str]], context_length: int = DEFAULT_CONTEXT_LENGTH) -> Tensor:
        """texts -> ``(B, context_length)`` int64: ``[SOT, ids..., EOT, 0, ...]``; a too-long text is cut and
        still ends with EOT. An empty text still gives ``[SOT, EOT, 0, ...]``."""
        if isinstance(texts, str):
            texts = [texts]
        if context_length < 2:
            raise ValueError(f"context_length must be >= 2 (SOT + EOT), got {context_length}")
        out = torch.full((len(texts), context_length), PAD_ID, dtype=torch.long)
        for row, text in enumerate(texts):
            ids = [SOT_ID] + self.encode_text(text)[: context_length - 2] + [EOT_ID]
            out[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out

    def decode(self, ids: Union[Tensor, Sequence[int]]) -> str:
        """Ids -> text (SOT / EOT / padding dropped, ``</w>`` becomes a space)."""
        if isinstance(ids, Tensor):
            ids = ids.tolist()
        pieces = [self.decoder[int(i)] for i in ids if int(i) not in (SOT_ID, EOT_ID, PAD_ID)]
        data = bytearray(self.byte_decoder[c] for c in "".join(pieces))
        return data.decode("utf-8", errors="replace").replace("</w>", " ").strip()


@lru_cache(maxsize=4)
def clip_bpe_tokenizer(vocab_path: Optional[str] = None) -> ClipBPETokenizer:
    """Shared (cached) tokenizer instance."""
    return ClipBPETokenizer(vocab_path)


def caption_cross_entropy(logits: Tensor, token_ids: Tensor) -> Tensor:
    """Mean cross-entropy over the non-padding positions of the captions.

    logits: ``(B, T, V)``; token_ids: ``(B, T)`` int64 from :meth:`ClipBPETokenizer.encode`. Padding (0) is
    ignored, and so is an empty caption (``[SOT, EOT]`` only): such images contribute nothing. SOT is not a
    prediction target either (it is the same for every caption). Returns 0 when nothing is left. Under several
    processes the mean is over the caption tokens of the global batch."""
    if logits.dim() != 3 or token_ids.shape != logits.shape[:2]:
        raise ValueError(
            f"expected logits (B, T, V) and token ids (B, T), got {tuple(logits.shape)} and {tuple(token_ids.shape)}"
        )
    targets = token_ids.clone()
    empty = (token_ids != PAD_ID).sum(dim=1) <= 2  # SOT + EOT only
    targets[empty] = PAD_ID
    targets[targets == SOT_ID] = PAD_ID
    valid = targets != PAD_ID
    flat = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=PAD_ID, reduction="none")
    per_token = flat.view_as(targets)
    return global_weighted_mean(per_token, valid)  # (B, T); over the global batch's tokens under torchrun


class TextTarget(FeatureTarget):
    """The caption target: ``dim`` = vocabulary size, ``context_length`` 1D query tokens in its decoder.
    It holds no network: :meth:`tokenize` makes the ids, :meth:`loss_from_logits` scores the decoder's logits
    (``loss = "cross_entropy"`` tells the objective to call it instead of a feature loss)."""

    name = "text"
    loss = "cross_entropy"

    def __init__(self, context_length: int = DEFAULT_CONTEXT_LENGTH, vocab_path: Optional[str] = None):
        super().__init__()
        if int(context_length) < 2:
            raise ValueError(f"text target: context_length must be >= 2, got {context_length}")
        self.context_length = int(context_length)
        self.tokenizer = clip_bpe_tokenizer(vocab_path)
        self.dim = self.tokenizer.vocab_size

    def tokenize(self, captions: Sequence[str]) -> Tensor:
        """captions (B strings) -> ``(B, context_length)`` int64 ids."""
        return self.tokenizer.encode(list(captions), self.context_length)

    def loss_from_logits(self, logits: Tensor, token_ids: Tensor) -> Tensor:
        return caption_cross_entropy(logits, token_ids.to(logits.device))

    def forward(self, images: Tensor, grid_size: tuple[int, int]) -> Tensor:
        raise TypeError("the text target has no image features: pass caption ids to generator_loss(captions=...)")


@register_target("text")
def build_text_target(image_size: int = 0, patch_size: int = 0, in_channels: int = 0, **options) -> TextTarget:
    """Factory with the registry's signature (image geometry unused). Options: context_length, vocab_path."""
    unknown = set(options) - {"context_length", "vocab_path"}
    if unknown:
        raise ConfigError(f"text target: unknown options {sorted(unknown)}; known: ['context_length', 'vocab_path']")
    return TextTarget(**options)
