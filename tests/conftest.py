"""Shared fixtures: tiny configs, the shared tiny-Shakespeare path, an isolated token cache."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
# Only tests about tiny Shakespeare itself need it; every other test uses the built-in corpus.
SHAKESPEARE = Path(os.environ.get("LLMLAB_SHAKESPEARE") or REPO.parent / "shared" / "data" / "tinyshakespeare.txt")
SHAKESPEARE_SKIP = (f"tiny Shakespeare not found at {SHAKESPEARE}; set LLMLAB_SHAKESPEARE=/path/to/input.txt "
                    "(karpathy/char-rnn tinyshakespeare) to run this test")
needs_shakespeare = pytest.mark.skipif(not SHAKESPEARE.is_file(), reason=SHAKESPEARE_SKIP)


@pytest.fixture(autouse=True)
def isolated_cache(monkeypatch, tmp_path_factory):
    """Token caches and downloads go to a per-session temp dir, never ~/.cache."""
    monkeypatch.setenv("LLMLAB_CACHE", str(tmp_path_factory.getbasetemp() / "llmlab-cache"))


@pytest.fixture
def shakespeare() -> Path:
    if not SHAKESPEARE.is_file():
        pytest.skip(SHAKESPEARE_SKIP)
    return SHAKESPEARE


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory) -> Path:
    """A small ASCII text file cut from the built-in corpus (always available, no network)."""
    from llmlab.data import stdlib_corpus_text

    path = tmp_path_factory.mktemp("corpus") / "stdlib.txt"
    path.write_text(stdlib_corpus_text(max_chars=150_000).encode("ascii", "ignore").decode("ascii")[:150_000])
    return path


TINY_SIZES = dict(vocab_size=97, block_size=32, n_layer=2, n_head=4, n_embd=32)


def tiny(**kw):
    """A tiny ModelConfig of any preset (fp32, CPU-fast)."""
    from llmlab.presets import preset_config

    return preset_config(kw.pop("preset", "flash"), **(TINY_SIZES | kw))


def tiny_model(**kw):
    """presets.preset_model at tiny sizes: it runs with its preset's runtime (basic: manual attention
    and no cache, flash_mla: the paged kernel...), as the preset's own runs do."""
    from llmlab.presets import preset_model

    return preset_model(kw.pop("preset", "flash"), **(TINY_SIZES | kw))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _fixed_threads(monkeypatch):
    """The CLI picks torch's thread count from the cores free at its start (llmlab.threads); tests
    that run it in-process keep this process's count, so results never depend on the load."""
    monkeypatch.setenv("OMP_NUM_THREADS", str(torch.get_num_threads()))
