"""Hugging Face directories and models <-> llmlab: load a folder (safetensors only, no repository
code), convert both ways, export with the tokenizer, and the `llmlab convert` helpers."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Union

import torch

from llmlab.checkpoint import load, resolve_checkpoint, save_checkpoint
from llmlab.errors import LlmlabError
from llmlab.fsutil import check_out_path, one_line, write_dir_atomically
from llmlab.hf.config import ARCHS, _transformers, config_from_hf, config_to_hf
from llmlab.hf.deepseek import ARCHS as DEEPSEEK
from llmlab.hf.deepseek import interleaved, rope_to_adjacent_pairs, rope_to_half_split
from llmlab.hf.weights import remap, weight_rows
from llmlab.model import Transformer
from llmlab.runtime import Runtime, split_legacy

SAFETENSORS_FILES = ("model.safetensors", "model.safetensors.index.json")


# ---- HF -> llmlab -------------------------------------------------------------------------------
def _hf_classes(tf, arch: str):
    """(config class, model class) of an architecture, named explicitly: llmlab never asks the
    Auto* factories, which could resolve a directory's `auto_map` to code shipped inside it."""
    return {"gpt2": (tf.GPT2Config, tf.GPT2LMHeadModel), "llama": (tf.LlamaConfig, tf.LlamaForCausalLM),
            "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM),
            "deepseek_v2": (tf.DeepseekV2Config, tf.DeepseekV2ForCausalLM),
            "deepseek_v3": (tf.DeepseekV3Config, tf.DeepseekV3ForCausalLM)}[arch]


def _plain_json(path: Path) -> dict:
    try:
        obj = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, ValueError) as e:
        raise LlmlabError(f"{path} is not valid JSON ({one_line(e)})") from None
    if not isinstance(obj, dict):
        raise LlmlabError(f"{path} is not a JSON object")
    return obj


def _check_safetensors_only(path: Path) -> None:
    """Only safetensors weights are read. A shard index may name any file, including a pickled
    `.bin` that transformers would hand to torch.load: every file it names must be a
    `.safetensors` file beside it, or nothing is loaded."""
    index = path / SAFETENSORS_FILES[1]
    if index.is_file():
        weight_map = _plain_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise LlmlabError(f"{index} has no weight_map; restore the index or re-download the model")
        for name in sorted(set(map(str, weight_map.values()))):
            if not name.endswith(".safetensors") or "/" in name or "\\" in name or name.startswith("."):
                raise LlmlabError(f"{index} names {name!r}; llmlab reads only .safetensors shards in the same "
                                  "directory and never unpickles weights (convert them to safetensors first)")
            if not (path / name).is_file():
                raise LlmlabError(f"{index} names shard {name}, which is missing from {path}")
    elif not (path / SAFETENSORS_FILES[0]).is_file():
        raise LlmlabError(f"{path} has no model.safetensors; llmlab never unpickles .bin weights "
                          "(convert them to safetensors first)")


def check_hf_dir(path: Path):
    """(transformers module, model class, HF config) of a local HF model directory, checked
    without reading its weights: a supported architecture, a loadable config, safetensors only."""
    tf = _transformers()
    if not path.is_dir():
        raise LlmlabError(f"{path} is not a directory; from_hf reads a local Hugging Face model directory "
                          "(config.json + model.safetensors), e.g. one written by `huggingface-cli download`")
    if not (path / "config.json").is_file():
        raise LlmlabError(f"{path} holds no Hugging Face model (no config.json)")
    raw = _plain_json(path / "config.json")
    if str(raw.get("format", "")).startswith("llmlab"):
        raise LlmlabError(f"{path} is an llmlab checkpoint, not a Hugging Face model; use llmlab.load")
    arch = raw.get("model_type")
    if arch not in ARCHS:  # decided from the JSON alone: no transformers code path is consulted
        extra = " (its custom code in auto_map is never run)" if "auto_map" in raw else ""
        raise LlmlabError(f"unsupported Hugging Face model_type {arch!r}{extra}; llmlab converts: {', '.join(ARCHS)}")
    config_cls, model_cls = _hf_classes(tf, arch)
    try:
        # llmlab chooses the attention implementation: a name in config.json (a hub kernel, which is code) is never honoured
        hf_config = config_cls.from_pretrained(str(path), local_files_only=True, attn_implementation="eager")
    except Exception as e:  # transformers raises several types for a bad config.json
        raise LlmlabError(f"{path}/config.json is not a loadable Hugging Face config ({one_line(e)})") from None
    config_from_hf(hf_config)  # fail on unsupported models before reading any weights
    _check_safetensors_only(path)
    return tf, model_cls, hf_config


def weight_files(path: Path) -> list[Path]:
    """The safetensors files of a checked HF directory (check_hf_dir): one, or the index's shards."""
    index = path / SAFETENSORS_FILES[1]
    if index.is_file():
        return [path / name for name in sorted(set(map(str, _plain_json(index)["weight_map"].values())))]
    return [path / SAFETENSORS_FILES[0]]


def _load_hf_dir(path: Path):
    tf, model_cls, hf_config = check_hf_dir(path)
    try:
        dtype_kw = "dtype" if int(tf.__version__.split(".")[0]) >= 5 else "torch_dtype"  # renamed in 5.x
        model, info = model_cls.from_pretrained(
            str(path), config=hf_config, use_safetensors=True, local_files_only=True, trust_remote_code=False,
            output_loading_info=True, attn_implementation="eager", **{dtype_kw: torch.float32})
    except Exception as e:
        raise LlmlabError(f"cannot load the Hugging Face model in {path} ({one_line(e)})") from None
    bad = sorted(set(info.get("missing_keys", ())) | {m[0] for m in info.get("mismatched_keys", ())})
    if bad:  # HF would have filled these with random init: refuse instead
        raise LlmlabError(f"{path}/model.safetensors lacks or mis-shapes {len(bad)} weight(s) (e.g. {bad[0]})")
    return model


def from_hf(path_or_model: Union[str, os.PathLike, Any], **overrides: Any) -> Transformer:
    """An llmlab Transformer (fp32, eval mode) from a local HF GPT-2 / Llama / Qwen2 / DeepSeek-V2/V3 directory or
    an already loaded `*ForCausalLM` model. `overrides` replace config fields (e.g. n_layer=2); the
    runtime is llmlab's default (sdpa, dense cache): `model.use_runtime(...)` changes it."""
    if isinstance(path_or_model, (str, os.PathLike)):
        hf_model = _load_hf_dir(Path(path_or_model))
    else:
        hf_model = path_or_model
        if not (hasattr(hf_model, "config") and hasattr(hf_model, "state_dict")):
            raise LlmlabError(f"from_hf needs a directory or a transformers model, got {type(hf_model).__name__}")
        if hasattr(hf_model, "get_output_embeddings") and hf_model.get_output_embeddings() is None:
            raise LlmlabError(f"from_hf needs a *ForCausalLM model (with its LM head), got {type(hf_model).__name__}")
    overrides, legacy = split_legacy(overrides)  # attn_backend= / use_cache= of earlier versions: runtime
    config = config_from_hf(hf_model.config).replace(**overrides)
    model = Transformer(config, Runtime.from_dict(legacy))
    src = {k: v.detach().to("cpu", torch.float32) for k, v in hf_model.state_dict().items()}
    if hf_model.config.model_type in DEEPSEEK and interleaved(hf_model.config):
        src = rope_to_half_split(src, config)
    target = {k: v.shape for k, v in model.state_dict().items()}
    try:
        weights = remap(src, weight_rows(hf_model.config.model_type, config), target, to_hf=False)
    except LlmlabError as e:
        raise LlmlabError(f"{e} (overrides: {', '.join(sorted(overrides))})" if overrides else str(e)) from None
    model.load_state_dict(weights)
    return model.float().eval()


# ---- llmlab -> HF -------------------------------------------------------------------------------
def to_hf(model: Union[Transformer, str, os.PathLike], out_dir: Union[str, os.PathLike],
          tokenizer=None) -> Path:
    """Write `model` (or the checkpoint at that path) as a new HF directory (config.json +
    model.safetensors, + the tokenizer if given) that AutoModelForCausalLM.from_pretrained loads
    with the same logits. The directory is written atomically; an existing non-empty one is refused."""
    tf = _transformers()
    check_out_path(out_dir, "the Hugging Face output directory", directory=True)
    if isinstance(model, (str, os.PathLike)):
        model = load(model)
    arch, hf_config = config_to_hf(model.config)
    cls = _hf_classes(tf, arch)[1]
    hf_model = cls(hf_config)  # randomly initialised, then every tensor is overwritten (strict load)
    target = {k: v.shape for k, v in hf_model.state_dict().items()}
    src = {k: v.detach().to("cpu", torch.float32) for k, v in model.state_dict().items()}
    weights = remap(src, weight_rows(arch, model.config), target, to_hf=True)
    if arch in DEEPSEEK:  # exported with adjacent rope pairs (V3: rope_interleave=True), as DeepSeek's own
        weights = rope_to_adjacent_pairs(weights, model.config)
    hf_model.load_state_dict(weights, strict=True)
    out = check_out_path(out_dir, "the Hugging Face output directory", directory=True)

    def write(tmp: Path) -> None:
        hf_model.eval().save_pretrained(str(tmp))  # safetensors (the only format transformers 5.x writes)
        if tokenizer is not None:
            _save_hf_tokenizer(tokenizer, tmp)

    _write_export(out, write)
    return out


def _write_export(out: Path, write) -> None:
    """Atomic (a kill leaves no config.json without weights); an empty directory is replaced."""
    try:
        if out.is_dir():
            out.rmdir()  # check_out_path let only an empty one through
        write_dir_atomically(out, write)
    except OSError as e:
        raise LlmlabError(f"cannot write {out} ({one_line(e)}); pass a directory you can write to") from None


def _save_hf_tokenizer(tokenizer, directory: Path) -> None:
    """tokenizer.json + tokenizer_config.json that transformers.AutoTokenizer loads, giving the same
    ids as llmlab's tokenizer (byte, char and BPE alike)."""
    from transformers import PreTrainedTokenizerFast

    from llmlab.tokenizer import EOS_TOKEN

    eos = EOS_TOKEN if tokenizer.eos_id is not None else None
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer.to_hf(), eos_token=eos)
    fast.save_pretrained(str(directory))
    # AutoTokenizer must build exactly this class, not the model_type's default tokenizer (GPT-2's
    # would add a prefix space / special tokens and change the ids)
    cfg_path = directory / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")


# ---- CLI helpers --------------------------------------------------------------------------------
def convert_from_hf(src: Union[str, os.PathLike], out_dir: Union[str, os.PathLike]) -> Path:
    """HF directory -> new llmlab run directory `out_dir` with a `last/` checkpoint (written
    atomically; a non-empty `out_dir` is refused, nothing is overwritten). The source's
    tokenizer.json comes along (a byte/char vocabulary llmlab exported becomes that kind again)."""
    from llmlab.tokenizer import TOKENIZER_FILE, check_fits, load_tokenizer

    out = check_out_path(out_dir, "--out", directory=True)
    src = Path(src)
    model = from_hf(src)
    tokenizer = load_tokenizer(src) if (src / TOKENIZER_FILE).is_file() else None
    if tokenizer is not None:
        check_fits(tokenizer, model.config.vocab_size, src)
    target = out / "last"
    try:
        save_checkpoint(target, model, tokenizer=tokenizer)
        _copy_chat_template(src, target)
    except OSError as e:
        raise LlmlabError(f"cannot write {target} ({one_line(e)}); pass a directory you can write to") from None
    return target


def _copy_chat_template(src: Path, target: Path) -> None:
    """The source's chat template (what `llmlab serve` renders chat prompts with), if it has one:
    chat_template.jinja as it is, and of tokenizer_config.json only the template and the bos/eos
    token strings it refers to."""
    from llmlab.fsutil import atomic_write_bytes, atomic_write_json

    if (src / "chat_template.jinja").is_file():
        atomic_write_bytes(target / "chat_template.jinja", (src / "chat_template.jinja").read_bytes())
    if (src / "tokenizer_config.json").is_file():
        try:
            cfg = _plain_json(src / "tokenizer_config.json")
        except LlmlabError:
            return  # no template to take from a broken file; the model itself converted fine
        kept = {k: cfg[k] for k in ("chat_template", "bos_token", "eos_token") if k in cfg}
        if "chat_template" in kept:
            atomic_write_json(target / "tokenizer_config.json", kept)

def convert_to_hf(run_dir: Union[str, os.PathLike], out_dir: Union[str, os.PathLike]) -> Path:
    """llmlab run/checkpoint directory -> new HF directory, with its tokenizer (any kind) as a
    tokenizer.json + tokenizer_config.json that AutoTokenizer loads with the same ids."""
    from llmlab.tokenizer import TOKENIZER_FILE, load_tokenizer

    check_out_path(out_dir, "--to-hf", directory=True)  # before loading anything
    ckpt = resolve_checkpoint(run_dir)
    tokenizer = load_tokenizer(ckpt) if (ckpt / TOKENIZER_FILE).is_file() else None
    return to_hf(load(ckpt), out_dir, tokenizer=tokenizer)


__all__ = ["from_hf", "to_hf", "config_from_hf", "config_to_hf", "convert_from_hf", "convert_to_hf"]
