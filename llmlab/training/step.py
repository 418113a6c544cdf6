"""One training step (forward/backward over micro-batches, optionally as concurrent CPU batch
shards; clipping; AdamW), its small StepConfig, and the optimizer it steps. train() runs it in its
loop, benchmarks/train_speed.py times it beside a nanoGPT-equivalent step."""
from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, ContextManager, Optional

import torch

from llmlab.compiled import CompiledOrEager
from llmlab.config import ModelConfig
from llmlab.errors import LlmlabError
from llmlab.model import Transformer
from llmlab.shards import BatchShards
from llmlab.training.balance import ExpertBalance
from llmlab.training.device import autocast_for

Batch = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class StepConfig:
    grad_accum: int = 1
    grad_clip: float = 1.0  # 0: no clipping
    compile: bool = False
    batch_threads: int = 1
    device: str = "cpu"
    moe_bias_rate: float = 0.0  # gamma of MoE balancing (llmlab.training.balance)
    moe_aux_weight: float = 0.0  # alpha of the sequence-wise balance loss

    @classmethod
    def of(cls, a, device: str) -> "StepConfig":
        """The step's part of TrainArgs `a`."""
        return cls(a.grad_accum, a.grad_clip, a.compile, a.batch_threads, device, a.moe_bias_rate, a.moe_aux_weight)

    def check(self, config: ModelConfig) -> None:
        if self.batch_threads > 1 and not self.device.startswith("cpu"):
            raise LlmlabError(f"--batch-threads is for CPU training (one CPU thread a shard); drop it on {self.device}")
        if self.batch_threads > 1 and config.dropout > 0:
            raise LlmlabError(f"--batch-threads needs dropout 0 and this model has dropout {config.dropout} "
                              "(a resumed run keeps its own): dropout masks come from one global random "
                              "generator that concurrent shards would draw from in no fixed order")
        if self.batch_threads > 1 and self.moe_aux_weight > 0 and config.mlp == "moe":
            raise LlmlabError("--moe-aux-weight needs --batch-threads 1: each MoE layer keeps the balance loss of "
                              "its last forward, which concurrent shards would overwrite")


def make_optimizer(model: Transformer, weight_decay: float, betas: tuple[float, float], lr: float) -> torch.optim.AdamW:
    """AdamW over the trainable parameters (all of them; with LoRA, the adapters only: frozen ones
    get no moments). Weight decay on matrices only: not on norms, biases or the (tied) embedding tables."""
    no_decay = {id(model.tok_emb.weight)} | {id(p) for p in model.pos.parameters()}
    decay, other = [], []
    for p in (p for p in model.parameters() if p.requires_grad):
        (decay if p.dim() >= 2 and id(p) not in no_decay else other).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": other, "weight_decay": 0.0}]
    try:  # fused kernels where this torch has them for the device, else foreach
        return torch.optim.AdamW(groups, fused=True, lr=lr, betas=betas)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(groups, foreach=True, lr=lr, betas=betas)


class TrainStep:
    """One optimizer step: forward and backward over grad_accum micro-batches (each split into
    concurrent shards with batch_threads), gradient clipping, AdamW. close() when done (it restores
    torch's thread count).

    Under torch.distributed (llmlab.training.parallel) the caller passes the wrapped model's
    `loss_fn`, `sync(last)` (a context: DDP's no_sync for all but the last micro-batch) and
    `reduce` (the mean of a float over the ranks): the step then decides on the global loss, so a
    NaN on any rank skips the update on every rank alike; and `reduce_sum` (a tensor summed over the
    ranks), which sums MoE expert loads so that every rank moves its balancing biases alike."""

    def __init__(self, model: Transformer, opt: torch.optim.Optimizer, cfg: StepConfig,
                 loss_fn: Optional[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = None,
                 sync: Optional[Callable[[bool], ContextManager]] = None,
                 reduce: Optional[Callable[[float], float]] = None,
                 reduce_sum: Optional[Callable[[torch.Tensor], torch.Tensor]] = None):
        cfg.check(model.config)
        self.model, self.opt, self.cfg = model, opt, cfg
        self.sync = sync or (lambda last: nullcontext())
        self.reduce = reduce or (lambda v: v)
        # Shards set torch to one thread a worker; the first (serial) call then compiles, so inductor
        # builds single-threaded kernels (it fixes their thread count at compile time).
        self.shards = BatchShards(model.parameters(), cfg.batch_threads) if cfg.batch_threads > 1 else None
        self.fwd = loss_fn or compile_loss(model, cfg.compile, cfg.device)
        # MoE: the balancing bias update after each step, and its statistics (`stats`) for the log
        self.balance = ExpertBalance(model, cfg.moe_bias_rate, cfg.moe_aux_weight, reduce_sum)
        self.stats: dict[str, list[float]] = {}

    def _loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with autocast_for(self.cfg.device):
            return self.fwd(x, y)

    def __call__(self, next_batch: Callable[[], Batch], lr: float) -> float:
        """Train on grad_accum batches from next_batch() at this lr; returns the mean loss (over the
        ranks too). A non-finite loss leaves the weights as they were (the caller stops)."""
        for group in self.opt.param_groups:
            group["lr"] = lr
        accum = self.cfg.grad_accum
        loss_sum = 0.0
        for i in range(accum):
            x, y = next_batch()
            if self.shards is not None:
                loss_sum += self.shards.backward(self._loss, x, y, scale=1.0 / accum)
                continue
            with self.sync(i == accum - 1):
                loss = self._loss(x, y) / accum
                aux = self.balance.aux_loss()  # logged losses stay the cross-entropy
                (loss if aux is None else loss + aux / accum).backward()
            loss_sum += loss.item()
        loss_sum = self.reduce(loss_sum)
        if math.isfinite(loss_sum):
            if self.cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
            self.opt.step()
            self.stats = self.balance.step()
        else:
            self.balance.discard()
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
