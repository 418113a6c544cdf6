"""Corpora, encoded-corpus caching, splits and the batch sampler."""
from __future__ import annotations

import hashlib
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from llmlab import data
from llmlab.data import (
    SHAKESPEARE_SHA256,
    BatchSampler,
    cache_dir,
    encode_corpus,
    load_text,
    split_ids,
    stdlib_corpus_text,
)
from llmlab.errors import LlmlabError
from llmlab.tokenizer import BPETokenizer, ByteTokenizer, CharTokenizer

from conftest import SHAKESPEARE, needs_shakespeare


@pytest.fixture(autouse=True)
def no_network(monkeypatch, tmp_path):
    """No test may touch the network or the real ~/.cache: downloads fail, the cache is tmp."""

    def offline(*args, **kwargs):
        raise urllib.error.URLError("network disabled in tests")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    monkeypatch.setenv("LLMLAB_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def stdlib_text() -> str:
    return stdlib_corpus_text()


# ---- corpora -----------------------------------------------------------------------------------
def test_stdlib_corpus_deterministic_and_nontrivial(stdlib_text):
    assert stdlib_corpus_text() == stdlib_text
    assert 500_000 < len(stdlib_text) < 2_000_000 + 500_000
    headers = [line[len("# file: "):] for line in stdlib_text.splitlines() if line.startswith("# file: ")]
    assert headers[0].endswith(".py") and headers == sorted(headers)
    assert load_text(None) == ("stdlib", stdlib_text) == load_text("stdlib")


def test_stdlib_cap_stops_at_a_file_boundary():
    text = stdlib_corpus_text(max_chars=1)
    assert text.startswith("# file: ") and text.count("\n# file: ") == 0  # exactly one whole file


def test_load_file_and_directory(tmp_path):
    (tmp_path / "one.txt").write_text("hello\n")
    assert load_text(str(tmp_path / "one.txt")) == ("one.txt", "hello\n")
    corpus = tmp_path / "corpus"
    (corpus / "b").mkdir(parents=True)
    (corpus / "b" / "z.txt").write_text("third")  # no trailing newline: one is added
    (corpus / "a.txt").write_text("first\n")
    (corpus / "b" / "a.md").write_text("second\n")
    (corpus / "c.bin").write_bytes(b"\x00\x01binary")  # NUL bytes: skipped
    (corpus / "d.txt").write_bytes("caf\xe9 ok\n".encode("latin-1"))  # invalid UTF-8: replaced
    name, text = load_text(str(corpus))
    assert name == "corpus"
    assert text == "first\nsecond\nthird\ncaf\ufffd ok\n"


def test_missing_and_empty_data_errors(tmp_path):
    with pytest.raises(LlmlabError) as err:
        load_text(str(tmp_path / "nope.txt"))
    assert str(err.value).startswith("data file not found: ") and "shakespeare" in str(err.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(LlmlabError):
        load_text(str(tmp_path / "empty"))


def test_cache_dir_env(monkeypatch, tmp_path):
    assert cache_dir() == tmp_path / "cache"
    monkeypatch.delenv("LLMLAB_CACHE")
    assert cache_dir() == Path.home() / ".cache" / "llmlab"


def test_shakespeare_offline_error_mentions_data_flag():
    with pytest.raises(LlmlabError) as err:
        load_text("shakespeare")
    msg = str(err.value)
    assert "could not download tiny Shakespeare" in msg and "--data" in msg and "\n" not in msg


def test_shakespeare_bad_cached_copy_is_not_trusted():
    cached = cache_dir() / data.SHAKESPEARE_FILE
    cached.parent.mkdir(parents=True)
    cached.write_text("not shakespeare")
    with pytest.raises(LlmlabError, match="--data"):  # re-downloads (offline here) instead of using it
        load_text("shakespeare")


def test_shakespeare_checksum_mismatch_is_not_cached(monkeypatch):
    class Resp:
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def read(self):
            return b"tampered"

    monkeypatch.setattr(urllib.request, "urlopen", lambda *a, **k: Resp())
    with pytest.raises(LlmlabError, match="sha256"):
        load_text("shakespeare")
    assert not (cache_dir() / data.SHAKESPEARE_FILE).exists()


@needs_shakespeare
def test_shakespeare_loads_from_cache():
    raw = SHAKESPEARE.read_bytes()
    assert hashlib.sha256(raw).hexdigest() == SHAKESPEARE_SHA256
    cached = cache_dir() / data.SHAKESPEARE_FILE
    cached.parent.mkdir(parents=True)
    cached.write_bytes(raw)
    name, text = load_text("shakespeare")  # urlopen would raise: it must not be called
    assert name == "shakespeare" and text == raw.decode("utf-8") and text.startswith("First Citizen:")


# ---- encoding + caching -------------------------------------------------------------------------
class Counting:
    """Wraps a tokenizer, counting encode / encode_batch calls."""

    def __init__(self, inner):
        self.inner, self.calls = inner, 0
        self.vocab_size, self.fingerprint = inner.vocab_size, inner.fingerprint

    def encode(self, text):
        self.calls += 1
        return self.inner.encode(text)

    def encode_batch(self, texts):
        self.calls += 1
        return self.inner.encode_batch(texts)


@pytest.mark.parametrize("kind", ["byte", "char"])
def test_encode_corpus_caches(kind, stdlib_text, tmp_path):
    text = stdlib_text[:300_000]
    tok = Counting(ByteTokenizer() if kind == "byte" else CharTokenizer(text))
    first = encode_corpus(text, tok, cache=tmp_path / "tok")
    assert tok.calls > 0 and first.dtype == np.uint16 and isinstance(first, np.memmap)
    assert first.tolist() == tok.inner.encode(text)
    calls = tok.calls
    second = encode_corpus(text, tok, cache=tmp_path / "tok")
    assert tok.calls == calls  # served from the cache: no encoding at all
    assert isinstance(second, np.memmap) and np.array_equal(first, second)
    # the ids and their record (size + sha256); no temp files left behind
    assert sorted(p.suffix for p in (tmp_path / "tok").iterdir()) == [".json", ".uint16"]


def test_encode_corpus_default_cache_and_key(tmp_path):
    tok = CharTokenizer("abc\n")
    ids = encode_corpus("abc\ncab\n", tok)
    assert tok.decode(ids.tolist()) == "abc\ncab\n"
    assert list((cache_dir() / "tokens").iterdir())  # default location under $LLMLAB_CACHE
    encode_corpus("abc\ncab\n", CharTokenizer("abcd\n"))  # another tokenizer: another key
    encode_corpus("abc\ncab\nabc\n", tok)  # another text: another key
    assert len(list((cache_dir() / "tokens").glob("*.uint16"))) == 3
    assert len(encode_corpus("", tok)) == 0


def test_encode_corpus_failure_leaves_no_files(tmp_path):
    with pytest.raises(LlmlabError):
        encode_corpus("abc xyz", CharTokenizer("abc"), cache=tmp_path)
    assert list(tmp_path.iterdir()) == []


def _damage(kind: str, path: Path, vocab: int) -> None:
    ids = np.fromfile(path, dtype=np.uint16)
    if kind == "truncated":  # e.g. a disk-full or a copy cut short
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif kind == "other ids":  # valid ids of another text: same size, wrong corpus
        np.roll(ids, 7).tofile(path)
    else:  # "past vocab": would index past the embedding table
        ids[3] = vocab + 5
        ids.tofile(path)


@pytest.mark.parametrize("kind", ["truncated", "other ids", "past vocab"])
def test_damaged_token_cache_is_rebuilt(kind, tmp_path):
    text = "the quick brown fox\njumps over the lazy dog\n" * 40
    tok = Counting(CharTokenizer(text))
    want = encode_corpus(text, tok, cache=tmp_path).tolist()
    [path] = tmp_path.glob("*.uint16")
    _damage(kind, path, tok.vocab_size)
    calls = tok.calls
    got = encode_corpus(text, tok, cache=tmp_path)
    assert tok.calls > calls  # not trusted: encoded again
    assert got.tolist() == want == tok.inner.encode(text)


def test_token_cache_without_its_record_is_rebuilt(tmp_path):
    text = "abc\ncab\n" * 10
    tok = Counting(CharTokenizer(text))
    encode_corpus(text, tok, cache=tmp_path)
    [record] = tmp_path.glob("*.json")
    record.unlink()  # e.g. a cache written by an older llmlab, or a crash between the two writes
    calls = tok.calls
    assert encode_corpus(text, tok, cache=tmp_path).tolist() == tok.inner.encode(text)
    assert tok.calls > calls and record.is_file()


@pytest.mark.parametrize("vocab", [50_000, 70_000])
def test_token_cache_keeps_ids_of_large_vocabularies(vocab, tmp_path):
    """Ids past 32767 (and past 65535 for a vocabulary larger than 2^16) come back exactly, from
    the first encode and from the cache: the ids' dtype must hold every id of the vocabulary."""

    class Wide:  # a stand-in tokenizer whose ids span the top of a large vocabulary
        vocab_size = vocab

        def encode(self, text):
            return [vocab - 1 - 7 * b for b in text.encode("ascii")]

        def fingerprint(self):
            return f"wide{vocab}"

    text = "\x00" + "".join(map(chr, range(32, 127))) * 3
    want = Wide().encode(text)
    assert max(want) == vocab - 1 and min(want) > 32767
    assert encode_corpus(text, Wide(), cache=tmp_path).tolist() == want
    assert encode_corpus(text, Wide(), cache=tmp_path).tolist() == want  # served from the cache


@pytest.fixture(scope="module")
def code_bpe(stdlib_text) -> BPETokenizer:
    return BPETokenizer.train(stdlib_text[:200_000], vocab_size=512)


def test_encode_corpus_bpe_equals_whole_text_encode(code_bpe, stdlib_text, tmp_path, monkeypatch):
    monkeypatch.setattr(data, "_CHUNK_CHARS", 2_000)  # many chunk boundaries
    monkeypatch.setattr(data, "_CHUNKS_PER_BATCH", 7)
    text = stdlib_text[:150_000]
    assert len(list(data._chunks(text, 2_000))) > 20
    ids = encode_corpus(text, code_bpe, cache=tmp_path)
    assert ids.tolist() == code_bpe.encode(text)
    assert code_bpe.decode(ids.tolist()) == text


@settings(max_examples=60, deadline=None)
@given(st.lists(st.text(alphabet=" \t\r\nab(é🤖", max_size=8), max_size=30), st.integers(1, 20))
def test_chunking_is_token_neutral(code_bpe, lines, size):
    text = "\n".join(lines)
    chunks = list(data._chunks(text, size))
    assert "".join(chunks) == text
    assert sum(code_bpe.encode_batch(chunks), []) == code_bpe.encode(text)


def test_split_ids():
    ids = np.arange(1000)
    train, val = split_ids(ids)
    assert len(train) == 900 and len(val) == 100 and train[-1] + 1 == val[0]
    with pytest.raises(LlmlabError):
        split_ids(ids, 1.0)


# ---- batch sampler ------------------------------------------------------------------------------
IDS = (np.arange(5000) % 251).astype(np.uint16)


def test_batches_shift_and_shape():
    x, y = BatchSampler(IDS, block_size=16, batch_size=8, seed=0).next()
    assert x.shape == y.shape == (8, 16) and x.dtype == y.dtype == torch.long
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert torch.equal((x + 1) % 251, y)  # y is the token after each x in the corpus


def test_batches_match_nanogpt_recipe():
    block, batch = 8, 4
    x, y = BatchSampler(IDS, block, batch, seed=123).next()
    g = torch.Generator().manual_seed(123)
    ix = torch.randint(len(IDS) - block, (batch,), generator=g)
    data_t = torch.from_numpy(IDS.astype(np.int64))
    assert torch.equal(x, torch.stack([data_t[i : i + block] for i in ix]))
    assert torch.equal(y, torch.stack([data_t[i + 1 : i + 1 + block] for i in ix]))


def test_same_seed_same_batches_and_resume():
    a, b = BatchSampler(IDS, 16, 4, seed=7), BatchSampler(IDS, 16, 4, seed=7)
    for _ in range(3):
        assert all(torch.equal(p, q) for p, q in zip(a.next(), b.next()))
    assert not torch.equal(BatchSampler(IDS, 16, 4, seed=8).next()[0], BatchSampler(IDS, 16, 4, seed=7).next()[0])

    state = a.state_dict()
    assert state["generator"].dtype == torch.uint8
    expected = [a.next() for _ in range(3)]
    resumed = BatchSampler(IDS, 16, 4, seed=999)
    resumed.load_state_dict(state)
    for x, y in expected:
        rx, ry = resumed.next()
        assert torch.equal(rx, x) and torch.equal(ry, y)


def test_state_dict_survives_the_checkpoint_format(tmp_path):
    """The sampler state travels in train_state.safetensors (never pickled): it must round-trip."""
    from safetensors.torch import load_file, save_file

    s = BatchSampler(IDS, 16, 4, seed=1)
    s.next()
    save_file(s.state_dict(), str(tmp_path / "state.safetensors"))
    want = s.next()
    r = BatchSampler(IDS, 16, 4, seed=2)
    r.load_state_dict(load_file(str(tmp_path / "state.safetensors")))
    assert torch.equal(r.next()[0], want[0])
    with pytest.raises(LlmlabError):
        r.load_state_dict({})


def test_sampler_on_memmap_and_edge_lengths(tmp_path):
    ids = encode_corpus("hello world\n" * 50, ByteTokenizer(), cache=tmp_path)
    x, y = BatchSampler(ids, block_size=len(ids) - 1, batch_size=3, seed=0).next()  # only start 0
    assert x[0].tolist() == ids[:-1].tolist() and y[0].tolist() == ids[1:].tolist()
    with pytest.raises(LlmlabError) as err:
        BatchSampler(ids, block_size=len(ids), batch_size=3, seed=0)
    assert str(err.value) == (
        f"block size {len(ids)} is longer than the corpus split ({len(ids)} tokens); "
        f"lower --block-size or use more data"
    )
