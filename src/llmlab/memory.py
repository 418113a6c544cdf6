"""Memory guards: refuse, in one line and before allocating, what cannot fit (an out-of-memory kill
or an allocation traceback is the alternative). Sizes come from the model's own parts:

* parameters: counted on a build on the meta device (no memory), exact for every kind of part;
* cache: each attention kind states what it keeps per token and layer (`cache_spec`);
* training activations: an estimate (see `activation_bytes`), enough to catch a typo'd batch size.
Free memory is MemAvailable (host RAM); on a GPU the guards are skipped (torch's own error is clear).
"""
from __future__ import annotations

import os
from typing import Optional

import torch

from llmlab.config import ModelConfig
from llmlab.errors import LlmlabError


def free_memory_bytes() -> Optional[int]:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def count_params(config: ModelConfig) -> int:
    """The model's parameter count (a tied head once), from a build on the meta device."""
    from llmlab.model import Transformer

    with torch.device("meta"):
        return Transformer(config).num_params()


def param_bytes(config: ModelConfig, element_size: int = 4) -> int:
    return element_size * count_params(config)


def cache_bytes(config: ModelConfig, batch: int, max_len: int, element_size: int = 4) -> int:
    """Bytes of an inference cache for `batch` rows of `max_len` tokens, from what the config's
    attention kind keeps per token and layer (MLA's latent, GQA's shared heads, ...)."""
    from llmlab.model.cache import values_per_token
    from llmlab.registry import lookup

    per_token = values_per_token(lookup("attention", config.attention).cache_spec(config))
    return config.n_layer * per_token * batch * max_len * element_size


def activation_bytes(config: ModelConfig, rows: int) -> int:
    """fp32 bytes a training micro-batch of `rows` x block_size keeps for backward: per layer the
    usual ~18 C-wide tensors per token plus the attention scores (n_head x T per token), and the
    logits with their softmax and gradient (3 V per token). An estimate, not an exact count."""
    t, c = config.block_size, config.n_embd
    per_token = config.n_layer * (18 * c + 2 * config.n_head * t) + 3 * config.vocab_size
    return 4 * rows * t * per_token


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB"


def check_fits(need: int, what: str, advice: str, device: str = "cpu") -> None:
    """Refuse `need` bytes for `what` when they exceed the free host memory."""
    free = free_memory_bytes() if str(device).startswith("cpu") else None
    if free is not None and need > free:
        raise LlmlabError(f"{what} needs about {_gib(need)} but only {_gib(free)} of memory is free; {advice}")
