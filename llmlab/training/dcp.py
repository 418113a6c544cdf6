"""Sharded checkpoints with torch.distributed.checkpoint (DCP), written by every rank at once.

A sharded checkpoint is a directory like a single-process one, with `dcp/` in place of the
safetensors files:
    config.json      {"format": "llmlab-dcp-1", "model": ..., "train": ..., "state": ...} (rank 0)
    tokenizer.json   (rank 0)
    dcp/             DCP's files: .metadata and one __R_0.distcp per rank
It is written into a temporary sibling and renamed into place, like the single-process ones (the
ranks must share the run directory's filesystem). Any world size, DDP or FSDP, resumes it: DCP
reads each rank's part by parameter name. `llmlab convert RUN/last --out DIR` turns it into the
single safetensors checkpoint that sample, eval and to_hf use.

Nothing is unpickled freely. DCP's `.metadata` file IS a pickle (FileSystemReader calls
pickle.load), and non-tensor values would be saved as torch.save bytes loaded with
weights_only=False. So llmlab saves tensors only (the optimizer's hyperparameters are rebuilt from
the run's settings) and reads `.metadata` with SafeReader, whose unpickler accepts only DCP's own
metadata classes and torch's size/dtype types; any other object in it is refused."""
from __future__ import annotations

import io
import json
import os
import pickle
import shutil
from pathlib import Path
from typing import Optional

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from llmlab.errors import LlmlabError

FORMAT, DCP_DIR = "llmlab-dcp-1", "dcp"


def is_sharded(directory: Path) -> bool:
    return (Path(directory) / DCP_DIR).is_dir()


# ---- reading DCP metadata without arbitrary unpickling ----------------------------------------
class _MetadataUnpickler(pickle.Unpickler):
    _MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem",
                "torch.distributed.checkpoint.planner", "torch.distributed.checkpoint._extension")
    _TORCH = {"Size", "float32", "float16", "bfloat16", "float64", "int64", "int32", "int16", "int8",
              "uint8", "bool", "strided", "contiguous_format", "preserve_format", "complex64"}
    # torch.layout pickles as _get_layout("torch.strided") (a lookup by name in torch's own table);
    # StorageMeta holds the checkpoint's path
    _OTHER = {("collections", "OrderedDict"), ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"),
              ("pathlib", "PurePosixPath"), ("pathlib", "WindowsPath"), ("pathlib", "PureWindowsPath")}

    def find_class(self, module: str, name: str):
        if module in self._MODULES or (module == "torch" and name in self._TORCH) or (module, name) in self._OTHER:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing {module}.{name} in DCP metadata")


class SafeReader(FileSystemReader):
    """FileSystemReader whose .metadata pickle may hold only DCP's metadata classes."""

    def read_metadata(self, *args, **kwargs):
        path = Path(self.path) / ".metadata"
        try:
            metadata = _MetadataUnpickler(io.BytesIO(path.read_bytes())).load()
        except (OSError, pickle.UnpicklingError, EOFError, AttributeError, ValueError) as e:
            raise LlmlabError(f"sharded checkpoint {self.path} has unreadable metadata ({e}); "
                              "restore it or retrain") from None
        from torch.distributed.checkpoint.metadata import StorageMeta

        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


# ---- save / load -------------------------------------------------------------------------------
# The optimizer's state is keyed by parameter name ("blocks.0.mlp.fc.weight.exp_avg"), the same
# under DDP and FSDP, so either resumes the other at any world size. (torch's
# get_optimizer_state_dict would do this too, but on an optimizer that has not stepped yet it takes
# a zero-gradient step to create the state, which counts as AdamW's first step and changes the run.)
def _named_params(model) -> list[tuple[str, torch.Tensor]]:
    return list(model.named_parameters())  # a tied weight once, under its first name


def _optimizer_tensors(model, opt) -> dict[str, torch.Tensor]:
    return {f"{name}.{k}": v for name, p in _named_params(model) for k, v in opt.state.get(p, {}).items()
            if torch.is_tensor(v)}


def _empty_adamw_state(model) -> dict[str, torch.Tensor]:
    """Tensors of AdamW's state's shapes (sharded like the parameters), for DCP to load into."""
    out = {}
    for name, p in _named_params(model):
        out |= {f"{name}.step": torch.zeros((), dtype=torch.float32),
                f"{name}.exp_avg": torch.zeros_like(p), f"{name}.exp_avg_sq": torch.zeros_like(p)}
    return out


def save(directory: Path, model, opt, train_tensors: dict[str, torch.Tensor], meta: dict, tokenizer,
         ranks) -> None:
    """Every rank calls this (a collective). Writes `directory` atomically: into .NAME.tmp, then
    rank 0 swaps it in with the same renames as llmlab.checkpoint.write_dir_atomically."""
    directory = Path(directory)
    tmp, old = directory.parent / f".{directory.name}.tmp", directory.parent / f".{directory.name}.old"
    if ranks.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    ranks.barrier()
    optim = _optimizer_tensors(model, opt)  # empty before the first step
    dcp.save({"model": get_model_state_dict(model), "optim": optim, "train": train_tensors},
             checkpoint_id=str(tmp / DCP_DIR))
    if ranks.is_main:
        with open(tmp / "config.json", "w") as fh:
            json.dump({**meta, "format": FORMAT, "optimizer_state": bool(optim)}, fh, indent=2)
        if tokenizer is not None:
            tokenizer.save(tmp)
        for f in [*tmp.iterdir(), *(tmp / DCP_DIR).iterdir()]:
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        if directory.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(directory, old)
        os.replace(tmp, directory)
        shutil.rmtree(old, ignore_errors=True)
    ranks.barrier()


def load(directory: Path, model, opt, train_tensors: dict[str, torch.Tensor], optimizer_state: bool) -> None:
    """Every rank calls this: fills model, optimizer and `train_tensors` (in place) from a sharded
    checkpoint saved at any world size, by DDP or FSDP."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    state = {"model": get_model_state_dict(model), "train": train_tensors}
    if optimizer_state:
        state["optim"] = _empty_adamw_state(model)
    _read(directory, state)
    set_model_state_dict(model, state["model"])
    if optimizer_state:
        index = {id(p): i for i, p in enumerate(p for g in opt.param_groups for p in g["params"])}
        per_param = {index[id(p)]: {k: state["optim"][f"{name}.{k}"] for k in ("step", "exp_avg", "exp_avg_sq")}
                     for name, p in _named_params(model)}
        opt.load_state_dict({"state": per_param, "param_groups": opt.state_dict()["param_groups"]})


def _read(directory: Path, state: dict) -> None:
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        dcp.load(state, storage_reader=SafeReader(str(Path(directory) / DCP_DIR)))
    except CheckpointException as e:  # DCP gathers each rank's exception (with its traceback) into one
        for failure in e.failures.values():
            for item in failure if isinstance(failure, tuple) else (failure,):
                if isinstance(item, LlmlabError):
                    raise LlmlabError(str(item)) from None
        raise LlmlabError(f"sharded checkpoint {directory} could not be read ({str(e).splitlines()[0][:200]}); "
                          "restore it or retrain") from None
    except (OSError, RuntimeError, ValueError, KeyError) as e:
        raise LlmlabError(f"sharded checkpoint {directory} is truncated, corrupt or of another model "
                          f"({str(e).splitlines()[0][:200]}); restore it or retrain") from None


def load_full_model(directory: Path, model) -> None:
    """Fill a plain (unsharded, single-process) model's weights from a sharded checkpoint."""
    sd = model.state_dict()  # tensors sharing the parameters' storage: loaded in place
    _read(directory, {"model": sd})


def to_single(directory: Path, out: Path) -> Path:
    """`llmlab convert`: a sharded checkpoint -> one safetensors checkpoint (weights, config,
    tokenizer; no optimizer state) that sample, eval and to_hf load."""
    from llmlab import checkpoint as ckpt
    from llmlab.config import ModelConfig
    from llmlab.model import Transformer
    from llmlab.tokenizer import load_tokenizer

    directory = Path(directory)
    if not is_sharded(directory):
        raise LlmlabError(f"{directory} is not a sharded checkpoint (no {DCP_DIR}/ in it); "
                          "pass the last/ directory of a run trained with --parallel")
    meta = ckpt.read_meta(directory)
    model = Transformer(ModelConfig.from_dict(meta["model"]))
    load_full_model(directory, model)
    tokenizer = load_tokenizer(directory) if meta.get("tokenizer") else None
    state = {k: v for k, v in meta.get("state", {}).items() if k != "optimizer"}
    ckpt.save_checkpoint(Path(out), model, tokenizer, meta.get("train"), state)
    return Path(out)


def gather_to_single(out: Path, model, config, tokenizer, train_args: dict, state: dict, ranks) -> None:
    """Every rank calls this: the full weights gathered (to rank 0's CPU) and written by rank 0 as
    a single safetensors checkpoint (best/ of a --parallel run, so sample and eval read it)."""
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if ranks.is_main:
        from llmlab import checkpoint as ckpt
        from llmlab.model import Transformer

        with torch.random.fork_rng(devices=[]):  # rank 0's RNG must stay in step with the others'
            plain = Transformer(config)
        plain.load_state_dict(full)
        ckpt.save_checkpoint(Path(out), plain, tokenizer, train_args, state)
    ranks.barrier()
