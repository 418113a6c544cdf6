"""Sharded checkpoints with torch.distributed.checkpoint (DCP), written by every rank at once.

A sharded checkpoint is a directory like a single-process one, with `dcp/` in place of the
safetensors files:
    config.json      {"format": "llmlab-dcp-2", "model": ..., "train": ..., "state": ...} (rank 0)
    tokenizer.json   (rank 0)
    dcp/             shard-0000R-model-00001-of-00001.safetensors, one per rank
It is written into a temporary sibling and renamed into place, like the single-process ones (the
ranks must share the run directory's filesystem). Any world size, DDP or FSDP, resumes it: DCP
reads each rank's part by parameter name. `llmlab convert RUN/last --out DIR` turns it into the
single safetensors checkpoint that sample, eval and to_hf use.

No pickle anywhere. DCP's default FileSystemWriter stores its metadata as a pickle and can route
non-tensor values through torch.load(weights_only=False): loading a planted checkpoint would run
its code. llmlab writes with torch's HuggingFaceStorageWriter instead (each rank's tensors in one
safetensors file; where each chunk sits in the full tensor is JSON in the file's header) and
reads with a HuggingFaceStorageReader that first checks the folder: only regular shard files
(no links, nothing else), and only keys llmlab writes for this model. Only tensors are saved: the
optimizer's hyperparameters are rebuilt from the run's settings. Checkpoints of the earlier
pickle-based format (llmlab-dcp-1) are read by llmlab.training.dcp_legacy, which never unpickles a
global outside an exact allow-list.
"""
from __future__ import annotations

import logging
import re
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import HuggingFaceStorageReader, HuggingFaceStorageWriter
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from llmlab import fsutil
from llmlab.errors import LlmlabError, one_line

FORMAT, LEGACY_FORMAT, DCP_DIR = "llmlab-dcp-2", "llmlab-dcp-1", "dcp"
SHARD_FILE = re.compile(r"shard-\d{5}-model-00001-of-00001\.safetensors")
ADAMW_KEYS = ("step", "exp_avg", "exp_avg_sq")
TRAIN_KEYS = ("rng.torch", "rng.cuda", "sampler.generator")  # checkpoints.py's train tensors


def is_sharded(directory: Path) -> bool:
    return (Path(directory) / DCP_DIR).is_dir()


# ---- what is saved: tensors only, a tied weight once ------------------------------------------
def _tied(model) -> dict[str, str]:
    """{second name: first name} of parameters registered under two names (a tied head)."""
    first: dict[int, str] = {}
    out = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        out.update({name: first[id(p)]} if id(p) in first else {})
        first.setdefault(id(p), name)
    return out


def _model_state(model) -> dict[str, torch.Tensor]:
    """The model's state dict (DTensors under FSDP) without second names of tied weights:
    safetensors stores each storage once."""
    tied = _tied(model)
    return {k: v for k, v in get_model_state_dict(model).items() if k not in tied}


# The optimizer's state is keyed by parameter name ("blocks.0.mlp.fc.weight.exp_avg"), the same
# under DDP and FSDP, so either resumes the other at any world size. (torch's
# get_optimizer_state_dict would do this too, but on an optimizer that has not stepped yet it takes
# a zero-gradient step to create the state, which counts as AdamW's first step and changes the run.)
def _optimizer_tensors(model, opt) -> dict[str, torch.Tensor]:
    return {f"{name}.{k}": v for name, p in model.named_parameters() for k, v in opt.state.get(p, {}).items()
            if torch.is_tensor(v)}


def _empty_adamw_state(model) -> dict[str, torch.Tensor]:
    """Tensors of AdamW's state's shapes (sharded like the parameters), for DCP to load into; the
    optimizer holds only trainable parameters (LoRA: the adapters)."""
    out = {}
    for name, p in _trained(model):
        out |= {f"{name}.step": torch.zeros((), dtype=torch.float32),
                f"{name}.exp_avg": torch.zeros_like(p), f"{name}.exp_avg_sq": torch.zeros_like(p)}
    return out


def _trained(model):
    return [(name, p) for name, p in model.named_parameters() if p.requires_grad]


def allowed_keys(model) -> set[str]:
    """Every key llmlab writes into a sharded checkpoint of `model` (flattened as DCP stores them)."""
    keys = {f"model.{k}" for k in get_model_state_dict(model)}  # the earlier format kept a tied head's 2nd name
    keys |= {f"optim.{name}.{k}" for name, _ in _trained(model) for k in ADAMW_KEYS}
    return keys | {f"train.{k}" for k in TRAIN_KEYS}


# ---- save / load -------------------------------------------------------------------------------
def save(directory: Path, model, opt, train_tensors: dict[str, torch.Tensor], meta: dict, tokenizer,
         ranks) -> None:
    """Every rank calls this (a collective). Writes `directory` atomically: into .NAME.tmp, then
    rank 0 swaps it in (llmlab.fsutil.swap_dir_into_place)."""
    directory = Path(directory)
    tmp = fsutil.tmp_dir_for(directory)
    if ranks.is_main:
        fsutil.fresh_dir(tmp)
    ranks.barrier()
    optim = _optimizer_tensors(model, opt)  # empty before the first step
    state = {"model": _model_state(model), "optim": optim, "train": train_tensors}
    with _quiet_dcp():
        dcp.save(state, storage_writer=HuggingFaceStorageWriter(str(tmp / DCP_DIR), save_distributed=True))
    if ranks.is_main:
        fsutil.write_json(tmp / "config.json", {**meta, "format": FORMAT, "optimizer_state": bool(optim)})
        if tokenizer is not None:
            tokenizer.save(tmp)
        fsutil.swap_dir_into_place(tmp, directory)
    ranks.barrier()


def load(directory: Path, model, opt, train_tensors: dict[str, torch.Tensor], optimizer_state: bool) -> None:
    """Every rank calls this: fills model, optimizer and `train_tensors` (in place) from a sharded
    checkpoint saved at any world size, by DDP or FSDP."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    state = {"model": _model_state(model), "train": train_tensors}
    if optimizer_state:
        state["optim"] = _empty_adamw_state(model)
    _read(directory, state, model)
    model_sd = state["model"] | {dup: state["model"][first] for dup, first in _tied(model).items()}
    set_model_state_dict(model, model_sd)
    if optimizer_state:
        index = {id(p): i for i, p in enumerate(p for g in opt.param_groups for p in g["params"])}
        per_param = {index[id(p)]: {k: state["optim"][f"{name}.{k}"] for k in ADAMW_KEYS}
                     for name, p in _trained(model)}
        opt.load_state_dict({"state": per_param, "param_groups": opt.state_dict()["param_groups"]})


def checkpoint_format(directory: Path) -> str:
    from llmlab import checkpoint as ckpt

    fmt = ckpt.read_meta(Path(directory)).get("format")
    if fmt not in (FORMAT, LEGACY_FORMAT):
        raise LlmlabError(f"{directory} is a sharded checkpoint of an unknown format ({fmt!r}); "
                          "restore it or retrain")
    return fmt


class ShardReader(HuggingFaceStorageReader):
    """torch's safetensors reader, with the folder checked before anything is read: only regular
    files named as llmlab's writer names them (no links, no other files), only keys in `allowed`."""

    def __init__(self, path: str, allowed: set[str]):
        super().__init__(path)
        self.allowed = allowed

    def read_metadata(self):
        folder = Path(self.path)
        files = sorted(folder.iterdir()) if folder.is_dir() and not folder.is_symlink() else []
        for f in files:
            if f.is_symlink() or not f.is_file() or not SHARD_FILE.fullmatch(f.name):
                raise LlmlabError(f"sharded checkpoint {folder} holds {f.name!r}, which llmlab never writes "
                                  "(only regular shard-*.safetensors files); restore it or retrain")
        if not files:
            raise LlmlabError(f"sharded checkpoint {folder} holds no shard files; restore it or retrain")
        try:
            metadata = super().read_metadata()
        except Exception as e:  # noqa: BLE001 - safetensors/JSON errors of a damaged file, whatever their type
            raise LlmlabError(f"sharded checkpoint {folder} is truncated or corrupt ({one_line(e)}); "
                              "restore it or retrain") from None
        unknown = sorted(set(metadata.state_dict_metadata) - self.allowed)
        if unknown:
            raise LlmlabError(f"sharded checkpoint {folder} holds {len(unknown)} tensor(s) this model never has "
                              f"(e.g. {unknown[0]}); it belongs to another model, restore it or retrain")
        return metadata


def _reader(directory: Path, model):
    path, allowed = str(Path(directory) / DCP_DIR), allowed_keys(model)
    if checkpoint_format(directory) == LEGACY_FORMAT:
        from llmlab.training.dcp_legacy import LegacyReader

        return LegacyReader(path, allowed)
    return ShardReader(path, allowed)


@contextmanager
def _quiet_dcp():
    """DCP logs every failure with its traceback before raising it; llmlab reports one line."""
    log = logging.getLogger("torch.distributed.checkpoint")
    level = log.level
    log.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        log.setLevel(level)


def _read(directory: Path, state: dict, model) -> None:
    from torch.distributed.checkpoint.api import CheckpointException

    reader = _reader(directory, model)
    reader.read_metadata()  # checked here first: a bad folder is one LlmlabError, before DCP wraps it
    try:
        with _quiet_dcp():
            dcp.load(state, storage_reader=reader)
    except CheckpointException as e:  # DCP gathers each rank's exception (with its traceback) into one
        for failure in e.failures.values():
            for item in failure if isinstance(failure, tuple) else (failure,):
                if isinstance(item, LlmlabError):
                    raise LlmlabError(str(item)) from None
        raise LlmlabError(f"sharded checkpoint {directory} could not be read ({one_line(e)[:200]}); "
                          "restore it or retrain") from None
    except (OSError, RuntimeError, ValueError, KeyError, AssertionError) as e:
        raise LlmlabError(f"sharded checkpoint {directory} is truncated, corrupt or of another model "
                          f"({one_line(e)[:200]}); restore it or retrain") from None


def load_full_model(directory: Path, model) -> None:
    """Fill a plain (unsharded, single-process) model's weights from a sharded checkpoint."""
    state = {"model": _model_state(model)}  # tensors sharing the parameters' storage: loaded in place
    _read(directory, state, model)


def load_plain(directory: Path):
    """A sharded checkpoint's model (LoRA adapters kept), its weights read into one process."""
    from llmlab import checkpoint as ckpt

    directory = Path(directory)
    if not is_sharded(directory):
        raise LlmlabError(f"{directory} is not a sharded checkpoint (no {DCP_DIR}/ in it); "
                          "pass the last/ directory of a run trained with --parallel")
    model = ckpt.model_from_meta(ckpt.read_meta(directory), directory)
    load_full_model(directory, model)
    return model


def to_single(directory: Path, out: Path) -> Path:
    """`llmlab convert`: a sharded checkpoint -> one safetensors checkpoint (weights, config,
    tokenizer; no optimizer state) that sample, eval and to_hf load."""
    from llmlab import checkpoint as ckpt

    model = load_plain(directory)
    return ckpt.save_plain(out, model, ckpt.read_meta(Path(directory)), Path(directory))


def gather_to_single(out: Path, model, config, tokenizer, train_args: dict, state: dict, ranks) -> None:
    """Every rank calls this: the full weights gathered (to rank 0's CPU) and written by rank 0 as
    a single safetensors checkpoint (best/ of a --parallel run, so sample and eval read it)."""
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if ranks.is_main:
        from llmlab import checkpoint as ckpt, lora
        from llmlab.model import Transformer

        with torch.random.fork_rng(devices=[]):  # rank 0's RNG must stay in step with the others'
            plain = Transformer(config, model.runtime)
            if lora.adapted(model) is not None:  # a LoRA run's best/ keeps its adapters, as last/ does
                lora.inject(plain, lora.adapted(model))
        plain.load_state_dict(full)
        ckpt.save_checkpoint(Path(out), plain, tokenizer, train_args, state)
    ranks.barrier()
