"""The one loss-over-windows evaluation: train() (its periodic evals), `llmlab eval` and the
shakespeare benchmark all measure with mean_loss(); printing is the caller's."""
from __future__ import annotations

from contextlib import nullcontext
from typing import Iterable, Iterator, Optional

import numpy as np
import torch

from llmlab.errors import LlmlabError
from llmlab.training.device import autocast_for

Batch = tuple[torch.Tensor, torch.Tensor]


@torch.no_grad()
def mean_loss(model, batches: Iterable[Batch], device: Optional[str] = None, all_reduce: bool = False) -> float:
    """Token-weighted mean next-token loss of `model` over `batches` of (x, y), in eval mode (the
    mode is restored after). `device` picks the autocast (bf16 on CUDA; None: none). all_reduce:
    each rank passes its own batches and all get the mean over every rank's tokens."""
    was_training = model.training
    model.eval()
    total, tokens = 0.0, 0
    try:
        for x, y in batches:
            with autocast_for(device) if device else nullcontext():
                total += model.loss(x, y).item() * y.numel()
            tokens += y.numel()
    finally:
        model.train(was_training)
    if all_reduce:
        import torch.distributed as dist

        both = torch.tensor([total, float(tokens)], dtype=torch.float64, device=_collective_device())
        dist.all_reduce(both)
        total, tokens = both.tolist()
    return total / tokens


def _collective_device() -> str:
    import torch.distributed as dist

    return "cuda" if dist.get_backend() == "nccl" else "cpu"  # nccl reduces CUDA tensors only


def sampled_batches(sampler, iters: int) -> Iterator[Batch]:
    """`iters` batches from a sampler restarted at its seed: every eval sees the same windows and
    never touches the training sampler's RNG."""
    sampler.reset()
    for _ in range(iters):
        yield sampler.next()


def consecutive_windows(ids: np.ndarray, block_size: int, max_tokens: Optional[int] = None, rows: int = 16,
                        device="cpu") -> tuple[int, Iterator[Batch]]:
    """(tokens, batches) of consecutive, non-overlapping block-long windows over `ids` (at most
    max_tokens predicted tokens), `rows` windows a batch: every token predicted once."""
    n = len(ids) - 1 if max_tokens is None else min(len(ids) - 1, max_tokens)
    n = n // block_size * block_size
    if n <= 0:
        raise LlmlabError(f"{len(ids)} tokens are fewer than block_size {block_size} + 1: nothing to evaluate")
    flat = torch.from_numpy(np.asarray(ids[: n + 1], dtype=np.int64)).to(device)
    x, y = flat[:-1].view(-1, block_size), flat[1:].view(-1, block_size)
    return n, ((x[i:i + rows], y[i:i + rows]) for i in range(0, x.shape[0], rows))
