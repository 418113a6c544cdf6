"""--device for sample / eval: a device this machine has, or one clear line saying which it lacks.

torch.device() accepts names this machine cannot use (mps, xla, meta, ...) and fails only later,
deep inside a model, with a traceback; so every name is checked here before anything is loaded.
"""
from __future__ import annotations

import torch

from llmlab.errors import LlmlabError

CHOICES = "auto (cuda > mps > cpu), cpu, cuda, cuda:N, mps"


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps and mps.is_available())


def resolve_device(name: str) -> str:
    """'auto' -> the best device present; any other name must be present and usable for a model."""
    name = (name or "").strip()
    if name == "auto":
        if torch.cuda.is_available():
            return "cuda"
        return "mps" if _mps_available() else "cpu"
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError, TypeError):
        raise LlmlabError(f"--device {name!r} is not a device name; use one of: {CHOICES}") from None
    if dev.type == "cpu":
        return name
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise LlmlabError(f"--device {name} asked for, but CUDA is not available; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise LlmlabError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
        return name
    if dev.type == "mps":
        if not _mps_available():
            raise LlmlabError(f"--device {name} asked for, but MPS (Apple GPU) is not available; use --device cpu")
        return name
    # meta holds no data, xla/tpu/xpu/... need backends llmlab does not set up
    raise LlmlabError(f"--device {name} is not supported for running a model; use one of: {CHOICES}")
