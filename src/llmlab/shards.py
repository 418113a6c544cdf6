"""Data parallelism across the cores of one CPU, inside one process (`--batch-threads N`).

A small model's training step is ~50 matrix multiplies of a few MFLOP and ~100 small elementwise
kernels. Splitting each of them across OpenMP threads costs a fork/join per op and idles cores in
between. Splitting the *batch* instead, one shard per thread with single-threaded kernels through
the whole forward and backward, keeps every core busy (torch.nn.DataParallel did this across GPUs;
DDP does it across processes, which on two cores loses the gain to gloo's all-reduce).

The gradient is unchanged: the batch mean is sum_s (rows_s / rows) * mean_s, and shard gradients
are added in shard order, so runs stay deterministic whatever order the threads finish in."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable

import torch

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class BatchShards:
    """Runs forward+backward of one batch as `n` concurrent shards; use as a context manager (it
    sets torch to one intra-op thread per worker and restores the count on exit)."""

    def __init__(self, params: Iterable[torch.nn.Parameter], n: int):
        if n < 2:
            raise ValueError(f"BatchShards needs at least 2 shards, got {n}")
        self.params = [p for p in params if p.requires_grad]
        self.n = n
        self._saved_threads = torch.get_num_threads()
        torch.set_num_threads(1)  # before the pool: a thread takes the count current when it starts
        self._pool = ThreadPoolExecutor(n - 1, initializer=torch.set_num_threads, initargs=(1,),
                                        thread_name_prefix="llmlab-shard")
        self._warm = False

    def backward(self, loss_fn: LossFn, x: torch.Tensor, y: torch.Tensor, scale: float = 1.0) -> float:
        """Add d(scale * loss_fn(x, y))/d(params) to each param's .grad; return that scaled loss."""
        if x.shape[0] < self.n:
            raise ValueError(f"a batch of {x.shape[0]} rows cannot be split into {self.n} shards")
        rows = x.shape[0]
        jobs = [(xs, ys, scale * xs.shape[0] / rows) for xs, ys in zip(x.tensor_split(self.n), y.tensor_split(self.n))]

        def run(xs, ys, weight):
            loss = loss_fn(xs, ys) * weight
            return loss.item(), torch.autograd.grad(loss, self.params, allow_unused=True)

        if not self._warm:  # the first call one shard at a time: torch.compile's compiler is not thread-safe
            results = [run(*job) for job in jobs]
            self._warm = True
        else:
            futures = [self._pool.submit(run, *job) for job in jobs[1:]]
            results = [run(*jobs[0])] + [f.result() for f in futures]
        total_loss = 0.0
        for loss, grads in results:  # fixed shard order: deterministic sums
            total_loss += loss
            for p, g in zip(self.params, grads):
                if g is not None:
                    p.grad = g if p.grad is None else p.grad.add_(g)
        return total_loss

    def close(self) -> None:
        self._pool.shutdown()
        torch.set_num_threads(self._saved_threads)

    def __enter__(self) -> "BatchShards":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
