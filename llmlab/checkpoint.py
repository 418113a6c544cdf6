"""Checkpoints: safetensors for tensors, JSON for everything else; nothing is ever unpickled.

A checkpoint is a directory:
    model.safetensors        weights (a tied head is stored once)
    config.json              {"model": ModelConfig, "tokenizer": kind, "train": args, "state": {...}}
    tokenizer.json           the tokenizer (llmlab's own JSON, or an HF `tokenizers` file for BPE)
    train_state.safetensors  optimizer moments + RNG states (only in training checkpoints)

A run directory holds `last/` and `best/` checkpoints and `metrics.jsonl`. Every checkpoint is
written into a temporary sibling directory and renamed into place, so a crash mid-write leaves
the previous checkpoint whole.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, load_model, save_file, save_model

from llmlab.config import ModelConfig
from llmlab.errors import LlmlabError
from llmlab.model import Transformer

MODEL_FILE, CONFIG_FILE, TRAIN_STATE_FILE = "model.safetensors", "config.json", "train_state.safetensors"


def _fsync_dir_files(directory: Path) -> None:
    for f in directory.iterdir():
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())


def write_dir_atomically(target: Path, write: Callable[[Path], None]) -> None:
    """Build `target` in a temp sibling, then swap it in with renames. At every instant either the
    old or the new directory is complete (`resolve_checkpoint` also accepts the `.old` copy)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp"
    old = target.parent / f".{target.name}.old"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    write(tmp)
    _fsync_dir_files(tmp)
    if target.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
    os.replace(tmp, target)
    shutil.rmtree(old, ignore_errors=True)


def write_json_atomically(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as fh:
        json.dump(obj, fh, indent=2)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def save_checkpoint(directory: Path, model: Transformer, tokenizer=None, train_args: Optional[dict] = None,
                    state: Optional[dict] = None, train_tensors: Optional[dict[str, torch.Tensor]] = None) -> None:
    """Write one checkpoint directory atomically. `model` must be the plain module (not compiled or
    wrapped), so names carry no `_orig_mod.` / `module.` prefix."""
    meta = {"format": "llmlab-1", "model": model.config.to_dict(),
            "tokenizer": getattr(tokenizer, "kind", None), "train": train_args or {}, "state": state or {}}

    def write(tmp: Path) -> None:
        save_model(model, str(tmp / MODEL_FILE))
        with open(tmp / CONFIG_FILE, "w") as fh:
            json.dump(meta, fh, indent=2)
        if tokenizer is not None:
            tokenizer.save(tmp)
        if train_tensors is not None:
            save_file({k: v.contiguous().cpu() for k, v in train_tensors.items()}, str(tmp / TRAIN_STATE_FILE))

    write_dir_atomically(Path(directory), write)


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
    try:
        with open(Path(directory) / CONFIG_FILE) as fh:
            meta = json.load(fh)
        if not isinstance(meta, dict) or "model" not in meta:
            raise ValueError("no 'model' section")
        return meta
    except (OSError, ValueError) as e:
        raise LlmlabError(f"checkpoint {directory} has a corrupt config.json ({e}); "
                          "restore it or retrain") from None


def load(path: Path | str, device: Optional[str] = None, **overrides: Any) -> Transformer:
    """Load a run or checkpoint directory into a Transformer; `overrides` replace config fields
    (e.g. attn_backend="manual"). Weights come from safetensors only."""
    directory = resolve_checkpoint(path)
    meta = read_meta(directory)
    config = ModelConfig.from_dict(meta["model"]).replace(**overrides)
    model = Transformer(config)
    load_weights(model, directory)
    if device is not None:
        model.to(device)
    return model.eval()


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
