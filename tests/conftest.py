"""Shared fixtures: tiny configs, the shared tiny-Shakespeare path, an isolated token cache."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHAKESPEARE = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"
needs_shakespeare = pytest.mark.skipif(not SHAKESPEARE.is_file(),
                                       reason=f"tiny Shakespeare not found at {SHAKESPEARE} (shared data beside the repo)")


@pytest.fixture(autouse=True)
def isolated_cache(monkeypatch, tmp_path_factory):
    """Token caches and downloads go to a per-session temp dir, never ~/.cache."""
    monkeypatch.setenv("LLMLAB_CACHE", str(tmp_path_factory.getbasetemp() / "llmlab-cache"))


@pytest.fixture
def shakespeare() -> Path:
    if not SHAKESPEARE.is_file():
        pytest.skip(f"tiny Shakespeare not found at {SHAKESPEARE} (the shared data folder beside the repo)")
    return SHAKESPEARE


def tiny(**kw):
    """A tiny ModelConfig of any preset (fp32, CPU-fast)."""
    from llmlab.presets import preset_config

    name = kw.pop("preset", "flash")
    sizes = dict(vocab_size=97, block_size=32, n_layer=2, n_head=4, n_embd=32)
    sizes.update(kw)
    return preset_config(name, **sizes)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _fixed_threads(monkeypatch):
    """The CLI picks torch's thread count from the cores free at its start (llmlab.threads); tests
    that run it in-process keep this process's count, so results never depend on the load."""
    monkeypatch.setenv("OMP_NUM_THREADS", str(torch.get_num_threads()))
