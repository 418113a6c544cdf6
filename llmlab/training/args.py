"""TrainArgs: every setting of `llmlab train` (the CLI's flags and TOML keys, one field each)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from llmlab.errors import LlmlabError

MODEL_FLAGS = ("n_layer", "n_head", "n_kv_head", "n_embd", "block_size", "dropout", "bias")
PARALLEL = ("none", "ddp", "fsdp")


@dataclass
class TrainArgs:
    preset: str = "flash"
    data: Optional[str] = None  # None: the embedded stdlib corpus
    tokenizer: str = "byte"
    vocab_size: int = 1024  # bpe only
    n_layer: Optional[int] = None  # None: the preset's size
    n_head: Optional[int] = None
    n_kv_head: Optional[int] = None
    n_embd: Optional[int] = None
    block_size: Optional[int] = None
    dropout: Optional[float] = None
    bias: Optional[bool] = None
    batch_size: int = 16  # per rank and micro-batch: global batch = batch_size * grad_accum * world size
    grad_accum: int = 1
    max_iters: int = 600
    lr: float = 2e-3
    min_lr: Optional[float] = None  # None: lr / 10
    warmup_iters: int = 50
    lr_decay_iters: Optional[int] = None  # the cosine ends here, then min_lr; None: max_iters (saved with the run)
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0
    eval_interval: int = 100
    eval_iters: int = 20
    out: Optional[str] = None  # None: runs/<preset>-<date>-<time>, a new directory each run
    device: str = "auto"
    compile: bool = False
    batch_threads: int = 1  # CPU: >1 splits each batch into that many shards run on their own threads
    parallel: str = "none"  # none | ddp | fsdp (torch.distributed; start the ranks with torchrun)
    activation_checkpointing: bool = False  # --parallel only: recompute each block in backward
    resume: bool = False
    seed: int = 1337
    sample_tokens: int = 200  # printed at the end (0: none)
    quiet: bool = False

    def validate(self) -> None:
        checks = [(self.lr > 0, f"--lr must be positive, got {self.lr}"),
                  (self.max_iters >= 0, f"--max-iters must be >= 0, got {self.max_iters}"),
                  (self.batch_size > 0, f"--batch-size must be positive, got {self.batch_size}"),
                  (self.grad_accum > 0, f"--grad-accum must be positive, got {self.grad_accum}"),
                  (self.eval_interval > 0, f"--eval-interval must be positive, got {self.eval_interval}"),
                  (self.eval_iters > 0, f"--eval-iters must be positive, got {self.eval_iters}"),
                  (self.warmup_iters >= 0, f"--warmup-iters must be >= 0, got {self.warmup_iters}"),
                  (self.batch_threads >= 1, f"--batch-threads must be >= 1, got {self.batch_threads}"),
                  (self.batch_threads <= self.batch_size,
                   f"--batch-threads {self.batch_threads} needs --batch-size >= {self.batch_threads} (one row a shard)"),
                  (self.lr_decay_iters is None or self.lr_decay_iters >= 1,
                   f"--lr-decay-iters must be >= 1, got {self.lr_decay_iters}"),
                  (self.min_lr is None or self.min_lr >= 0, f"--min-lr must be >= 0, got {self.min_lr}"),
                  (self.parallel in PARALLEL, f"--parallel must be one of {', '.join(PARALLEL)}, got {self.parallel}"),
                  # shards add their gradients straight into .grad, past the hooks DDP and FSDP sync with
                  (self.batch_threads == 1 or self.parallel == "none",
                   f"--batch-threads {self.batch_threads} cannot be combined with --parallel {self.parallel}: "
                   "use one or the other"),
                  (not self.activation_checkpointing or self.parallel != "none",
                   "--activation-checkpointing needs --parallel ddp or fsdp")]
        for ok, msg in checks:
            if not ok:
                raise LlmlabError(msg)

    def model_overrides(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in MODEL_FLAGS if getattr(self, k) is not None}
