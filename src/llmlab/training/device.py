"""Which device to train on, and the autocast that goes with it."""
from __future__ import annotations

from contextlib import nullcontext

import torch

from llmlab.device import resolve_device


def pick_device(name: str) -> str:
    """'auto' is cuda > mps > cpu; any other name must be a device this machine has. One resolution
    for train, sample and eval (llmlab.device): torch.device() accepts mps, meta, xla... on machines
    that cannot train on them, which would fail later with a traceback."""
    return resolve_device(name)


def use_bf16(device: str) -> bool:
    return device.startswith("cuda") and torch.cuda.is_bf16_supported()


def autocast_for(device: str):
    """bf16 autocast on CUDA, fp32 elsewhere. A fresh context per use: a context object keeps the
    state it replaced, so one shared by several threads (--batch-threads) would mix them up."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if use_bf16(device) else nullcontext()
