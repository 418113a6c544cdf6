"""One training step (forward/backward over micro-batches, optionally as concurrent CPU batch
shards; clipping; AdamW), and the autocast/compile choices it makes. train() runs it in its loop,
benchmarks/train_speed.py times it beside a nanoGPT-equivalent step."""
from __future__ import annotations

import math
from contextlib import nullcontext
from typing import TYPE_CHECKING, Callable

import torch

from llmlab.compiled import CompiledOrEager
from llmlab.config import ModelConfig
from llmlab.errors import LlmlabError
from llmlab.model import Transformer
from llmlab.shards import BatchShards

if TYPE_CHECKING:
    from llmlab.train import TrainArgs


def use_bf16(device: str) -> bool:
    return device.startswith("cuda") and torch.cuda.is_bf16_supported()


def autocast_for(device: str):
    """bf16 autocast on CUDA, fp32 elsewhere. A fresh context per use: a context object keeps the
    state it replaced, so one shared by several threads (--batch-threads) would mix them up."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if use_bf16(device) else nullcontext()


class TrainStep:
    """One optimizer step: forward and backward over grad_accum micro-batches (each split into
    concurrent shards with --batch-threads), gradient clipping, AdamW. train() and the training
    speed benchmark run this same code. close() when done (it restores torch's thread count)."""

    def __init__(self, model: Transformer, opt: torch.optim.Optimizer, a: TrainArgs, device: str):
        self.check(a, device, model.config)
        self.model, self.opt, self.a, self.device = model, opt, a, device
        # Shards set torch to one thread a worker; the first (serial) call then compiles, so inductor
        # builds single-threaded kernels (it fixes their thread count at compile time).
        self.shards = BatchShards(model.parameters(), a.batch_threads) if a.batch_threads > 1 else None
        self.fwd = compile_loss(model, a.compile, device)

    @staticmethod
    def check(a: TrainArgs, device: str, config: ModelConfig) -> None:
        if a.batch_threads > 1 and not device.startswith("cpu"):
            raise LlmlabError(f"--batch-threads is for CPU training (one CPU thread a shard); drop it on {device}")
        if a.batch_threads > 1 and config.dropout > 0:
            raise LlmlabError(f"--batch-threads needs dropout 0 and this model has dropout {config.dropout} "
                              "(a resumed run keeps its own): dropout masks come from one global random "
                              "generator that concurrent shards would draw from in no fixed order")

    def _loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with autocast_for(self.device):
            return self.fwd(x, y)

    def __call__(self, next_batch: Callable[[], tuple[torch.Tensor, torch.Tensor]], lr: float) -> float:
        """Train on grad_accum batches from next_batch() at this lr; returns the mean loss. A
        non-finite loss leaves the weights as they were (the caller stops)."""
        for group in self.opt.param_groups:
            group["lr"] = lr
        accum = self.a.grad_accum
        loss_sum = 0.0
        for _ in range(accum):
            x, y = next_batch()
            if self.shards is not None:
                loss_sum += self.shards.backward(self._loss, x, y, scale=1.0 / accum)
            else:
                loss = self._loss(x, y) / accum
                loss.backward()
                loss_sum += loss.item()
        if math.isfinite(loss_sum):
            if self.a.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.a.grad_clip)
            self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return loss_sum

    def close(self) -> None:
        if self.shards is not None:
            self.shards.close()


def compile_loss(model: Transformer, enabled: bool, device: str = "cpu"):
    """The loss function, compiled when asked (eager if compiling fails: llmlab.compiled.CompiledOrEager).
    On CPU the graph runs through inductor's C++ wrapper: one C++ call instead of a Python function
    issuing every kernel, which matters most when shards on several threads share the GIL."""
    if not enabled:
        return model.loss
    options = {"cpp_wrapper": True} if device.startswith("cpu") else None
    return CompiledOrEager(model.loss, lambda: torch.compile(model.loss, options=options), "the training loss")
