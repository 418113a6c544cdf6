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
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_optimizer_state_dict)

from llmlab.errors import LlmlabError

FORMAT, DCP_DIR = "llmlab-dcp-1", "dcp"
_OPT = StateDictOptions(flatten_optimizer_state_dict=True)


def is_sharded(directory: Path) -> bool:
    return (Path(directory) / DCP_DIR).is_dir()


# ---- reading DCP metadata without arbitrary unpickling ----------------------------------------
class _MetadataUnpickler(pickle.Unpickler):
    _MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem",
                "torch.distributed.checkpoint.planner", "torch.distributed.checkpoint._extension")
    _TORCH = {"Size", "float32", "float16", "bfloat16", "float64", "int64", "int32", "int16", "int8",
              "uint8", "bool", "strided", "contiguous_format", "preserve_format", "complex64"}
    _OTHER = {("collections", "OrderedDict"), ("torch._utils", "_rebuild_tensor_v2"), ("builtins", "slice")}

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
def _tensors_only(osd: dict) -> dict:
    return {k: v for k, v in osd.items() if torch.is_tensor(v)}


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
    state = {"model": get_model_state_dict(model),
             "optim": _tensors_only(get_optimizer_state_dict(model, opt, options=_OPT)),
             "train": train_tensors}
    dcp.save(state, checkpoint_id=str(tmp / DCP_DIR))
    if ranks.is_main:
        with open(tmp / "config.json", "w") as fh:
            json.dump({**meta, "format": FORMAT}, fh, indent=2)
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


def load(directory: Path, model, opt, train_tensors: dict[str, torch.Tensor]) -> None:
    """Every rank calls this: fills model, optimizer and `train_tensors` (in place) from a sharded
    checkpoint saved at any world size, by DDP or FSDP."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    osd = get_optimizer_state_dict(model, opt, options=_OPT)  # allocates the state to load into
    state = {"model": get_model_state_dict(model), "optim": _tensors_only(osd), "train": train_tensors}
    _read(directory, state)
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, opt, {**osd, **state["optim"]}, options=_OPT)


def _read(directory: Path, state: dict) -> None:
    try:
        dcp.load(state, storage_reader=SafeReader(str(Path(directory) / DCP_DIR)))
    except LlmlabError:
        raise
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
