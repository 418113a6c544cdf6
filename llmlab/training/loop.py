"""train(): the loop. Periodic evals, atomic checkpoints (last + best-val) and exact resume (model,
optimizer, data-sampler RNG and dropout RNG are all saved, so a resumed run's losses equal an
uninterrupted run's, even after SIGKILL), in one process or many (--parallel, under torchrun)."""
from __future__ import annotations

import dataclasses
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from llmlab import checkpoint as ckpt
from llmlab.config import ModelConfig
from llmlab.data import BatchSampler, encode_corpus, load_text, split_ids
from llmlab.errors import LlmlabError, one_line
from llmlab.fsutil import check_out_path
from llmlab.presets import preset_config
from llmlab.tokenizer import build_tokenizer, load_tokenizer
from llmlab.training import checkpoints, parallel
from llmlab.training.args import MODEL_FLAGS, TrainArgs
from llmlab.training.balance import describe
from llmlab.training.device import pick_device, use_bf16
from llmlab.training.evaluate import mean_loss, sampled_batches
from llmlab.training.rundir import RunLock, recover
from llmlab.training.schedule import schedule_for
from llmlab.training.step import StepConfig, TrainStep, make_optimizer


class RankError(LlmlabError):
    """An error every rank raises at the same step (after an all-reduce): only rank 0 prints it."""


def prepare(a: TrainArgs, out: Path):
    """Tokenizer, train/val ids and model config: fresh, or taken from the run being resumed."""
    if a.resume:
        last = out / "last"
        meta = ckpt.read_meta(last)
        tokenizer = load_tokenizer(last)
        config = ModelConfig.from_dict(meta["model"])
    else:
        tokenizer = None
    _, text = load_text(a.data)
    if tokenizer is None:
        tokenizer = build_tokenizer(a.tokenizer, text, a.vocab_size)
    train_ids, val_ids = split_ids(encode_corpus(text, tokenizer))
    if not a.resume:
        config = preset_config(a.preset, vocab_size=tokenizer.vocab_size, **a.model_overrides())
    return tokenizer, train_ids, val_ids, config


def _run_dir(a: TrainArgs) -> Path:
    if a.out is None:
        if a.resume:
            raise LlmlabError("--resume needs --out RUN_DIR: the run to continue")
        if parallel.launched_ranks() > 1:  # each rank would pick its own timestamp
            raise LlmlabError("--parallel under torchrun needs --out RUN_DIR (one directory for all ranks)")
        a.out = time.strftime(f"runs/{a.preset}-%Y%m%d-%H%M%S")
    # a file, a path under a file or an unwritable place: one line before any work (an existing run
    # directory is fine here; _check_run_dir decides about new runs in it)
    return check_out_path(a.out, "--out", directory=True, allow_existing=True)


# Settings that make the model and its tokens: a resumed run keeps its own, so differing ones are errors.
FIXED_ON_RESUME = MODEL_FLAGS + ("preset", "tokenizer", "vocab_size")


def _check_run_dir(a: TrainArgs, out: Path, quiet_rank: bool = False) -> None:
    """Refuse what cannot start: a resume with nothing left to do or other model or tokenizer
    settings, a fresh start over an existing run (a resume of a run without a checkpoint becomes
    its start). Nothing has been written yet."""
    if a.resume and not (out / "last").exists():
        # The run stopped (a crash, a kill, a failed write) before its first checkpoint was whole,
        # and a run that fails at once removes its directory (RunLock.release): there is nothing
        # to continue, so it starts over from the settings given now; the note says so, in case
        # --out was mistyped.
        a.resume = False
        if not a.quiet and not quiet_rank:
            print(f"llmlab: --resume: {out} has no checkpoint (none was written yet): starting it from step 0",
                  file=sys.stderr)
    if not a.resume and ((out / "last").exists() or (out / "best").exists()):
        raise LlmlabError(f"{out} already holds a run; pass --resume to continue it or choose another --out")
    if not a.resume:
        if a.lr_decay_iters is None:  # saved with the run: extending it later keeps this schedule
            a.lr_decay_iters = a.max_iters
        return
    meta = ckpt.read_meta(out / "last")
    saved = meta.get("train", {})
    for key in FIXED_ON_RESUME:
        if key in saved and getattr(a, key) != saved[key]:
            raise LlmlabError(f"--{key.replace('_', '-')} {getattr(a, key)} differs from the run's {saved[key]}: "
                              "a resumed run keeps its model and tokenizer; drop the flag")
    if a.lr_decay_iters is None:  # the run's own horizon (the CLI merges it already; train() callers too)
        a.lr_decay_iters = saved.get("lr_decay_iters")
    step = int(meta.get("state", {}).get("step", 0))
    if step >= a.max_iters:
        raise LlmlabError(f"{out} finished at step {step} (--max-iters {a.max_iters}); nothing to do: pass a "
                          f"larger --max-iters to train on")


def train(a: TrainArgs) -> dict[str, Any]:
    """Run (or resume) training; returns a summary (rank 0's; the others get the same numbers).
    Raises LlmlabError on bad input."""
    a.validate()
    out = _run_dir(a)
    ranks, device = parallel.start(a.parallel, pick_device(a.device))
    lock = None
    try:
        if ranks.is_main:  # one train per run directory; then repair what a kill left in it
            lock = RunLock(out)
            for line in recover(out):
                if not a.quiet:
                    print(f"llmlab: {line}", file=sys.stderr)
        ranks.barrier()
        _check_run_dir(a, out, quiet_rank=not ranks.is_main)
        return _train(a, out, ranks, device)
    except OSError as e:
        # A failed write (disk full, I/O error...) or read of the run: files are written atomically,
        # so every checkpoint present is whole and --resume continues from the last one (tested
        # for a failure at each file operation: tests/test_fault_injection.py).
        raise LlmlabError(f"training stopped: {one_line(e)}; the checkpoints in {out} are whole: "
                          f"`llmlab train --out {out} --resume` continues from the last one") from None
    finally:
        if lock is not None:
            lock.release()
        ranks.close()


def _train(a: TrainArgs, out: Path, ranks: parallel.Ranks, device: str) -> dict[str, Any]:
    tokenizer, train_ids, val_ids, config = prepare(a, out)
    step_cfg = StepConfig.of(a, device)
    step_cfg.check(config)
    built = parallel.build(config, a.parallel, device, ranks, a.seed, a.activation_checkpointing, a.compile)
    model = built.model
    opt = make_optimizer(model, a.weight_decay, (a.beta1, a.beta2), a.lr)
    # One sampler state for the run: each draws the step's global batch, each rank takes its rows.
    rows, blk = a.batch_size * ranks.world, config.block_size
    sampler_device = device if ranks.world == 1 else "cpu"

    def batches(ids, seed):
        return parallel.RankBatches(BatchSampler(ids, blk, rows, seed=seed, device=sampler_device), ranks, device)

    train_batches = batches(train_ids, a.seed)
    eval_batches = {"train": batches(train_ids, a.seed + 1), "val": batches(val_ids, a.seed + 2)}
    step, best_val = 0, float("inf")
    if a.resume:
        step, best_val = checkpoints.restore(out / "last", model, opt, train_batches, ranks)
    if ranks.is_main:
        out.mkdir(parents=True, exist_ok=True)
    metrics = checkpoints.MetricsLog(out / "metrics.jsonl" if ranks.is_main else None,
                                     keep_until=step if a.resume else None)
    train_args = dataclasses.asdict(a) | {"resume": False}
    quiet = a.quiet or not ranks.is_main
    log = (lambda *m: None) if quiet else (lambda *m: tqdm.write(" ".join(map(str, m)), file=sys.stderr))
    log(f"llmlab: preset {a.preset}, {model.num_params() / 1e6:.2f}M params, device {device}"
        f"{' (bf16)' if use_bf16(device) else ''}"
        + (f", {a.parallel} on {ranks.world} ranks (global batch {rows * a.grad_accum} x {blk})" if ranks.active else "")
        + f", tokenizer {tokenizer.kind} ({tokenizer.vocab_size}), {len(train_ids):,} train tokens"
        + (f", resuming at step {step}" if a.resume else ""))
    tokens_per_step = rows * blk * a.grad_accum
    lr_at = schedule_for(a)
    bar = tqdm(total=a.max_iters, initial=step, disable=quiet, dynamic_ncols=True, unit="it")
    val_loss = None
    first_resumed = a.resume
    train_step = TrainStep(model, opt, step_cfg, built.loss_fn, built.sync, ranks.mean, ranks.sum)
    try:
        while True:
            if step % a.eval_interval == 0 or step == a.max_iters:
                if not first_resumed:  # a resumed run's step was evaluated before the checkpoint
                    losses = {split: mean_loss(model, sampled_batches(b, a.eval_iters), device, ranks.active)
                              for split, b in eval_batches.items()}
                    parallel.reshard(model)
                    val_loss = losses["val"]
                    _check_finite(val_loss, step, out, "val loss")
                    metrics.write(step=step, val_loss=val_loss, train_loss=losses["train"],
                                  perplexity=math.exp(min(val_loss, 50)))
                    log(f"step {step}: train loss {losses['train']:.4f}, val loss {val_loss:.4f}"
                        + describe(train_step.stats))  # MoE: expert load of the last step
                    best_val = checkpoints.save(out, model, opt, train_batches, tokenizer, train_args, step,
                                                val_loss, best_val, ranks)
                first_resumed = False
            if step >= a.max_iters:
                break
            t0 = time.perf_counter()
            lr = lr_at(step)
            loss = train_step(train_batches.next, lr)  # the mean over the ranks
            _check_finite(loss, step, out, "training loss")
            dt = time.perf_counter() - t0
            metrics.write(step=step, loss=loss, lr=lr, tokens_per_s=tokens_per_step / dt, **train_step.stats)
            bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tokens_per_step / dt:,.0f}", refresh=False)
            bar.update(1)
            step += 1
    finally:
        train_step.close()
    bar.close()
    summary = {"out": str(out), "step": step, "val_loss": val_loss, "best_val_loss": best_val,
               "params": model.num_params()}
    if a.sample_tokens > 0 and not ranks.active:  # a --parallel run's sample: `llmlab sample RUN`
        from llmlab.sample import sample_text

        summary["sample"] = sample_text(model, tokenizer, prompt=None, max_new_tokens=a.sample_tokens,
                                        temperature=0.8, top_k=50, seed=a.seed)
    return summary


def _check_finite(value: float, step: int, out: Path, what: str) -> None:
    """`value` is the same on every rank (all-reduced), so every rank stops here together."""
    if not math.isfinite(value):
        raise RankError(f"{what} became {value} at step {step}; stopped without saving. The last good "
                        f"checkpoint is in {out / 'last'} (try a lower --lr or --grad-clip)")
