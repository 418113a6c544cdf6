"""A run's files: metrics.jsonl, and the last/ (full training state) and best/ (weights)
checkpoints, in the single-process format (safetensors + JSON, llmlab.checkpoint) or, under
--parallel, sharded (llmlab.training.dcp) with best/ gathered into the single format."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional

import torch

from llmlab import checkpoint as ckpt
from llmlab.errors import LlmlabError
from llmlab.fsutil import atomic_write_bytes
from llmlab.training import dcp
from llmlab.training.rundir import open_no_follow


class MetricsLog:
    """metrics.jsonl: one JSON object a line ({step, loss, lr, tokens_per_s} or {step, val_loss, ...}).
    Only rank 0 has one; the other ranks get a log that writes nothing."""

    def __init__(self, path: Optional[Path], keep_until: Optional[int]):
        self.path = path
        if path is None:
            return
        if keep_until is not None and path.exists():  # resume: drop lines the crashed run wrote late
            kept = [ln for ln in path.read_text().splitlines() if ln.strip() and self._keep(ln, keep_until)]
            kept.append(json.dumps({"step": keep_until, "resumed_at": keep_until}))  # `llmlab plot` marks it
            atomic_write_bytes(path, "".join(ln + "\n" for ln in kept).encode())
        elif keep_until is None:
            os.close(open_no_follow(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC))

    @staticmethod
    def _keep(line: str, step: int) -> bool:
        try:
            rec = json.loads(line)
        except ValueError:
            return False  # a line cut short by a kill
        return rec["step"] <= step if "val_loss" in rec else rec["step"] < step  # a resume's line is redone

    def write(self, **rec: Any) -> None:
        if self.path is None:
            return
        with os.fdopen(open_no_follow(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT), "a") as fh:
            fh.write(json.dumps(rec) + "\n")


def _rng_and_sampler(sampler) -> dict[str, torch.Tensor]:
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    for k, v in sampler.state_dict().items():
        tensors[f"sampler.{k}"] = v
    return tensors


def _set_rng_and_sampler(tensors: dict[str, torch.Tensor], sampler) -> None:
    torch.set_rng_state(tensors["rng.torch"].cpu())
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"].cpu())
    sampler.load_state_dict({k[len("sampler."):]: v for k, v in tensors.items() if k.startswith("sampler.")})


def save(out: Path, model, opt, sampler, tokenizer, train_args: dict, step: int, val_loss: float,
         best_val: float, ranks, run_state: Optional[dict] = None) -> float:
    """Write last/ (full train state); also best/ (weights) when val improved. Returns best val.
    Under --parallel every rank calls it. `run_state`: what the run records beside the step (its
    number of ranks, the sha256 of its data)."""
    state = (run_state or {}) | {"step": step, "val_loss": val_loss, "best_val_loss": min(best_val, val_loss)}
    if ranks.active:
        meta = {**ckpt.model_meta(model), "tokenizer": getattr(tokenizer, "kind", None), "train": train_args,
                "state": state}
        dcp.save(out / "last", model, opt, _rng_and_sampler(sampler), meta, tokenizer, ranks)
        if val_loss < best_val:
            dcp.gather_to_single(out / "best", model, model.config, tokenizer, train_args, state, ranks)
    else:
        tensors, opt_meta = ckpt.optimizer_to_flat(opt)
        tensors.update(_rng_and_sampler(sampler))
        ckpt.save_checkpoint(out / "last", model, tokenizer, train_args, state | {"optimizer": opt_meta}, tensors)
        if val_loss < best_val:
            ckpt.save_checkpoint(out / "best", model, tokenizer, train_args, state | {"optimizer": opt_meta})
    return min(best_val, val_loss)


def restore(last: Path, model, opt, sampler, ranks) -> tuple[int, float]:
    """Load last/ into model, optimizer, sampler and RNG; returns (step, best val loss)."""
    meta = ckpt.read_meta(last)
    sharded = dcp.is_sharded(last)
    ckpt.check_train_state(meta, last, sharded)
    if sharded != ranks.active:
        how = "with --parallel (sharded)" if sharded else "by one process without --parallel"
        raise LlmlabError(f"{last} was saved {how}; resume it the same way (or `llmlab convert {last} "
                          "--out DIR` for its weights)")
    if sharded:
        tensors = _rng_and_sampler(sampler)  # the shapes to load into
        tensors = {k: v.clone() for k, v in tensors.items()}
        dcp.load(last, model, opt, tensors, meta.get("optimizer_state", True))
    else:
        ckpt.load_weights(model, last)
        tensors = ckpt.load_train_state(last)
        ckpt.optimizer_from_flat(opt, tensors, meta["state"]["optimizer"])
    _set_rng_and_sampler(tensors, sampler)
    return int(meta["state"]["step"]), float(meta["state"]["best_val_loss"])
