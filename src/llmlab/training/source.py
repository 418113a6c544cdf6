"""`llmlab train --init-from SRC`: the weights a new run starts from.

SRC is a run directory (its best/, else last/), a checkpoint folder (single or sharded), or a local
Hugging Face model folder of a supported architecture (converted on the fly by llmlab.hf: safetensors
only, no repository code). resolve_source() checks it without reading the weights (plan_run calls
it, before any work) and gives the model config, runtime, tokenizer and preset the run takes from
it; InitSource.state() reads the weights (a LoRA source's adapters folded in) and record() what the
run's metadata keeps: SRC's path and the sha256 of each weights file. Nothing here writes.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from llmlab import checkpoint as ckpt
from llmlab.config import ModelConfig
from llmlab.errors import LlmlabError, one_line
from llmlab.runtime import Runtime
from llmlab.tokenizer import TOKENIZER_FILE, Tokenizer, check_fits, load_tokenizer


@dataclass(frozen=True)
class InitSource:
    path: Path  # SRC as given, absolute
    directory: Path  # the checkpoint or HF folder read
    kind: str  # "llmlab", "llmlab-sharded" or "hf-<model_type>"
    config: ModelConfig
    runtime: Runtime
    tokenizer: Tokenizer
    preset: Optional[str]  # the preset SRC was trained as, if it says
    files: tuple[Path, ...]  # its weights files

    def state(self) -> dict[str, torch.Tensor]:
        """SRC's weights by llmlab parameter name (fp32, CPU)."""
        if self.kind == "llmlab":
            return ckpt.load(self.directory).state_dict()  # a LoRA source comes merged
        if self.kind == "llmlab-sharded":
            from llmlab import lora
            from llmlab.training import dcp

            model = ckpt.model_from_meta(ckpt.read_meta(self.directory), self.directory)
            dcp.load_full_model(self.directory, model)
            return lora.merge(model).state_dict()
        from llmlab.hf import from_hf

        return from_hf(self.directory).state_dict()

    def record(self) -> dict:
        """Where the run started, as its metadata keeps it."""
        return {"path": str(self.path), "format": self.kind,
                "sha256": {str(f.relative_to(self.directory)): _sha256(f) for f in self.files}}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _is_llmlab(directory: Path) -> bool:
    """config.json written by llmlab ({"model": {...}} or a llmlab format), not an HF config."""
    try:
        raw = json.loads((directory / ckpt.CONFIG_FILE).read_bytes().decode("utf-8"))
    except (OSError, ValueError) as e:
        raise LlmlabError(f"--init-from {directory}: its config.json is unreadable or not JSON ({one_line(e)}); "
                          "restore it or pass another source") from None
    return isinstance(raw, dict) and (isinstance(raw.get("model"), dict)
                                      or str(raw.get("format", "")).startswith("llmlab"))


def resolve_source(src: str) -> InitSource:
    """The checked source of `--init-from src`, or one line saying what is wrong with it."""
    path = Path(src).expanduser().absolute()
    if not path.exists():
        raise LlmlabError(f"--init-from {src}: no such directory; pass a run directory, a checkpoint folder or a "
                          "Hugging Face model folder")
    if not path.is_dir():
        raise LlmlabError(f"--init-from {src} is a file; pass a run directory, a checkpoint folder or a Hugging "
                          "Face model folder (config.json + model.safetensors)")
    if (path / ckpt.CONFIG_FILE).is_file() and not _is_llmlab(path):
        return _hf_source(path)
    try:
        directory = ckpt.resolve_checkpoint(path)
    except LlmlabError:
        raise LlmlabError(f"--init-from {src} holds neither an llmlab run or checkpoint nor a Hugging Face model "
                          "(no config.json in it, its best/ or last/)") from None
    return _llmlab_source(path, directory)


def _tokenizer(directory: Path, config: ModelConfig, src: Path) -> Tokenizer:
    if not (directory / TOKENIZER_FILE).is_file():
        raise LlmlabError(f"--init-from {src} has no {TOKENIZER_FILE} beside its weights: a run started from it "
                          "trains with the model's own tokenizer")
    tokenizer = load_tokenizer(directory)
    check_fits(tokenizer, config.vocab_size, f"--init-from {src}")
    return tokenizer


def _llmlab_source(path: Path, directory: Path) -> InitSource:
    from llmlab.presets import PRESETS
    from llmlab.training import dcp

    meta = ckpt.read_meta(directory)
    config, runtime = ckpt.model_config(meta, directory), ckpt.saved_runtime(meta, directory)
    ckpt.lora_settings(meta, directory)  # a corrupt lora section: one line here, before any work
    if dcp.is_sharded(directory):
        kind, files = "llmlab-sharded", tuple(sorted((directory / dcp.DCP_DIR).glob("*.safetensors")))
        if not files:
            raise LlmlabError(f"--init-from {path}: sharded checkpoint {directory} holds no shard files")
    else:
        kind, files = "llmlab", (directory / ckpt.MODEL_FILE,)
        if not files[0].is_file():
            raise LlmlabError(f"--init-from {path}: {directory} has no {ckpt.MODEL_FILE}; llmlab reads weights "
                              "from safetensors only (it never unpickles .pt/.bin files)")
    preset = meta["train"].get("preset")
    return InitSource(path, directory, kind, config, runtime, _tokenizer(directory, config, path),
                      preset if preset in PRESETS else None, files)


def _hf_source(path: Path) -> InitSource:
    from llmlab.hf import check_hf_dir, config_from_hf, weight_files

    try:
        _, _, hf_config = check_hf_dir(path)
    except LlmlabError as e:
        raise LlmlabError(f"--init-from {path}: {e}") from None
    config = config_from_hf(hf_config)
    return InitSource(path, path, f"hf-{hf_config.model_type}", config, Runtime(), _tokenizer(path, config, path),
                      None, tuple(weight_files(path)))
