"""The learning-rate schedule: linear warmup, then cosine decay to min_lr (nanoGPT's)."""
from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class LRSchedule:
    lr: float
    min_lr: float
    warmup_iters: int
    decay_iters: int  # the cosine reaches min_lr here and stays there

    def __call__(self, step: int) -> float:
        if step < self.warmup_iters:
            return self.lr * (step + 1) / (self.warmup_iters + 1)
        if step >= self.decay_iters:
            return self.min_lr
        progress = (step - self.warmup_iters) / max(1, self.decay_iters - self.warmup_iters)
        return self.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (self.lr - self.min_lr)


def schedule_for(a) -> LRSchedule:
    """The schedule of TrainArgs `a`: min_lr defaults to lr / 10, the cosine ends at lr_decay_iters
    (default max_iters; a run saves the value it started with, so extending it keeps the schedule)."""
    decay = a.max_iters if a.lr_decay_iters is None else a.lr_decay_iters
    return LRSchedule(a.lr, a.lr / 10 if a.min_lr is None else a.min_lr, a.warmup_iters, decay)
