"""Tokenizers: byte (UTF-8 bytes), char (nanoGPT shakespeare_char) and byte-level BPE.

All three share one small interface so the data pipeline, training loop and sampler never care
which one they hold. Each saves itself as ``directory/tokenizer.json`` next to a checkpoint, so a
model is always reloaded with exactly the vocabulary it was trained on.
"""
from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Optional, Sequence

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from llmlab.errors import LlmlabError
from llmlab.fsutil import atomic_write_json, one_line

TOKENIZER_KINDS = ("byte", "char", "bpe")
TOKENIZER_FILE = "tokenizer.json"
EOS_TOKEN = "<|endoftext|>"
DEFAULT_BPE_VOCAB = 1024
_MIN_BPE_VOCAB = 257  # the 256 byte symbols of the initial alphabet + <|endoftext|>
_MAX_BPE_VOCAB = 1 << 20


class Tokenizer(ABC):
    """The interface every tokenizer offers."""

    kind: str
    vocab_size: int
    eos_id: Optional[int] = None

    @abstractmethod
    def encode(self, text: str) -> list[int]: ...

    @abstractmethod
    def decode(self, ids: Sequence[int]) -> str: ...

    @abstractmethod
    def _content(self) -> str:
        """What identifies this vocabulary exactly (hashed by fingerprint())."""

    @abstractmethod
    def save(self, directory: Path) -> None: ...

    @abstractmethod
    def to_hf(self) -> HFTokenizer:
        """The same vocabulary as a Hugging Face `tokenizers` object (same ids for every text it
        can encode): what `llmlab convert --to-hf` writes as tokenizer.json."""

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Encode many texts; BPE overrides this to use the Rust library's thread pool."""
        return [self.encode(t) for t in texts]

    def fingerprint(self) -> str:
        """A short stable hash of kind + vocabulary: the cache key for encoded corpora."""
        digest = hashlib.sha256(f"{self.kind}\0{self._content()}".encode("utf-8", "surrogatepass"))
        return digest.hexdigest()[:16]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={self.vocab_size}, eos_id={self.eos_id})"


def _write_json(directory: Path, obj: dict) -> None:
    # ensure_ascii keeps any character (even a lone surrogate) writable in a plain ASCII file.
    atomic_write_json(Path(directory) / TOKENIZER_FILE, obj, ensure_ascii=True, indent=None)


def _byte_symbols() -> list[str]:
    """GPT-2's bytes_to_unicode: the printable symbol ByteLevel uses for each byte value."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1),
            *range(ord("\u00ae"), ord("\u00ff") + 1)]
    out, extra = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + extra)
            extra += 1
    return [out[b] for b in range(256)]


_BYTE_SYMBOLS = _byte_symbols()


class ByteTokenizer(Tokenizer):
    """One id per UTF-8 byte: 256 ids, no training, encodes any text."""

    kind = "byte"
    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        # errors="replace": a lone surrogate (possible in Python strs) becomes b"?" instead of raising.
        return list(text.encode("utf-8", errors="replace"))

    def decode(self, ids: Sequence[int]) -> str:
        # errors="replace": a sampled id stream may stop (or wander) mid multi-byte character.
        # An id past 255 (a model with a larger vocabulary) becomes U+FFFD, never a ValueError.
        out, run = [], bytearray()
        for i in map(int, ids):
            if 0 <= i < 256:
                run.append(i)
                continue
            out.append(run.decode("utf-8", errors="replace") + "\ufffd")
            run = bytearray()
        return "".join(out) + run.decode("utf-8", errors="replace")

    def _content(self) -> str:
        return ""

    def save(self, directory: Path) -> None:
        _write_json(directory, {"llmlab_tokenizer": "byte"})

    def to_hf(self) -> HFTokenizer:
        # GPT-2's byte-level scheme with the 256 byte symbols as the whole vocabulary (id = byte
        # value) and no merges: every byte is one token, exactly as encode() does.
        vocab = {_BYTE_SYMBOLS[b]: b for b in range(256)}
        hf = HFTokenizer(models.BPE(vocab=vocab, merges=[]))
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        hf.decoder = decoders.ByteLevel()
        return hf


class CharTokenizer(Tokenizer):
    """One id per distinct character of the training text, in sorted order (as nanoGPT's
    shakespeare_char prepare.py), so tiny Shakespeare gives the familiar 65-symbol vocabulary."""

    kind = "char"

    def __init__(self, chars: str) -> None:
        self.chars = "".join(sorted(set(chars)))
        if not self.chars:
            raise LlmlabError("cannot build a char tokenizer from empty text; pass a non-empty corpus")
        self.vocab_size = len(self.chars)
        self._stoi = {c: i for i, c in enumerate(self.chars)}

    def encode(self, text: str) -> list[int]:
        stoi = self._stoi
        try:
            return [stoi[c] for c in text]
        except KeyError:
            unseen = list(dict.fromkeys(c for c in text if c not in stoi))  # first-seen order
            shown = ", ".join(repr(c) for c in unseen[:5]) + (", ..." if len(unseen) > 5 else "")
            raise LlmlabError(
                f"text has {len(unseen)} character(s) the char tokenizer never saw in training "
                f"({shown}); it only knows characters seen in training (use the byte tokenizer "
                f"for arbitrary text)"
            ) from None

    def decode(self, ids: Sequence[int]) -> str:
        chars, n = self.chars, self.vocab_size
        # Out-of-range ids (from an untrained or mismatched model) decode to U+FFFD, never crash.
        return "".join(chars[i] if 0 <= i < n else "\ufffd" for i in map(int, ids))

    def _content(self) -> str:
        return self.chars

    def save(self, directory: Path) -> None:
        _write_json(directory, {"llmlab_tokenizer": "char", "chars": self.chars})

    def to_hf(self) -> HFTokenizer:
        # One token per character (no pre-tokenizer, no merges: BPE splits the text into its
        # characters and looks each up); Fuse joins decoded tokens without the default spaces.
        hf = HFTokenizer(models.BPE(vocab={c: i for i, c in enumerate(self.chars)}, merges=[]))
        hf.decoder = decoders.Fuse()
        return hf


class BPETokenizer(Tokenizer):
    """Byte-level BPE (the GPT-2 recipe) trained with Hugging Face ``tokenizers``.

    Byte-level means text is first mapped to its UTF-8 bytes, each shown as one of 256 printable
    symbols; seeding the trainer with all 256 (``initial_alphabet``) means any text encodes, even
    characters absent from the training corpus. No normalizer and no post-processor are set, and
    ``add_prefix_space=False``: each of those would alter the text, and decode(encode(t)) == t must
    hold exactly.
    """

    kind = "bpe"

    def __init__(self, hf: HFTokenizer) -> None:
        self.hf = hf
        self.vocab_size = hf.get_vocab_size(with_added_tokens=True)
        self.eos_id = hf.token_to_id(EOS_TOKEN)  # None for a foreign tokenizer.json without it

    @classmethod
    def train(cls, text: str, vocab_size: int = DEFAULT_BPE_VOCAB) -> "BPETokenizer":
        if vocab_size < _MIN_BPE_VOCAB:
            raise LlmlabError(
                f"BPE vocab size {vocab_size} is too small; use at least {_MIN_BPE_VOCAB} "
                f"(256 byte symbols + {EOS_TOKEN})"
            )
        if vocab_size > _MAX_BPE_VOCAB:  # the Rust trainer aborts the process past its limits
            raise LlmlabError(f"BPE vocab size {vocab_size:,} is too large; use at most {_MAX_BPE_VOCAB:,}")
        hf = HFTokenizer(models.BPE())
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        hf.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=[EOS_TOKEN],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        # Feed ~1 MB pieces: the trainer counts pre-tokenized words in parallel across pieces.
        step = 1 << 20
        hf.train_from_iterator((text[i : i + step] for i in range(0, len(text), step)), trainer)
        return cls(hf)

    @staticmethod
    def _safe(text: str) -> str:
        # The Rust side rejects lone surrogates; replace them (as ByteTokenizer does) instead.
        return text.encode("utf-8", errors="replace").decode("utf-8")

    def encode(self, text: str) -> list[int]:
        try:
            return self.hf.encode(text, add_special_tokens=False).ids
        except TypeError:
            return self.hf.encode(self._safe(text), add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        try:
            encs = self.hf.encode_batch(list(texts), add_special_tokens=False)
        except TypeError:
            encs = self.hf.encode_batch([self._safe(t) for t in texts], add_special_tokens=False)
        return [e.ids for e in encs]

    def decode(self, ids: Sequence[int]) -> str:
        # Keep special tokens: a literal "<|endoftext|>" in the input must come back out.
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=False)

    def _content(self) -> str:
        return self.hf.to_str()

    def save(self, directory: Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.hf.save(str(directory / TOKENIZER_FILE))  # the plain HF file: other tools can load it

    def to_hf(self) -> HFTokenizer:
        return self.hf


def check_fits(tokenizer: Tokenizer, vocab_size: int, where: object) -> None:
    """Refuse (one line) a tokenizer with ids the model's embedding of `vocab_size` rows lacks: a
    prompt could index past it."""
    if tokenizer.vocab_size > vocab_size:
        raise LlmlabError(f"the tokenizer in {where} has {tokenizer.vocab_size} ids but the model only {vocab_size}; "
                          "they do not belong together (retrain or re-convert)")


def build_tokenizer(kind: str, text: str, vocab_size: Optional[int] = None) -> Tokenizer:
    """Make a tokenizer of ``kind`` for ``text`` (vocab_size only matters for bpe)."""
    if kind == "byte":
        return ByteTokenizer()
    if kind == "char":
        return CharTokenizer(text)
    if kind == "bpe":
        return BPETokenizer.train(text, DEFAULT_BPE_VOCAB if vocab_size is None else vocab_size)
    raise LlmlabError(f"unknown tokenizer {kind!r}; choose one of: {', '.join(TOKENIZER_KINDS)}")


def load_tokenizer(directory: Path | str) -> Tokenizer:
    """Load the tokenizer saved in ``directory/tokenizer.json`` (ours, or any HF tokenizers file)."""
    path = Path(directory) / TOKENIZER_FILE
    if not path.is_file():
        raise LlmlabError(f"tokenizer file not found: {path}; point at a run/checkpoint directory that has one")
    corrupt = f"tokenizer file {path} is corrupt or unreadable"
    try:
        raw = path.read_text(encoding="utf-8")
        obj = json.loads(raw)
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise LlmlabError(f"{corrupt} ({one_line(e)}); delete it and retrain the tokenizer") from None
    if not isinstance(obj, dict):
        raise LlmlabError(f"{corrupt} (not a JSON object); delete it and retrain the tokenizer")
    kind = obj.get("llmlab_tokenizer")
    if kind == "byte":
        return ByteTokenizer()
    if kind == "char":
        chars = obj.get("chars")
        if not isinstance(chars, str) or not chars:
            raise LlmlabError(f"{corrupt} (no 'chars' list); delete it and retrain the tokenizer")
        return CharTokenizer(chars)
    if kind is not None:
        raise LlmlabError(
            f"{path} names unknown tokenizer kind {kind!r}; expected one of: {', '.join(TOKENIZER_KINDS)}"
        )
    exported = _exported_kind(obj)
    if exported is not None:  # a byte/char vocabulary llmlab wrote for Hugging Face: ours again
        return exported
    try:  # not ours: a Hugging Face tokenizers file
        return BPETokenizer(HFTokenizer.from_str(raw))
    except Exception as e:  # the Rust side raises plain Exception on a bad file
        raise LlmlabError(f"{corrupt} ({one_line(e)}); delete it and retrain the tokenizer") from None


def _exported_kind(obj: dict) -> Optional[Tokenizer]:
    """The ByteTokenizer / CharTokenizer whose to_hf() wrote this tokenizer.json, else None."""
    model = obj.get("model")
    if not isinstance(model, dict) or model.get("type") != "BPE" or model.get("merges"):
        return None
    vocab = model.get("vocab")
    if not isinstance(vocab, dict) or obj.get("added_tokens") or obj.get("normalizer") is not None:
        return None
    pre, dec = obj.get("pre_tokenizer") or {}, obj.get("decoder") or {}
    if pre.get("type") == "ByteLevel" and dec.get("type") == "ByteLevel" and \
            vocab == {_BYTE_SYMBOLS[b]: b for b in range(256)}:
        return ByteTokenizer()
    if not pre and dec.get("type") == "Fuse" and all(isinstance(k, str) and len(k) == 1 for k in vocab):
        chars = "".join(sorted(vocab, key=vocab.get))
        if chars and chars == "".join(sorted(set(chars))) and sorted(vocab.values()) == list(range(len(chars))):
            return CharTokenizer(chars)
    return None
