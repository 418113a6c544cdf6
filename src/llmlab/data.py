"""Corpora, token caching and batch sampling.

``load_text`` turns a --data spec into text (the default needs no network: it is built from the
running Python's own standard library); ``encode_corpus`` tokenizes it once and caches the ids as
a raw numpy file; ``BatchSampler`` draws nanoGPT-style random windows with a seeded generator whose
state is checkpointed, so a resumed run sees exactly the batches an uninterrupted run would have.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import sysconfig
import tempfile
import urllib.request
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch

from llmlab.errors import LlmlabError
from llmlab.fsutil import atomic_write_bytes, atomic_write_json, file_mode, one_line

DEFAULT_CORPUS = "stdlib"
STDLIB_CORPUS_CHARS = 2_000_000
SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
SHAKESPEARE_FILE = "tinyshakespeare.txt"
_DOWNLOAD_TIMEOUT_S = 20
_CHUNK_CHARS = 1 << 16  # encode_corpus works in pieces of about this many characters
_CHUNKS_PER_BATCH = 64  # ... handed to encode_batch this many at a time (bounds memory)


def cache_dir() -> Path:
    """Where downloads and encoded corpora are cached: $LLMLAB_CACHE, else ~/.cache/llmlab."""
    env = os.environ.get("LLMLAB_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "llmlab"


# ---- corpora -------------------------------------------------------------------------------
def stdlib_corpus_text(max_chars: int = STDLIB_CORPUS_CHARS) -> str:
    """About 2M characters of the running Python's top-level stdlib ``*.py`` files, in file-name
    order, each under a ``# file: NAME.py`` header. Deterministic for a given Python install."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted((p for p in root.glob("*.py") if p.is_file()), key=lambda p: p.name)
    parts: list[str] = []
    total = 0
    for p in files:
        if total >= max_chars:  # the cap is checked between files: never cut one in half
            break
        src = p.read_text(encoding="utf-8", errors="replace")
        if src and not src.endswith("\n"):
            src += "\n"
        piece = f"# file: {p.name}\n{src}"
        parts.append(piece)
        total += len(piece)
    if not parts:
        raise LlmlabError(f"no Python standard library sources found under {root}; pass --data PATH")
    return "".join(parts)


def _shakespeare_text() -> str:
    path = cache_dir() / SHAKESPEARE_FILE
    if path.is_file():
        data = path.read_bytes()
        if hashlib.sha256(data).hexdigest() == SHAKESPEARE_SHA256:
            return data.decode("utf-8")
        # a stale or damaged copy: fall through and download a fresh one over it
    try:
        with urllib.request.urlopen(SHAKESPEARE_URL, timeout=_DOWNLOAD_TIMEOUT_S) as resp:
            data = resp.read()
    except Exception as e:  # URLError, timeouts, HTTP errors, ...: all mean "no usable download"
        raise LlmlabError(
            f"could not download tiny Shakespeare ({one_line(e)}); "
            f"pass a local copy with --data PATH/TO/input.txt"
        ) from None
    digest = hashlib.sha256(data).hexdigest()
    if digest != SHAKESPEARE_SHA256:
        raise LlmlabError(
            f"downloaded tiny Shakespeare has the wrong sha256 ({digest[:12]}..., expected "
            f"{SHAKESPEARE_SHA256[:12]}...); pass a local copy with --data PATH/TO/input.txt"
        )
    atomic_write_bytes(path, data)
    return data.decode("utf-8")


def _directory_text(root: Path) -> str:
    parts: list[str] = []
    # Sorted by relative path (as posix text) so the corpus is the same on every machine.
    # Hidden entries (.git, .venv, ...) are skipped: they are tool state, not corpus.
    for p in sorted(root.rglob("*"), key=lambda q: q.relative_to(root).as_posix()):
        rel = p.relative_to(root)
        if any(part.startswith(".") for part in rel.parts) or not p.is_file():
            continue
        data = p.read_bytes()
        if b"\0" in data:  # binary (images, archives, .pyc): not text
            continue
        text = data.decode("utf-8", errors="replace")
        if text and not text.endswith("\n"):
            text += "\n"
        parts.append(text)
    return "".join(parts)


def load_text(spec: Optional[str]) -> tuple[str, str]:
    """Resolve a --data spec to (name, text): None/"stdlib", "shakespeare", a file or a directory."""
    if spec is None or spec == "stdlib":
        return "stdlib", stdlib_corpus_text()
    if spec == "shakespeare":
        return "shakespeare", _shakespeare_text()
    path = Path(spec).expanduser()
    hint = "pass a text file or a directory of text files, or 'shakespeare'"
    if path.is_file():
        text = path.read_bytes().decode("utf-8", errors="replace")
    elif path.is_dir():
        text = _directory_text(path)
    else:
        raise LlmlabError(f"data file not found: {spec}; {hint}")
    if not text:
        raise LlmlabError(f"no text found in {spec} (empty, or only binary files); {hint}")
    return path.name or str(path), text


# ---- encoding + caching ----------------------------------------------------------------------
# A split point that changes no token: after a "\n" with a non-space character on both sides.
# Byte/char tokenizers could split anywhere, but BPE's GPT-2 pre-tokenizer regex treats a run of
# whitespace differently at end of string (\s+(?!\S)), so a boundary inside or right after a
# whitespace run could change ids. A lone "\n" between non-spaces is always its own pre-token.
_SAFE_SPLIT = re.compile(r"(?<=\S)\n(?=\S)")


def _chunks(text: str, size: int):
    pos = 0
    while pos < len(text):
        m = _SAFE_SPLIT.search(text, pos + size) if pos + size < len(text) else None
        end = m.end() if m else len(text)
        yield text[pos:end]
        pos = end


def ids_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size < 65536 else np.uint32)


def _cache_is_valid(path: Path, record: Path, dtype: np.dtype, vocab_size: int) -> bool:
    """A cached ids file is used only if it is exactly the file this code wrote: its size and
    sha256 match the record written beside it, and every id fits the vocabulary. A truncated file,
    another corpus's ids or a hand-edited file would otherwise train silently on the wrong tokens."""
    try:
        with open(record) as fh:
            rec = json.load(fh)
        size = path.stat().st_size
        if not isinstance(rec, dict) or rec.get("bytes") != size or size == 0 or size % dtype.itemsize:
            return False
        digest = hashlib.sha256()
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
        if digest.hexdigest() != rec.get("sha256"):
            return False
        return int(np.memmap(path, dtype=dtype, mode="r").max()) < vocab_size
    except (OSError, ValueError, TypeError):
        return False


def encode_corpus(text: str, tokenizer, cache: Optional[Path] = None) -> np.ndarray:
    """Token ids of ``text`` as a read-only np.memmap, cached under ``cache`` (default
    cache_dir()/"tokens") by sha256(text) + tokenizer.fingerprint(): the second call only verifies
    the cached file (size + sha256 recorded when it was written; any mismatch re-encodes).
    Ids equal ``tokenizer.encode(text)`` exactly (the text is split only at token-neutral spots)."""
    dtype = ids_dtype(tokenizer.vocab_size)
    if not text:
        return np.zeros(0, dtype=dtype)
    text_hash = hashlib.sha256(text.encode("utf-8", errors="surrogatepass")).hexdigest()
    directory = Path(cache) if cache is not None else cache_dir() / "tokens"
    path = directory / f"{text_hash[:24]}-{tokenizer.fingerprint()}.{dtype.name}"
    record = path.with_name(path.name + ".json")
    if path.is_file() and record.is_file() and _cache_is_valid(path, record, dtype, tokenizer.vocab_size):
        return np.memmap(path, dtype=dtype, mode="r")

    encode_batch = getattr(tokenizer, "encode_batch", None) or (lambda ts: [tokenizer.encode(t) for t in ts])
    directory.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=path.name + ".", suffix=".tmp")
    digest = hashlib.sha256()
    try:
        with os.fdopen(fd, "wb") as f:  # streamed to disk batch by batch: memory stays bounded

            def put(ids) -> None:
                data = np.asarray(ids, dtype=dtype).tobytes()
                digest.update(data)
                f.write(data)

            batch: list[str] = []
            for chunk in _chunks(text, _CHUNK_CHARS):
                batch.append(chunk)
                if len(batch) == _CHUNKS_PER_BATCH:
                    for ids in encode_batch(batch):
                        put(ids)
                    batch = []
            for ids in encode_batch(batch) if batch else []:
                put(ids)
            f.flush()
            os.fsync(f.fileno())
        size = os.path.getsize(tmp)
        if size == 0:  # np.memmap cannot map an empty file
            Path(tmp).unlink()
            return np.zeros(0, dtype=dtype)
        os.chmod(tmp, file_mode())
        record.unlink(missing_ok=True)  # never a new record beside an old file, or the reverse
        os.replace(tmp, path)
        atomic_write_json(record, {"bytes": size, "sha256": digest.hexdigest(), "dtype": dtype.name,
                                   "vocab_size": tokenizer.vocab_size})
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return np.memmap(path, dtype=dtype, mode="r")


def split_ids(ids: np.ndarray, val_fraction: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    """Fixed split (nanoGPT): the first (1 - val_fraction) of the ids train, the rest validate."""
    if not 0.0 <= val_fraction < 1.0:
        raise LlmlabError(f"validation fraction {val_fraction} must be in [0, 1); try 0.1")
    n = int(len(ids) * (1.0 - val_fraction))
    return ids[:n], ids[n:]


# ---- batches -------------------------------------------------------------------------------
class BatchSampler:
    """Random contiguous windows of ``block_size + 1`` tokens: x is the first block_size, y the
    last block_size (x shifted by one). Starts come from a CPU torch.Generator seeded with
    ``seed`` (nanoGPT's ``torch.randint(len(data) - block_size, (batch_size,))``)."""

    def __init__(
        self,
        ids: np.ndarray,
        block_size: int,
        batch_size: int,
        seed: int,
        device: Union[str, torch.device] = "cpu",
    ) -> None:
        if block_size < 1 or batch_size < 1:
            raise LlmlabError(f"block size ({block_size}) and batch size ({batch_size}) must be at least 1")
        if len(ids) <= block_size:
            raise LlmlabError(
                f"block size {block_size} is longer than the corpus split ({len(ids)} tokens); "
                f"lower --block-size or use more data"
            )
        self.ids = ids
        self.block_size = block_size
        self.batch_size = batch_size
        self.device = torch.device(device)
        self.seed = seed
        self.generator = torch.Generator(device="cpu")
        self.generator.manual_seed(seed)
        self._offsets = np.arange(block_size + 1)

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        starts = torch.randint(len(self.ids) - self.block_size, (self.batch_size,), generator=self.generator)
        # One fancy-index gather of all windows (works on a memmap without loading it whole).
        windows = np.asarray(self.ids[starts.numpy()[:, None] + self._offsets], dtype=np.int64)
        both = torch.from_numpy(windows)
        x, y = both[:, :-1].contiguous(), both[:, 1:].contiguous()
        if self.device.type == "cuda":
            # Pinned host memory lets the copy run asynchronously with the previous step's GPU work.
            x = x.pin_memory().to(self.device, non_blocking=True)
            y = y.pin_memory().to(self.device, non_blocking=True)
        elif self.device.type != "cpu":
            x, y = x.to(self.device), y.to(self.device)
        return x, y

    def reset(self) -> None:
        """Back to the first batch of the seed (eval batches are the same at every eval)."""
        self.generator.manual_seed(self.seed)

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        try:
            self.generator.set_state(state["generator"].detach().to("cpu", torch.uint8))
        except (KeyError, AttributeError, TypeError, RuntimeError) as e:
            raise LlmlabError(
                f"cannot restore the batch sampler state ({one_line(e)}); the checkpoint is from an "
                f"incompatible version: start a fresh run"
            ) from None
