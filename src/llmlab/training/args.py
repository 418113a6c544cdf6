"""TrainArgs: every setting of `llmlab train`, declared once. The CLI's flags (name, type, help,
default shown, --no-X for booleans) and the TOML check are derived from these fields by
llmlab.settings; the metadata's `help` is the flag's help text."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

from llmlab.errors import LlmlabError
from llmlab.settings import check_choices, setting as _

# The ModelConfig fields a flag can set over the preset's: sizes, then the kinds of part (a name
# registered in llmlab/registry.py; an unknown one is ModelConfig's one-line error), so one change can
# be isolated from a rung (`--preset rope --norm rmsnorm`; `llmlab compare --set NAME:norm=rmsnorm`).
MODEL_FLAGS = ("n_layer", "n_head", "n_kv_head", "n_embd", "block_size", "dropout", "bias",
               "attention", "position", "norm", "mlp", "tie_embeddings", "kv_lora_rank")
PARALLEL = ("none", "ddp", "fsdp")
MAX_SAMPLE_TOKENS = 100_000  # the end-of-training sample: a glance, not a book
MAX_VOCAB = 1 << 20  # BPE training allocates per id: far past any real vocabulary (256k) is a typo
TOKENIZERS = ("byte", "char", "bpe")


_PRESET = "the preset's"


@dataclass
class TrainArgs:
    preset: str = _("flash", "rung of the ladder (see `llmlab presets`)", metavar="NAME")
    data: Optional[str] = _(None, "text file, directory of text files, or 'shakespeare'", none="built-in corpus",
                            metavar="PATH")
    tokenizer: str = _("byte", "tokenizer to build", choices=TOKENIZERS)
    vocab_size: int = _(1024, "BPE vocabulary size (bpe only)")
    n_layer: Optional[int] = _(None, "transformer blocks", none=_PRESET)
    n_head: Optional[int] = _(None, "attention heads", none=_PRESET)
    n_kv_head: Optional[int] = _(None, "key/value heads (grouped-query attention)", none=_PRESET)
    n_embd: Optional[int] = _(None, "embedding width", none=_PRESET)
    block_size: Optional[int] = _(None, "context length in tokens", none=_PRESET)
    dropout: Optional[float] = _(None, "dropout probability", none=_PRESET)
    bias: Optional[bool] = _(None, "biases in linear layers and norms", none=_PRESET)
    attention: Optional[str] = _(None, "attention kind: mha (MHA, or GQA/MQA with --n-kv-head) or mla (latent)",
                                 none=_PRESET, metavar="KIND")
    position: Optional[str] = _(None, "position kind: learned, sinusoidal, rope or none", none=_PRESET, metavar="KIND")
    norm: Optional[str] = _(None, "norm kind: layernorm or rmsnorm", none=_PRESET, metavar="KIND")
    mlp: Optional[str] = _(None, "MLP kind, e.g. gelu or swiglu", none=_PRESET, metavar="KIND")
    tie_embeddings: Optional[bool] = _(None, "output head tied to the token embedding", none=_PRESET)
    kv_lora_rank: Optional[int] = _(None, "MLA only: latent width d_c each token's keys and values come from",
                                    none="4 x head size")
    batch_size: int = _(16, "sequences per rank and micro-batch: global batch = batch size x grad accum x ranks")
    grad_accum: int = _(1, "micro-batches accumulated per optimizer step")
    max_iters: int = _(600, "optimizer steps to train to")
    lr: float = _(2e-3, "peak learning rate")
    min_lr: Optional[float] = _(None, "learning rate at the end of the cosine and after it", none="lr / 10")
    warmup_iters: int = _(50, "steps of linear warmup")
    # saved with the run, so extending it later keeps this schedule
    lr_decay_iters: Optional[int] = _(None, "step where the cosine decay ends (then min lr)", none="max iters")
    weight_decay: float = _(0.1, "AdamW weight decay (not on norms, biases, embeddings)")
    beta1: float = _(0.9, "AdamW beta1, in [0, 1)")
    beta2: float = _(0.99, "AdamW beta2, in [0, 1)")
    grad_clip: float = _(1.0, "clip the gradient norm to this (0: no clipping)")
    eval_interval: int = _(100, "steps between evals and checkpoints")
    eval_iters: int = _(20, "batches per eval")
    out: Optional[str] = _(None, "run directory", none="a new runs/PRESET-DATE-TIME", metavar="DIR")
    device: str = _("auto", "auto (cuda > mps > cpu), cpu, cuda, cuda:N or mps", metavar="NAME")
    compile: bool = _(False, "torch.compile the model")
    batch_threads: int = _(1, "CPU: train each batch as N shards on N threads, one core each (same gradients; "
                              "faster than N threads inside every op for small models; needs dropout 0)")
    parallel: str = _("none", "torch.distributed data parallelism over the ranks torchrun starts",
                      choices=PARALLEL)
    activation_checkpointing: bool = _(False, "with --parallel: recompute each block in backward (less memory)")
    moe_bias_rate: float = _(0.001, "MoE: gamma, how far each expert's selection bias moves toward equal load "
                                    "every step (DeepSeek-V3 auxiliary-loss-free balancing; 0: off)")
    moe_aux_weight: float = _(0.0, "MoE: alpha, weight of the sequence-wise balance loss (0: off)")
    # fine-tuning (llmlab.training.source, llmlab.lora)
    init_from: Optional[str] = _(None, "start a new run from these weights: a run directory, a checkpoint folder or a "
                                       "Hugging Face model folder (model and tokenizer come from it)",
                                 none="fresh weights", metavar="SRC")
    lora_rank: Optional[int] = _(None, "with --init-from: train LoRA adapters of this rank only, the weights frozen",
                                 none="full fine-tuning")
    lora_alpha: Optional[float] = _(None, "LoRA alpha: adapters scaled by alpha / rank", none="2 x rank")
    lora_targets: str = _("attention", "linear layers LoRA adapts: attention, all-linear (inside the blocks: "
                                       "attention and MLPs) or comma-separated names (e.g. attn.qkv,mlp.fc)",
                          metavar="WHICH")
    resume: bool = _(False, "continue the run in --out from its last checkpoint")
    seed: int = _(1337, "random seed (weights, data order, dropout)")
    sample_tokens: int = _(200, "tokens of sample text printed at the end (0: none)")
    quiet: bool = _(False, "no progress bar or log lines")

    def validate(self) -> None:
        """Ranges the types alone do not give; the same checks for flags, TOML files and Python."""
        check_choices(self)
        checks = [(self.lr > 0 and math.isfinite(self.lr), f"--lr must be a finite number > 0, got {self.lr}"),
                  (0 <= self.seed < 2**63, f"--seed must be in [0, 2^63), got {self.seed}"),
                  (1 <= self.vocab_size <= MAX_VOCAB, f"--vocab-size must be in [1, {MAX_VOCAB:,}], got {self.vocab_size}"),
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
                  (self.min_lr is None or (self.min_lr >= 0 and math.isfinite(self.min_lr)),
                   f"--min-lr must be a finite number >= 0, got {self.min_lr}"),
                  # the cosine would climb from lr to min_lr: a typo, not a schedule
                  (self.min_lr is None or self.min_lr <= self.lr,
                   f"--min-lr {self.min_lr} is above --lr {self.lr}; it must be <= it"),
                  (0 <= self.beta1 < 1, f"--beta1 must be in [0, 1), got {self.beta1}"),
                  (0 <= self.beta2 < 1, f"--beta2 must be in [0, 1), got {self.beta2}"),
                  (self.weight_decay >= 0 and math.isfinite(self.weight_decay),
                   f"--weight-decay must be a finite number >= 0, got {self.weight_decay}"),
                  # NaN compares false with everything, so `>= 0` refuses it too
                  (self.grad_clip >= 0 and math.isfinite(self.grad_clip),
                   f"--grad-clip must be a finite number >= 0 (0: no clipping), got {self.grad_clip}"),
                  (self.moe_bias_rate >= 0 and math.isfinite(self.moe_bias_rate),
                   f"--moe-bias-rate must be a finite number >= 0 (0: off), got {self.moe_bias_rate}"),
                  (self.moe_aux_weight >= 0 and math.isfinite(self.moe_aux_weight),
                   f"--moe-aux-weight must be a finite number >= 0 (0: off), got {self.moe_aux_weight}"),
                  (0 <= self.sample_tokens <= MAX_SAMPLE_TOKENS,
                   f"--sample-tokens must be in [0, {MAX_SAMPLE_TOKENS:,}] (0: none; `llmlab sample` writes more), "
                   f"got {self.sample_tokens}"),
                  (self.out is None or str(self.out).strip() != "", "--out is empty; pass a run directory"),
                  (self.parallel in PARALLEL, f"--parallel must be one of {', '.join(PARALLEL)}, got {self.parallel}"),
                  # shards add their gradients straight into .grad, past the hooks DDP and FSDP sync with
                  (self.batch_threads == 1 or self.parallel == "none",
                   f"--batch-threads {self.batch_threads} cannot be combined with --parallel {self.parallel}: "
                   "use one or the other"),
                  (not self.activation_checkpointing or self.parallel != "none",
                   "--activation-checkpointing needs --parallel ddp or fsdp"),
                  (self.init_from is None or str(self.init_from).strip() != "",
                   "--init-from is empty; pass the run, checkpoint or Hugging Face folder to start from"),
                  (self.lora_rank is None or self.lora_rank >= 1, f"--lora-rank must be >= 1, got {self.lora_rank}"),
                  (self.lora_alpha is None or (self.lora_alpha > 0 and math.isfinite(self.lora_alpha)),
                   f"--lora-alpha must be a finite number > 0, got {self.lora_alpha}")]
        for ok, msg in checks:
            if not ok:
                raise LlmlabError(msg)

    def model_overrides(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in MODEL_FLAGS if getattr(self, k) is not None}
