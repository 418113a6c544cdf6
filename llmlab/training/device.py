"""Which device to train on, and the autocast that goes with it."""
from __future__ import annotations

from contextlib import nullcontext

import torch

from llmlab.errors import LlmlabError


def pick_device(name: str) -> str:
    """'auto' is cuda > mps > cpu; an explicit cuda without CUDA is a clear error."""
    if name != "auto":
        if name.startswith("cuda") and not torch.cuda.is_available():
            raise LlmlabError(f"--device {name} asked for, but CUDA is not available; use --device cpu")
        return name
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def use_bf16(device: str) -> bool:
    return device.startswith("cuda") and torch.cuda.is_bf16_supported()


def autocast_for(device: str):
    """bf16 autocast on CUDA, fp32 elsewhere. A fresh context per use: a context object keeps the
    state it replaced, so one shared by several threads (--batch-threads) would mix them up."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if use_bf16(device) else nullcontext()
