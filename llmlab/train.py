"""Training: AdamW, warmup + cosine LR, grad accumulation and clipping, periodic eval, atomic
checkpoints (last + best-val) and exact resume (model, optimizer, data-sampler RNG and dropout RNG
are all saved, so a resumed run's losses equal an uninterrupted run's, even after SIGKILL)."""
from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from tqdm import tqdm

from llmlab import checkpoint as ckpt
from llmlab.data import BatchSampler, encode_corpus, load_text, split_ids
from llmlab.errors import LlmlabError
from llmlab.model import Transformer
from llmlab.presets import preset_config
from llmlab.step import TrainStep, autocast_for, use_bf16
from llmlab.tokenizer import build_tokenizer, load_tokenizer

MODEL_FLAGS = ("n_layer", "n_head", "n_kv_head", "n_embd", "block_size", "dropout", "bias")


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
    batch_size: int = 16
    grad_accum: int = 1
    max_iters: int = 600
    lr: float = 2e-3
    min_lr: Optional[float] = None  # None: lr / 10
    warmup_iters: int = 50
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
                  (self.min_lr is None or self.min_lr >= 0, f"--min-lr must be >= 0, got {self.min_lr}")]
        for ok, msg in checks:
            if not ok:
                raise LlmlabError(msg)

    def model_overrides(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in MODEL_FLAGS if getattr(self, k) is not None}


def pick_device(name: str) -> str:
    if name != "auto":
        if name.startswith("cuda") and not torch.cuda.is_available():
            raise LlmlabError(f"--device {name} asked for, but CUDA is not available; use --device cpu")
        return name
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def lr_at(step: int, a: TrainArgs) -> float:
    """Linear warmup to lr, then cosine decay to min_lr at max_iters."""
    min_lr = a.lr / 10 if a.min_lr is None else a.min_lr
    if step < a.warmup_iters:
        return a.lr * (step + 1) / (a.warmup_iters + 1)
    if step >= a.max_iters:
        return min_lr
    progress = (step - a.warmup_iters) / max(1, a.max_iters - a.warmup_iters)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (a.lr - min_lr)


def make_optimizer(model: Transformer, a: TrainArgs, device: str) -> torch.optim.AdamW:
    """Weight decay on matrices only: not on norms, biases or the (tied) embedding tables."""
    no_decay = {id(model.tok_emb.weight)} | {id(p) for p in model.pos.parameters()}
    decay, other = [], []
    for p in model.parameters():
        (decay if p.dim() >= 2 and id(p) not in no_decay else other).append(p)
    groups = [{"params": decay, "weight_decay": a.weight_decay}, {"params": other, "weight_decay": 0.0}]
    kwargs = dict(lr=a.lr, betas=(a.beta1, a.beta2))
    try:  # fused kernels where this torch has them for the device, else foreach
        return torch.optim.AdamW(groups, fused=True, **kwargs)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(groups, foreach=True, **kwargs)


class MetricsLog:
    """metrics.jsonl: one JSON object a line ({step, loss, lr, tokens_per_s} or {step, val_loss, ...})."""

    def __init__(self, path: Path, keep_until: Optional[int]):
        self.path = path
        if keep_until is not None and path.exists():  # resume: drop lines the crashed run wrote late
            kept = [ln for ln in path.read_text().splitlines() if ln.strip() and self._keep(ln, keep_until)]
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text("".join(ln + "\n" for ln in kept))
            tmp.replace(path)
        elif keep_until is None:
            path.write_text("")

    @staticmethod
    def _keep(line: str, step: int) -> bool:
        try:
            rec = json.loads(line)
        except ValueError:
            return False  # a line cut short by a kill
        return rec["step"] <= step if "val_loss" in rec else rec["step"] < step

    def write(self, **rec: Any) -> None:
        with open(self.path, "a") as fh:
            fh.write(json.dumps(rec) + "\n")


def prepare(a: TrainArgs, out: Path):
    """Tokenizer, train/val ids and model config: fresh, or taken from the run being resumed."""
    if a.resume:
        last = out / "last"
        meta = ckpt.read_meta(last)
        tokenizer = load_tokenizer(last)
        config = ckpt.ModelConfig.from_dict(meta["model"])
    else:
        tokenizer = None
    _, text = load_text(a.data)
    if tokenizer is None:
        tokenizer = build_tokenizer(a.tokenizer, text, a.vocab_size)
    ids = encode_corpus(text, tokenizer)
    train_ids, val_ids = split_ids(ids)
    if not a.resume:
        config = preset_config(a.preset, vocab_size=tokenizer.vocab_size, **a.model_overrides())
    return tokenizer, train_ids, val_ids, config


@torch.no_grad()
def estimate_loss(model, samplers: dict[str, BatchSampler], iters: int, device: str) -> dict[str, float]:
    """Mean loss over `iters` batches per split. The eval samplers restart from the same seed each
    time, so every eval sees the same batches and never touches the training RNG."""
    model.eval()
    out = {}
    for split, sampler in samplers.items():
        sampler.reset()
        losses = []
        for _ in range(iters):
            x, y = sampler.next()
            with autocast_for(device):
                losses.append(model.loss(x, y).item())
        out[split] = sum(losses) / len(losses)
    model.train()
    return out


def train(a: TrainArgs) -> dict[str, Any]:
    """Run (or resume) training; returns a summary. Raises LlmlabError on bad input."""
    a.validate()
    if a.out is None:
        if a.resume:
            raise LlmlabError("--resume needs --out RUN_DIR: the run to continue")
        a.out = time.strftime(f"runs/{a.preset}-%Y%m%d-%H%M%S")
    out = Path(a.out)
    if a.resume and not (out / "last").exists():
        raise LlmlabError(f"--resume: {out} has no last checkpoint to resume; drop --resume to start a new run")
    if not a.resume and ((out / "last").exists() or (out / "best").exists()):
        raise LlmlabError(f"{out} already holds a run; pass --resume to continue it or choose another --out")
    device = pick_device(a.device)
    tokenizer, train_ids, val_ids, config = prepare(a, out)
    TrainStep.check(a, device, config)
    torch.manual_seed(a.seed)
    model = Transformer(config).to(device)
    opt = make_optimizer(model, a, device)
    bs, blk = a.batch_size, config.block_size
    train_sampler = BatchSampler(train_ids, blk, bs, seed=a.seed, device=device)
    eval_samplers = {"train": BatchSampler(train_ids, blk, bs, seed=a.seed + 1, device=device),
                     "val": BatchSampler(val_ids, blk, bs, seed=a.seed + 2, device=device)}
    step, best_val = 0, float("inf")
    if a.resume:
        step, best_val = _restore(out / "last", model, opt, train_sampler)
    out.mkdir(parents=True, exist_ok=True)
    metrics = MetricsLog(out / "metrics.jsonl", keep_until=step if a.resume else None)
    train_args = dataclasses.asdict(a) | {"resume": False}
    log = (lambda *m: None) if a.quiet else (lambda *m: tqdm.write(" ".join(map(str, m)), file=sys.stderr))
    log(f"llmlab: preset {a.preset}, {model.num_params() / 1e6:.2f}M params, device {device}"
        f"{' (bf16)' if use_bf16(device) else ''}, tokenizer {tokenizer.kind} ({tokenizer.vocab_size}), "
        f"{len(train_ids):,} train tokens" + (f", resuming at step {step}" if a.resume else ""))
    tokens_per_step = bs * blk * a.grad_accum
    bar = tqdm(total=a.max_iters, initial=step, disable=a.quiet, dynamic_ncols=True, unit="it")
    val_loss = None
    first_resumed = a.resume
    train_step = TrainStep(model, opt, a, device)
    try:
        while True:
            if step % a.eval_interval == 0 or step == a.max_iters:
                if not first_resumed:  # a resumed run's step was evaluated before the checkpoint
                    losses = estimate_loss(model, eval_samplers, a.eval_iters, device)
                    val_loss = losses["val"]
                    _check_finite(val_loss, step, out, "val loss")
                    metrics.write(step=step, val_loss=val_loss, train_loss=losses["train"],
                                  perplexity=math.exp(min(val_loss, 50)))
                    log(f"step {step}: train loss {losses['train']:.4f}, val loss {val_loss:.4f}")
                    best_val = _save(out, model, opt, train_sampler, tokenizer, train_args, step, val_loss, best_val)
                first_resumed = False
            if step >= a.max_iters:
                break
            t0 = time.perf_counter()
            lr = lr_at(step, a)
            loss_sum = train_step(train_sampler.next, lr)
            _check_finite(loss_sum, step, out, "training loss")
            dt = time.perf_counter() - t0
            metrics.write(step=step, loss=loss_sum, lr=lr, tokens_per_s=tokens_per_step / dt)
            bar.set_postfix(loss=f"{loss_sum:.3f}", tok_s=f"{tokens_per_step / dt:,.0f}", refresh=False)
            bar.update(1)
            step += 1
    finally:
        train_step.close()
    bar.close()
    summary = {"out": str(out), "step": step, "val_loss": val_loss, "best_val_loss": best_val,
               "params": model.num_params()}
    if a.sample_tokens > 0:
        from llmlab.sample import sample_text

        summary["sample"] = sample_text(model, tokenizer, prompt=None, max_new_tokens=a.sample_tokens,
                                        temperature=0.8, top_k=50, seed=a.seed)
    return summary


def _check_finite(value: float, step: int, out: Path, what: str) -> None:
    if not math.isfinite(value):
        raise LlmlabError(f"{what} became {value} at step {step}; stopped without saving. The last good "
                          f"checkpoint is in {out / 'last'} (try a lower --lr or --grad-clip)")


def _train_tensors(opt, sampler: BatchSampler) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, opt_meta = ckpt.optimizer_to_flat(opt)
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    for k, v in sampler.state_dict().items():
        tensors[f"sampler.{k}"] = v
    return tensors, opt_meta


def _save(out, model, opt, sampler, tokenizer, train_args, step, val_loss, best_val) -> float:
    """Write last/ (full train state); also best/ (weights) when val improved. Returns best val."""
    tensors, opt_meta = _train_tensors(opt, sampler)
    state = {"step": step, "val_loss": val_loss, "best_val_loss": min(best_val, val_loss), "optimizer": opt_meta}
    ckpt.save_checkpoint(out / "last", model, tokenizer, train_args, state, tensors)
    if val_loss < best_val:
        ckpt.save_checkpoint(out / "best", model, tokenizer, train_args, state)
        return val_loss
    return best_val


def _restore(last: Path, model, opt, sampler: BatchSampler) -> tuple[int, float]:
    meta = ckpt.read_meta(last)
    ckpt.load_weights(model, last)
    tensors = ckpt.load_train_state(last)
    ckpt.optimizer_from_flat(opt, tensors, meta["state"]["optimizer"])
    torch.set_rng_state(tensors["rng.torch"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])
    sampler.load_state_dict({k[len("sampler."):]: v for k, v in tensors.items() if k.startswith("sampler.")})
    return int(meta["state"]["step"]), float(meta["state"]["best_val_loss"])
