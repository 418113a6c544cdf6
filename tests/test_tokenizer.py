"""Tokenizers: exact round trips (property-based), errors, save/load and fingerprints."""
from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llmlab.errors import LlmlabError
from llmlab.tokenizer import (
    EOS_TOKEN,
    BPETokenizer,
    ByteTokenizer,
    CharTokenizer,
    build_tokenizer,
    load_tokenizer,
)

from conftest import SHAKESPEARE, needs_shakespeare

# A small mixed corpus: prose, code, whitespace runs, non-Latin scripts, emoji.
MIXED = (
    "To be, or not to be, that is the question:\n"
    "def f(x):\n    return x ** 2  # square\n\n\tindent\r\n"
    "Größe straße naïve café — «quotes» ‘single’\n"
    "日本語のテキスト 中文文本 한국어 텍스트\n"
    "emoji 🤖🚀👍🏽 and flags 🇫🇷\n"
) * 40

props = settings(max_examples=100, deadline=None)


@pytest.fixture(scope="module")
def bpe() -> BPETokenizer:
    return BPETokenizer.train(MIXED, vocab_size=400)


# ---- round trips -------------------------------------------------------------------------------
@props
@given(st.text())
def test_byte_round_trip(text):
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert all(0 <= i < 256 for i in ids)
    assert tok.decode(ids) == text


@props
@given(st.text())
def test_bpe_round_trip_any_text(bpe, text):
    ids = bpe.encode(text)
    assert all(0 <= i < bpe.vocab_size for i in ids)
    assert bpe.decode(ids) == text


@pytest.mark.parametrize(
    "text",
    ["", " leading space", "trailing space ", "\x00\x01\x7f ctrl", "\r\n\r\n", "  \t  ", "🤖", "文字",
     f"a{EOS_TOKEN}b", "\ufeffbom", "e\u0301 combining", "\U0010ffff"],
)
def test_bpe_round_trip_edge_cases(bpe, text):
    assert bpe.decode(bpe.encode(text)) == text


CHAR_VOCAB = "".join(sorted(set(MIXED)))


@props
@given(st.text(alphabet=CHAR_VOCAB))
def test_char_round_trip(text):
    tok = CharTokenizer(CHAR_VOCAB)
    assert tok.decode(tok.encode(text)) == text


def test_byte_ids_are_the_utf8_bytes_every_value():
    """id = byte value for all 256 values (NUL and DEL too, which random text rarely holds):
    against Python's own UTF-8 codec."""
    tok = ByteTokenizer()
    assert tok.encode("\x00A\x7f\u00e9") == [0, 65, 127, 0xC3, 0xA9]
    for b in range(128):
        assert tok.decode([b]) == chr(b) and tok.decode([b, b]) == chr(b) * 2
    assert tok.decode(list(range(256))) == bytes(range(256)).decode("utf-8", errors="replace")


def test_byte_never_fails_on_lone_surrogate_and_partial_utf8():
    tok = ByteTokenizer()
    assert tok.decode(tok.encode("a\ud800b")) == "a?b"
    assert tok.decode(list("é".encode())[:1]) == "\ufffd"  # half a character: replaced, no crash


def test_bpe_lone_surrogate_does_not_crash(bpe):
    assert bpe.decode(bpe.encode("a\ud800b")) == "a?b"
    assert bpe.encode_batch(["x\udfff"]) == [bpe.encode("x?")]


# ---- vocabularies and errors --------------------------------------------------------------------
@needs_shakespeare
def test_char_vocab_on_tiny_shakespeare_matches_nanogpt():
    tok = CharTokenizer(SHAKESPEARE.read_text(encoding="utf-8"))
    assert tok.vocab_size == 65
    assert tok.chars[:2] == "\n " and tok.encode("A") == [13]  # nanoGPT's stoi


def test_char_rejects_unseen_characters():
    tok = CharTokenizer("abc ")
    with pytest.raises(LlmlabError) as err:
        tok.encode("a b\nc🤖")
    msg = str(err.value)
    assert "\n" not in msg and "'\\n'" in msg and "'🤖'" in msg and "byte" in msg


def test_char_empty_corpus_is_an_error():
    with pytest.raises(LlmlabError):
        CharTokenizer("")


def test_bpe_vocab_and_eos(bpe):
    assert 257 <= bpe.vocab_size <= 400
    assert bpe.eos_id is not None and bpe.decode([bpe.eos_id]) == EOS_TOKEN
    assert bpe.encode(EOS_TOKEN) == [bpe.eos_id]
    assert len(bpe.encode("To be, or not to be")) < len("To be, or not to be")  # merges learned
    with pytest.raises(LlmlabError, match="257"):
        BPETokenizer.train(MIXED, vocab_size=100)


def test_build_tokenizer_kinds(bpe):
    assert build_tokenizer("byte", MIXED).kind == "byte"
    assert build_tokenizer("char", MIXED).vocab_size == len(CHAR_VOCAB)
    small = build_tokenizer("bpe", MIXED, vocab_size=300)
    assert small.kind == "bpe" and small.vocab_size == 300
    with pytest.raises(LlmlabError) as err:
        build_tokenizer("wordpiece", MIXED)
    assert all(k in str(err.value) for k in ("byte", "char", "bpe"))


# ---- save / load / fingerprint ------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["byte", "char", "bpe"])
def test_save_load_round_trip(kind, bpe, tmp_path):
    tok = bpe if kind == "bpe" else build_tokenizer(kind, MIXED)
    tok.save(tmp_path / "run")
    loaded = load_tokenizer(tmp_path / "run")
    assert type(loaded) is type(tok)
    assert (loaded.kind, loaded.vocab_size, loaded.eos_id) == (tok.kind, tok.vocab_size, tok.eos_id)
    assert loaded.encode(MIXED) == tok.encode(MIXED)
    assert loaded.fingerprint() == tok.fingerprint()


def test_saved_formats(bpe, tmp_path):
    ByteTokenizer().save(tmp_path / "b")
    assert json.loads((tmp_path / "b/tokenizer.json").read_text()) == {"llmlab_tokenizer": "byte"}
    CharTokenizer("ba").save(tmp_path / "c")
    assert json.loads((tmp_path / "c/tokenizer.json").read_text()) == {"llmlab_tokenizer": "char", "chars": "ab"}
    bpe.save(tmp_path / "h")
    hf = json.loads((tmp_path / "h/tokenizer.json").read_text())
    assert hf["model"]["type"] == "BPE" and "llmlab_tokenizer" not in hf  # a plain HF file
    from tokenizers import Tokenizer

    assert Tokenizer.from_file(str(tmp_path / "h/tokenizer.json")).encode("hello").ids == bpe.encode("hello")


def test_load_errors_are_one_line(tmp_path):
    with pytest.raises(LlmlabError, match="not found"):
        load_tokenizer(tmp_path)
    for content in ["{not json", "[1, 2]", '{"llmlab_tokenizer": "char"}', '{"llmlab_tokenizer": "xyz"}',
                    '{"model": {"type": "Nope"}}']:
        (tmp_path / "tokenizer.json").write_text(content)
        with pytest.raises(LlmlabError) as err:
            load_tokenizer(tmp_path)
        assert "\n" not in str(err.value)


def test_fingerprints(bpe):
    prints = {
        ByteTokenizer().fingerprint(),
        CharTokenizer("abc").fingerprint(),
        CharTokenizer("abd").fingerprint(),
        bpe.fingerprint(),
        BPETokenizer.train(MIXED, vocab_size=300).fingerprint(),
    }
    assert len(prints) == 5
    assert CharTokenizer("cba").fingerprint() == CharTokenizer("abc").fingerprint()
    assert BPETokenizer.train(MIXED, vocab_size=400).fingerprint() == bpe.fingerprint()  # deterministic
    assert ByteTokenizer().fingerprint() == ByteTokenizer().fingerprint()
