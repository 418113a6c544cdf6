"""train(): the loop. Periodic evals, atomic checkpoints (last + best-val) and exact resume (model,
optimizer, data-sampler RNG and dropout RNG are all saved, so a resumed run's losses equal an
uninterrupted run's, even after SIGKILL), in one process or many (--parallel, under torchrun)."""
from __future__ import annotations

import dataclasses
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Optional, Union

import torch
from tqdm import tqdm

from llmlab import checkpoint as ckpt, lora, memory
from llmlab.data import BatchSampler, encode_corpus, load_text, split_ids
from llmlab.errors import LlmlabError, one_line
from llmlab.fsutil import check_out_path
from llmlab.presets import preset_config, preset_runtime
from llmlab.tokenizer import build_tokenizer, load_tokenizer
from llmlab.training import checkpoints, parallel
from llmlab.training.args import TrainArgs
from llmlab.training.balance import describe
from llmlab.training.device import pick_device, use_bf16
from llmlab.training.evaluate import mean_loss, sampled_batches
from llmlab.training.plan import RunPlan, plan_run, text_sha256
from llmlab.training.rundir import RunLock, recover
from llmlab.training.step import StepConfig, TrainStep, make_optimizer


class RankError(LlmlabError):
    """An error every rank raises at the same step (after an all-reduce): only rank 0 prints it."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during training; its message says where the run stopped and how to continue it."""


def prepare(plan: RunPlan):
    """Tokenizer, train/val ids, model config, runtime and the data's sha256: fresh, the resumed run's,
    or (--init-from) the source's. A resumed run's data must be what it was trained on."""
    a = plan.args
    last = plan.out / "last"
    name, text = load_text(a.data)
    digest = text_sha256(text)
    if plan.resume:
        meta = ckpt.read_meta(last)
        saved = meta["state"].get("data_sha256")
        if saved is not None and saved != digest:
            raise LlmlabError(f"--data {name} is not what {plan.out} was trained on (sha256 {digest[:12]}... vs "
                              f"{str(saved)[:12]}...); a resumed run continues on its own data: pass that, or "
                              "start a new run")
        tokenizer = load_tokenizer(last)
        config, runtime = ckpt.model_config(meta, last), ckpt.saved_runtime(meta, last)
    elif plan.source is not None:
        tokenizer, runtime = plan.source.tokenizer, plan.source.runtime
        config = plan.source.config.replace(dropout=a.dropout)
    else:
        tokenizer = build_tokenizer(a.tokenizer, text, a.vocab_size)
    train_ids, val_ids = split_ids(encode_corpus(text, tokenizer))
    if not plan.resume and plan.source is None:
        config = preset_config(a.preset, vocab_size=tokenizer.vocab_size, **a.model_overrides())
        runtime = preset_runtime(a.preset)
    return tokenizer, train_ids, val_ids, config, runtime, digest


def train(a: Union[TrainArgs, RunPlan], given: Optional[Iterable[str]] = None) -> dict[str, Any]:
    """Run (or resume) training from TrainArgs (planned by plan_run, which never changes them;
    `given`: the settings the user gave, see plan_run) or a RunPlan; returns a summary (rank 0's;
    the others get the same numbers). Raises LlmlabError on bad input, TrainingInterrupted (a
    KeyboardInterrupt) on Ctrl-C."""
    lock, plan = None, a if isinstance(a, RunPlan) else None
    is_main = int(os.environ.get("RANK", "0")) == 0  # before the process group: what torchrun says
    ranks = parallel.Ranks()
    try:
        repairs: list[str] = []
        if plan is None:
            a.validate()
            existing = a.out is not None and Path(a.out).is_dir()
            if is_main and existing:  # one train per run directory; repair what a kill left, before all else
                lock = RunLock(check_out_path(a.out, "--out", directory=True, allow_existing=True))
                repairs = recover(lock.out)
            plan = plan_run(a, given)
        if is_main and lock is None:
            lock = RunLock(plan.out)
            repairs = recover(plan.out)
        if is_main and not plan.args.quiet:
            for line in repairs + list(plan.notes):
                print(f"llmlab: {line}", file=sys.stderr)
        ranks, device = parallel.start(plan.args.parallel, pick_device(plan.args.device))
        ranks.barrier()
        return _train(plan, ranks, device)
    except OSError as e:
        # A failed write (disk full, I/O error...) or read of the run: files are written atomically,
        # so every checkpoint present is whole and --resume continues from the last one (tested
        # for a failure at each file operation: tests/test_fault_injection.py).
        out = plan.out if plan is not None else a.out
        raise LlmlabError(f"training stopped: {one_line(e)}; the checkpoints in {out} are whole: "
                          f"`llmlab train --out {out} --resume` continues from the last one") from None
    finally:
        if lock is not None:
            lock.release()
        ranks.close()


def _train(plan: RunPlan, ranks: parallel.Ranks, device: str) -> dict[str, Any]:
    a, out = plan.args, plan.out
    tokenizer, train_ids, val_ids, config, runtime, data_sha = prepare(plan)
    step_cfg = StepConfig.of(a, device)
    step_cfg.check(config)
    memory.check_fits(memory.activation_bytes(config, a.batch_size), f"training on batches of {a.batch_size} x "
                      f"{config.block_size} tokens", "use a smaller --batch-size (--grad-accum keeps the "
                      "global batch)", device)
    start = plan.source.state if plan.source is not None and not plan.resume else None
    built = parallel.build(config, a.parallel, device, ranks, a.seed, a.activation_checkpointing, a.compile,
                           runtime, start, plan.lora)
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
    if plan.resume:
        step, best_val = checkpoints.restore(out / "last", model, opt, train_batches, ranks)
    if ranks.is_main:
        out.mkdir(parents=True, exist_ok=True)
    metrics = checkpoints.MetricsLog(out / "metrics.jsonl" if ranks.is_main else None,
                                     keep_until=step if plan.resume else None)
    train_args = dataclasses.asdict(a)
    run_state = {"world": ranks.world, "data_sha256": data_sha}
    if plan.resume and "init_from" in plan.saved["state"]:  # where the run started, kept by every checkpoint
        run_state["init_from"] = plan.saved["state"]["init_from"]
    elif plan.source is not None and ranks.is_main:  # rank 0 writes the run's metadata
        run_state["init_from"] = plan.source.record()
    quiet = a.quiet or not ranks.is_main
    log = (lambda *m: None) if quiet else (lambda *m: tqdm.write(" ".join(map(str, m)), file=sys.stderr))
    trainable = f" ({lora.trainable_params(model):,} trainable: LoRA rank {plan.lora.rank} on " \
                f"{len(plan.lora.modules)} layers)" if plan.lora is not None else ""
    log(f"llmlab: {f'init from {a.init_from}' if a.init_from else f'preset {a.preset}'}, "
        f"{model.num_params() / 1e6:.2f}M params{trainable}, device {device}"
        f"{' (bf16)' if use_bf16(device) else ''}"
        + (f", {a.parallel} on {ranks.world} ranks (global batch {rows * a.grad_accum} x {blk})" if ranks.active else "")
        + f", tokenizer {tokenizer.kind} ({tokenizer.vocab_size}), {len(train_ids):,} train tokens"
        + (f", resuming at step {step}" if plan.resume else ""))
    tokens_per_step = rows * blk * a.grad_accum
    bar = tqdm(total=a.max_iters, initial=step, disable=quiet, dynamic_ncols=True, unit="it")
    val_loss = None
    saved_at = step if plan.resume else None  # a resumed run's step was evaluated before its checkpoint
    train_step = TrainStep(model, opt, step_cfg, built.loss_fn, built.sync, ranks.mean, ranks.sum)
    try:
        while True:
            if (step % a.eval_interval == 0 or step == a.max_iters) and step != saved_at:
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
                                            val_loss, best_val, ranks, run_state)
                saved_at = step
            if step >= a.max_iters:
                break
            t0 = time.perf_counter()
            loss = train_step(train_batches.next, plan.schedule(step))  # the mean over the ranks
            _check_finite(loss, step, out, "training loss")
            dt = time.perf_counter() - t0
            metrics.write(step=step, loss=loss, lr=plan.schedule(step), tokens_per_s=tokens_per_step / dt,
                          **train_step.stats)
            bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tokens_per_step / dt:,.0f}", refresh=False)
            bar.update(1)
            step += 1
    except KeyboardInterrupt:
        where = f"{out / 'last'} (step {saved_at})" if saved_at is not None else "none yet"
        raise TrainingInterrupted(f"training stopped at step {step}; last checkpoint: {where}; "
                                  f"`llmlab train --out {out} --resume` continues from it") from None
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
