"""Checkpoints: safetensors for tensors, JSON for everything else; nothing is ever unpickled.

A checkpoint is a directory:
    model.safetensors        weights (a tied head is stored once)
    config.json              {"model": ModelConfig, "runtime": Runtime (how it runs by default),
                              "lora": LoraSettings (a LoRA run only: its adapted layers),
                              "tokenizer": kind, "train": args, "state": {...}}
    tokenizer.json           the tokenizer (llmlab's own JSON, or an HF `tokenizers` file for BPE)
    train_state.safetensors  optimizer moments + RNG states (only in training checkpoints)

A run directory holds `last/` and `best/` checkpoints and `metrics.jsonl`. Every checkpoint is
written into a temporary sibling directory and renamed into place, so a crash mid-write leaves
the previous checkpoint whole.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, load_model, save_file, save_model

from llmlab import fsutil, lora, memory
from llmlab.config import ModelConfig
from llmlab.errors import LlmlabError
from llmlab.runtime import Runtime, legacy_runtime, split_legacy
from llmlab.model import Transformer
from llmlab.validate import check_fields

MODEL_FILE, CONFIG_FILE, TRAIN_STATE_FILE = "model.safetensors", "config.json", "train_state.safetensors"


# One implementation of atomic writes lives in llmlab.fsutil; these names stay importable here.
write_dir_atomically = fsutil.write_dir_atomically


def write_json_atomically(path: Path, obj: Any) -> None:
    fsutil.atomic_write_json(path, obj)


def save_checkpoint(directory: Path, model: Transformer, tokenizer=None, train_args: Optional[dict] = None,
                    state: Optional[dict] = None, train_tensors: Optional[dict[str, torch.Tensor]] = None) -> None:
    """Write one checkpoint directory atomically. `model` must be the plain module (not compiled or
    wrapped), so names carry no `_orig_mod.` / `module.` prefix."""
    meta = {"format": "llmlab-1", **model_meta(model), "tokenizer": getattr(tokenizer, "kind", None),
            "train": train_args or {}, "state": state or {}}

    def write(tmp: Path) -> None:
        save_model(model, str(tmp / MODEL_FILE))
        with open(tmp / CONFIG_FILE, "w") as fh:
            json.dump(meta, fh, indent=2)
        if tokenizer is not None:
            tokenizer.save(tmp)
        if train_tensors is not None:
            save_file({k: v.contiguous().cpu() for k, v in train_tensors.items()}, str(tmp / TRAIN_STATE_FILE))

    write_dir_atomically(Path(directory), write)


def model_meta(model: Transformer) -> dict[str, Any]:
    """What config.json says about the model: its config, its runtime, and a LoRA run's adapters."""
    adapters = lora.adapted(model)
    return {"model": model.config.to_dict(), "runtime": model.runtime.to_dict()} | (
        {"lora": adapters.to_dict()} if adapters is not None else {})


def resolve_checkpoint(path: Path | str) -> Path:
    """A checkpoint directory, or a run directory (its `best/`, else its `last/`)."""
    path = Path(path)
    if not path.exists():
        raise LlmlabError(f"no such checkpoint or run directory: {path}")
    candidates = [path, path / "best", path / "last", path / ".best.old", path / ".last.old"]
    for c in candidates:
        if (c / CONFIG_FILE).is_file():
            return c
    raise LlmlabError(f"{path} holds no llmlab checkpoint (no config.json in it, its best/ or last/); "
                      "pass a run directory written by `llmlab train` or `llmlab convert`")


def read_meta(directory: Path) -> dict:
    """config.json of a checkpoint, checked: valid JSON is not enough, every model setting must have
    its type (a hand-edited `"n_layer": "4"` is one clear error here, not a traceback later)."""
    where = f"checkpoint {directory} has a corrupt config.json"
    try:
        with open(Path(directory) / CONFIG_FILE, "rb") as fh:
            meta = json.loads(fh.read().decode("utf-8"))
    except (OSError, ValueError) as e:
        raise LlmlabError(f"{where} ({fsutil.one_line(e)}); restore it or retrain") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("model"), dict):
        raise LlmlabError(f"{where} (no 'model' section); restore it or retrain")
    for key in ("train", "state"):
        if meta.get(key) is None:
            meta[key] = {}
        if not isinstance(meta[key], dict):
            raise LlmlabError(f"{where} ('{key}' is not an object); restore it or retrain")
    if meta.get("tokenizer") is not None and not isinstance(meta["tokenizer"], str):
        raise LlmlabError(f"{where} ('tokenizer' is not a name); restore it or retrain")
    model, _ = split_legacy(meta["model"])  # attn_backend / use_cache of earlier versions: runtime now
    check_fields(ModelConfig, model, f"{where} (model section)")
    if meta.get("runtime") is not None:
        check_fields(Runtime, meta["runtime"], f"{where} (runtime section)")
    from llmlab.training.args import TrainArgs

    fields = {f.name for f in dataclasses.fields(TrainArgs)}  # keys of other versions are let through
    check_fields(TrainArgs, {k: v for k, v in meta["train"].items() if k in fields}, f"{where} (train section)")
    return meta


def model_config(meta: dict, directory: Path, **overrides: Any) -> ModelConfig:
    """The ModelConfig of a checked meta (read_meta), with overrides; bad values are one line."""
    try:
        return ModelConfig.from_dict(meta["model"]).replace(**overrides)
    except (TypeError, ValueError, OverflowError) as e:
        raise LlmlabError(f"checkpoint {directory} has an invalid model config ({fsutil.one_line(e)})") from None


def saved_runtime(meta: dict, directory: Path, changes: Optional[dict] = None) -> Runtime:
    """The runtime a checkpoint runs with by default (its saved one, or what an earlier version's
    model fields meant), with `changes`; bad values are one line."""
    try:
        saved = Runtime.from_dict(legacy_runtime(meta["model"]) | (meta.get("runtime") or {}))
        return saved.changed(**(changes or {}))
    except (TypeError, ValueError) as e:
        raise LlmlabError(f"checkpoint {directory} has an invalid runtime ({fsutil.one_line(e)})") from None


def saved_step(meta: dict, directory: Path) -> int:
    """The step a checked meta (read_meta) was saved at; a hand-edited one is one clear line."""
    step = meta["state"].get("step", 0)
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise LlmlabError(f"checkpoint {directory} has a corrupt config.json (state.step {step!r} is not a step "
                          "number); restore it or retrain")
    return step


def check_train_state(meta: dict, directory: Path, sharded: bool) -> None:
    """The state a resume reads from config.json: a step, the best val loss and (single-process
    checkpoints) the optimizer's param groups, each of its type, or one line."""
    state = meta["state"]
    saved_step(meta, directory)
    best = state.get("best_val_loss")
    groups = (state.get("optimizer") or {}).get("param_groups") if isinstance(state.get("optimizer"), dict) else None
    problem = ("state.best_val_loss is not a number" if isinstance(best, bool) or not isinstance(best, (int, float))
               else "state.optimizer.param_groups is missing" if not sharded and not isinstance(groups, list)
               else None)
    if problem:
        raise LlmlabError(f"checkpoint {directory} has a corrupt config.json ({problem}); it cannot be resumed: "
                          "restore it, or start a new run")


def build_model(config: ModelConfig, where: str, copies: int = 1) -> Transformer:
    """Transformer(config), refusing one whose `copies` of the weights (training: 4, with gradients
    and AdamW's two moments) cannot fit in memory, before allocating it."""
    what = "for its weights" if copies == 1 else f"for {copies} copies of its weights (weights, gradients, AdamW)"
    memory.check_fits(copies * memory.param_bytes(config), f"{where}: the model {what}",
                      "use a machine with more memory")
    try:
        return Transformer(config)
    except (MemoryError, RuntimeError) as e:  # RuntimeError: torch's "can't allocate memory"
        raise LlmlabError(f"{where}: cannot build the model ({fsutil.one_line(e)})") from None


def load(path: Path | str, device: Optional[str] = None, runtime: Optional[Runtime | dict] = None,
         merge_lora: bool = True, **overrides: Any) -> Transformer:
    """Load a run or checkpoint directory into a Transformer. It runs with the runtime it was saved
    with, or `runtime` (a Runtime, or a dict of changes to the saved one, e.g. {"cache": "paged"});
    `overrides` replace config fields (the earlier names attn_backend / use_cache still work, as
    runtime changes). A LoRA run's adapters are folded into its weights (a plain Transformer), or,
    with merge_lora=False, kept as the run trained them (llmlab.lora). Weights come from safetensors only."""
    directory = resolve_checkpoint(path)
    meta = read_meta(directory)
    overrides, legacy = split_legacy(overrides)
    config = model_config(meta, directory, **overrides)
    rt = runtime if isinstance(runtime, Runtime) else saved_runtime(meta, directory, legacy | (runtime or {}))
    rt.validate(config)
    model = build_model(config, f"checkpoint {directory}")
    model.use_runtime(rt)
    adapters = lora_settings(meta, directory)
    if adapters is not None:
        lora.inject(model, adapters)
    load_weights(model, directory)
    if adapters is not None and merge_lora:
        lora.merge(model)
    try:
        if device is not None:
            model.to(device)
        if rt.dtype is not None:
            model.to(getattr(torch, rt.dtype))
    except (RuntimeError, AssertionError, ValueError) as e:  # e.g. out of device memory
        raise LlmlabError(f"cannot move the model to device {device} ({fsutil.one_line(e)})") from None
    return model.eval()


def lora_settings(meta: dict, directory: Path) -> Optional[lora.LoraSettings]:
    """The LoRA adapters a checked meta (read_meta) says its weights carry, or None."""
    if meta.get("lora") is None:
        return None
    return lora.LoraSettings.from_dict(meta["lora"], f"checkpoint {directory}/{CONFIG_FILE}")


def model_from_meta(meta: dict, directory: Path) -> Transformer:
    """The model a checked meta describes (config, runtime, LoRA adapters), its weights not loaded."""
    model = build_model(model_config(meta, directory), f"checkpoint {directory}")
    model.use_runtime(saved_runtime(meta, directory))
    adapters = lora_settings(meta, directory)
    return lora.inject(model, adapters) if adapters is not None else model


def save_plain(out: Path, model: Transformer, meta: dict, directory: Path, extra_state: Optional[dict] = None) -> Path:
    """`model` (loaded from the checkpoint at `directory`, whose checked meta is `meta`) as a plain
    checkpoint at `out`: its weights, config, tokenizer and training state, no optimizer state."""
    from llmlab.tokenizer import TOKENIZER_FILE, load_tokenizer

    tokenizer = load_tokenizer(directory) if (directory / TOKENIZER_FILE).is_file() else None
    state = {k: v for k, v in meta.get("state", {}).items() if k != "optimizer"} | (extra_state or {})
    save_checkpoint(Path(out), model, tokenizer, meta.get("train"), state)
    return Path(out)


def save_merged(path: Path | str, out: Path, model: Optional[Transformer] = None) -> Path:
    """`llmlab convert RUN --merge-lora --out DIR`: a LoRA run's checkpoint with its adapters folded
    in, as a plain checkpoint. `model`: the checkpoint's model with its adapters, weights loaded
    (a sharded checkpoint's, by llmlab.training.dcp.load_plain); by default loaded here."""
    directory = resolve_checkpoint(path)
    meta = read_meta(directory)
    adapters = lora_settings(meta, directory)
    if adapters is None:
        raise LlmlabError(f"{directory} has no LoRA adapters to merge (it is a plain checkpoint: use it as it is)")
    if model is None:
        if not (directory / MODEL_FILE).is_file():
            raise LlmlabError(f"{directory} has no {MODEL_FILE} (a sharded checkpoint is merged through `llmlab "
                              f"convert {directory} --merge-lora --out DIR`)")
        model = load(directory)  # merged on loading
    else:
        lora.merge(model)
    return save_plain(out, model, meta, directory, {"merged_lora": adapters.to_dict()})


def load_weights(model: Transformer, directory: Path) -> None:
    """Fill `model` from directory/model.safetensors; a bad file is one clear LlmlabError."""
    try:
        missing, unexpected = load_model(model, str(Path(directory) / MODEL_FILE), strict=False)
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise LlmlabError(f"checkpoint {Path(directory) / MODEL_FILE} is truncated or corrupt "
                          f"({str(e).splitlines()[0]}); restore it or retrain") from None
    if missing or unexpected:
        raise LlmlabError(f"checkpoint {directory} does not match its config "
                          f"(missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})")


def load_train_state(directory: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(Path(directory) / TRAIN_STATE_FILE))
    except (SafetensorError, OSError) as e:
        raise LlmlabError(f"checkpoint {directory} has no readable train state ({str(e).splitlines()[0]}); "
                          "it cannot be resumed, start a new run from its weights instead") from None


# ---- optimizer state <-> flat tensors + JSON ---------------------------------------------------
def optimizer_to_flat(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = opt.state_dict()
    tensors = {f"opt.{pid}.{name}": t for pid, st in sd["state"].items() for name, t in st.items()
               if torch.is_tensor(t)}
    return tensors, {"param_groups": sd["param_groups"]}


def optimizer_from_flat(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        if key.startswith("opt."):
            _, pid, name = key.split(".", 2)
            state.setdefault(int(pid), {})[name] = t
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
