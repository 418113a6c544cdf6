"""Hugging Face interop: GPT-2, Llama, Qwen2 and DeepSeek-V2/V3 (MLA, dense or MoE: see
hf_deepseek.py) checkpoints <-> the generic llmlab Transformer.

Conversion is two small steps: the HF config becomes a ModelConfig (or the reverse), and the weights
are renamed by one table per architecture. A table row is (our name, HF name(s), transposed?):

* GPT-2 stores its linears as `Conv1D`, weight [in, out], so each is transposed to nn.Linear's
  [out, in]. Its c_attn is already one fused [q | k | v] projection, the same layout as our `qkv`.
* Llama / Qwen2 keep q_proj, k_proj, v_proj separate; our fused `qkv` is their row concatenation
  (q: n_head*hd rows, then k and v: n_kv_head*hd rows each). gate_proj and up_proj concatenate into
  our fused SwiGLU `fc` (gate rows first). HF's rotate_half RoPE is the half-split layout our
  RotaryPositions uses, so q/k rows need no permutation.

A bias that exists on one side only is filled with zeros when the other side lacks it (e.g. a
bias=False nanoGPT exported as GPT-2, which always has biases): the function is unchanged. A bias
that would have to be dropped while non-zero is an error, never a silent loss. Zero-size tensors
(DeepSeek's shared experts when there are none) carry nothing and need no counterpart.

Only safetensors are read (HF's loader is called with use_safetensors=True) and written
(save_pretrained writes safetensors in transformers 5.x). `transformers` is imported lazily.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Union

import torch

from llmlab.checkpoint import load, read_meta, resolve_checkpoint, save_checkpoint
from llmlab.config import ModelConfig
from llmlab.errors import LlmlabError
from llmlab.fsutil import check_out_path, one_line, write_dir_atomically
from llmlab.hf_deepseek import ARCHS as DEEPSEEK
from llmlab.hf_deepseek import (config_from_deepseek, config_to_deepseek, interleaved, rope_to_adjacent_pairs,
                                rope_to_half_split)
from llmlab.hf_deepseek import rows as deepseek_rows
from llmlab.model import Transformer
from llmlab.runtime import Runtime, split_legacy

ARCHS = ("gpt2", "llama", "qwen2") + DEEPSEEK
GPT2_ACTS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu", "gelu_python": "gelu"}
SAFETENSORS_FILES = ("model.safetensors", "model.safetensors.index.json")
Row = tuple[str, tuple[str, ...], bool]


def _transformers():
    try:
        import transformers
    except ImportError:
        raise LlmlabError("Hugging Face conversion needs the `transformers` package; "
                          "install it with `pip install transformers`") from None
    return transformers


# ---- configs ------------------------------------------------------------------------------------
def rope_fields(c) -> dict:
    """ModelConfig's RoPE fields of a Llama-family / DeepSeek config: its base, and YaRN's settings
    where it stretches RoPE with them; other scalings are refused. transformers 5.x keeps these in
    `rope_parameters`; older versions used rope_theta + rope_scaling."""
    if hasattr(c, "rope_parameters"):
        params = dict(c.rope_parameters or {})
    else:
        params = dict(getattr(c, "rope_scaling", None) or {})
    if params and not any(k in params for k in ("rope_type", "type", "rope_theta")):
        raise LlmlabError(f"{c.model_type}: per-layer RoPE parameters ({', '.join(params)}) are not supported")
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in ("default", "yarn"):
        raise LlmlabError(f"{c.model_type}: RoPE scaling {kind!r} is not supported (plain RoPE and YaRN map to llmlab)")
    if float(params.get("partial_rotary_factor") or 1.0) != 1.0:
        raise LlmlabError(f"{c.model_type}: partial rotary embeddings are not supported")
    theta = params.get("rope_theta", getattr(c, "rope_theta", None))
    try:
        fields = {"rope_theta": float(theta if theta is not None else 10000.0)}
        if kind == "yarn":
            if params.get("attention_factor") is not None or params.get("truncate", True) is False:
                raise LlmlabError(f"{c.model_type}: YaRN with an explicit attention_factor or truncate=false is not "
                                  "supported")
            original = int(params["original_max_position_embeddings"])
            factor = params.get("factor") or c.max_position_embeddings / original
            fields |= dict(rope_scaling="yarn", rope_factor=float(factor), rope_original_positions=original,
                           rope_beta_fast=float(params.get("beta_fast") or 32), rope_beta_slow=float(params.get("beta_slow") or 1),
                           rope_mscale=float(params.get("mscale") or 0), rope_mscale_all_dim=float(params.get("mscale_all_dim") or 0))
    except (TypeError, ValueError, KeyError) as e:
        raise LlmlabError(f"{c.model_type}: RoPE parameters {params} are not numbers llmlab can read "
                          f"({one_line(e)})") from None
    return fields


def rope_parameters(cfg: ModelConfig) -> dict:
    """The HF `rope_parameters` of a ModelConfig (the inverse of rope_fields)."""
    params: dict = {"rope_type": "default", "rope_theta": float(cfg.rope_theta)}
    if cfg.rope_scaling == "yarn":
        params |= {"rope_type": "yarn", "factor": cfg.rope_factor, "original_max_position_embeddings":
                   cfg.rope_original_positions, "beta_fast": cfg.rope_beta_fast, "beta_slow": cfg.rope_beta_slow}
        params |= {k: v for k, v in (("mscale", cfg.rope_mscale), ("mscale_all_dim", cfg.rope_mscale_all_dim)) if v}
    return params


def config_from_hf(c) -> ModelConfig:
    """The ModelConfig of an HF GPT-2 / Llama / Qwen2 / DeepSeek-V2/V3 config (dropout 0: override it to fine-tune)."""
    arch = getattr(c, "model_type", None)
    if arch not in ARCHS:
        raise LlmlabError(f"unsupported Hugging Face model_type {arch!r}; llmlab converts: {', '.join(ARCHS)}")
    if arch == "gpt2":
        act = c.activation_function
        if act not in GPT2_ACTS:
            raise LlmlabError(f"gpt2: activation {act!r} is not supported (use one of {', '.join(GPT2_ACTS)})")
        if not c.scale_attn_weights or c.scale_attn_by_inverse_layer_idx or c.add_cross_attention:
            raise LlmlabError("gpt2: non-standard attention (unscaled, per-layer scaled or cross) is not supported")
        return ModelConfig(
            vocab_size=c.vocab_size, block_size=c.n_positions, n_layer=c.n_layer, n_head=c.n_head,
            n_embd=c.n_embd, intermediate_size=c.n_inner if c.n_inner not in (None, 4 * c.n_embd) else None,
            dropout=0.0, bias=True, tie_embeddings=bool(c.tie_word_embeddings), attention="mha",
            position="learned", norm="layernorm", norm_eps=c.layer_norm_epsilon,
            mlp=GPT2_ACTS[act])
    if arch in DEEPSEEK:  # MLA + RoPE + RMSNorm + SwiGLU / MoE
        return config_from_deepseek(c, rope_fields(c))
    # llama / qwen2: pre-norm RMSNorm + RoPE + SwiGLU
    if c.hidden_act not in ("silu", "swish"):
        raise LlmlabError(f"{arch}: MLP activation {c.hidden_act!r} is not supported (only silu / SwiGLU)")
    if arch == "qwen2" and (getattr(c, "use_sliding_window", False)
                            or any(t != "full_attention" for t in (getattr(c, "layer_types", None) or ()))):
        raise LlmlabError("qwen2: sliding-window attention is not supported (set use_sliding_window=false)")
    rope = rope_fields(c)
    hd = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    kv = c.num_key_value_heads or c.num_attention_heads
    if arch == "llama":  # q/k/v/o share attention_bias; gate/up/down share mlp_bias
        attn_b, mlp_b = bool(getattr(c, "attention_bias", False)), bool(getattr(c, "mlp_bias", False))
        bias, qkv_bias = attn_b or mlp_b, attn_b  # o_proj/MLP biases missing in HF become zeros here
    else:  # qwen2: bias on q/k/v only
        bias, qkv_bias = False, True
    return ModelConfig(
        vocab_size=c.vocab_size, block_size=c.max_position_embeddings, n_layer=c.num_hidden_layers,
        n_head=c.num_attention_heads, n_kv_head=None if kv == c.num_attention_heads else kv,
        n_embd=c.hidden_size, head_dim=None if hd == c.hidden_size // c.num_attention_heads else hd,
        intermediate_size=c.intermediate_size, dropout=0.0, bias=bias,
        qkv_bias=None if qkv_bias == bias else qkv_bias, tie_embeddings=bool(c.tie_word_embeddings),
        attention="mha", position="rope", norm="rmsnorm", **rope,
        norm_eps=c.rms_norm_eps, mlp="swiglu")


def config_to_hf(cfg: ModelConfig):
    """(model_type, HF config) for a ModelConfig, or LlmlabError naming what has no HF equivalent."""
    tf = _transformers()
    shape = f"position={cfg.position!r}, norm={cfg.norm!r}, mlp={cfg.mlp!r}"
    no_ids = dict(bos_token_id=None, eos_token_id=None, pad_token_id=None)  # the model does not know them
    try:
        if cfg.attention == "mla":
            return config_to_deepseek(tf, cfg, no_ids, rope_parameters(cfg))
        if cfg.mlp == "moe":
            raise LlmlabError("cannot export to Hugging Face: mlp='moe' maps to DeepSeek-V2/V3, which need "
                              f"attention='mla' (this model has attention={cfg.attention!r}; e.g. preset deepseek)")
        if cfg.attention != "mha":
            raise LlmlabError(f"cannot export to Hugging Face: attention={cfg.attention!r} has no HF equivalent")
        if cfg.position == "learned" and cfg.norm == "layernorm" and cfg.mlp in ("gelu", "gelu_tanh"):
            if cfg.kv_heads != cfg.n_head or cfg.head_size * cfg.n_head != cfg.n_embd:
                raise LlmlabError("cannot export to Hugging Face GPT-2: it needs n_kv_head = n_head and "
                                  f"head_dim = n_embd / n_head (got n_kv_head={cfg.kv_heads}, head_dim={cfg.head_size})")
            return "gpt2", tf.GPT2Config(
                vocab_size=cfg.vocab_size, n_positions=cfg.block_size, n_embd=cfg.n_embd, n_layer=cfg.n_layer,
                n_head=cfg.n_head, n_inner=cfg.ffn_size,
                activation_function="gelu_new" if cfg.mlp == "gelu_tanh" else "gelu",
                layer_norm_epsilon=cfg.norm_eps, resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout,
                attn_pdrop=cfg.dropout, tie_word_embeddings=cfg.tie_embeddings, **no_ids)
        if cfg.position == "rope" and cfg.norm == "rmsnorm" and cfg.mlp == "swiglu":
            common = dict(
                vocab_size=cfg.vocab_size, hidden_size=cfg.n_embd, intermediate_size=cfg.ffn_size,
                num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head, num_key_value_heads=cfg.kv_heads,
                max_position_embeddings=cfg.block_size, rms_norm_eps=cfg.norm_eps, hidden_act="silu",
                rope_parameters=rope_parameters(cfg),
                attention_dropout=cfg.dropout, tie_word_embeddings=cfg.tie_embeddings, **no_ids)
            if cfg.head_size * cfg.n_head != cfg.n_embd:
                common["head_dim"] = cfg.head_size
            if cfg.has_qkv_bias and not cfg.bias:  # exactly Qwen2's bias pattern
                return "qwen2", tf.Qwen2Config(**common)
            # Llama biases are all-or-nothing per block part; a missing qkv bias is written as zeros
            return "llama", tf.LlamaConfig(attention_bias=cfg.bias, mlp_bias=cfg.bias, **common)
    except (ValueError, TypeError) as e:  # HF's own config validation
        raise LlmlabError(f"cannot export to Hugging Face: {one_line(e)}") from None
    raise LlmlabError(f"cannot export to Hugging Face: {shape} matches no supported architecture "
                      "(GPT-2 needs learned + layernorm + gelu/gelu_tanh; Llama/Qwen2 need rope + rmsnorm + swiglu)")


# ---- weights ------------------------------------------------------------------------------------
def _rows(arch: str, config: ModelConfig) -> list[Row]:
    """(our key, HF keys, transposed) for every tensor of one architecture."""
    n_layer = config.n_layer
    if arch in DEEPSEEK:
        return deepseek_rows(config)
    if arch == "gpt2":
        rows: list[Row] = [("tok_emb.weight", ("transformer.wte.weight",), False),
                           ("pos.weight", ("transformer.wpe.weight",), False)]
        parts = [("norm1", "ln_1", False), ("attn.qkv", "attn.c_attn", True), ("attn.proj", "attn.c_proj", True),
                 ("norm2", "ln_2", False), ("mlp.fc", "mlp.c_fc", True), ("mlp.proj", "mlp.c_proj", True)]
        for i in range(n_layer):
            for ours, theirs, conv1d in parts:
                b, h = f"blocks.{i}.{ours}", f"transformer.h.{i}.{theirs}"
                rows += [(b + ".weight", (h + ".weight",), conv1d), (b + ".bias", (h + ".bias",), False)]
        return rows + [("norm_f.weight", ("transformer.ln_f.weight",), False),
                       ("norm_f.bias", ("transformer.ln_f.bias",), False),
                       ("lm_head.weight", ("lm_head.weight",), False)]
    rows = [("tok_emb.weight", ("model.embed_tokens.weight",), False)]
    for i in range(n_layer):
        b, h = f"blocks.{i}.", f"model.layers.{i}."
        att, mlp = h + "self_attn.", h + "mlp."
        for s in ("weight", "bias"):
            rows += [(b + f"attn.qkv.{s}", tuple(att + f"{p}_proj.{s}" for p in "qkv"), False),
                     (b + f"attn.proj.{s}", (att + f"o_proj.{s}",), False),
                     (b + f"mlp.fc.{s}", (mlp + f"gate_proj.{s}", mlp + f"up_proj.{s}"), False),
                     (b + f"mlp.proj.{s}", (mlp + f"down_proj.{s}",), False)]
        rows += [(b + "norm1.weight", (h + "input_layernorm.weight",), False),
                 (b + "norm2.weight", (h + "post_attention_layernorm.weight",), False)]
    return rows + [("norm_f.weight", ("model.norm.weight",), False), ("lm_head.weight", ("lm_head.weight",), False)]


def _remap(src: dict[str, torch.Tensor], rows: list[Row], target: dict[str, torch.Size],
           to_hf: bool) -> dict[str, torch.Tensor]:
    """Rename `src` (ours if to_hf, else HF's) into the keys/shapes of `target`."""
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    for ours, theirs, transposed in rows:
        src_keys, dst_keys = ((ours,), theirs) if to_hf else (theirs, (ours,))
        parts = [src.get(k) for k in src_keys]
        used.update(k for k in src_keys if k in src)
        dst = [k for k in dst_keys if k in target]
        if not dst:  # no such tensor on the target side: fine only if it carries nothing
            if any(p is not None and p.any() for p in parts):
                raise LlmlabError(f"weight {src_keys[0]} is non-zero but the target model has no place for it")
            continue
        if len(dst) != len(dst_keys):
            raise LlmlabError(f"target model has only some of {', '.join(dst_keys)}")
        if all(p is None for p in parts) and ours.endswith(".bias"):  # absent bias = zero bias
            for k in dst:
                out[k] = torch.zeros(target[k])
            continue
        if any(p is None for p in parts):
            raise LlmlabError(f"weight {src_keys[parts.index(None)]} is missing from the source model")
        w = torch.cat(parts, dim=0)
        if transposed:
            w = w.t()
        pieces = w.split([target[k][0] for k in dst], dim=0) if len(dst) > 1 else (w,)
        for k, p in zip(dst, pieces):
            if p.shape != target[k]:
                raise LlmlabError(f"weight {k} has shape {tuple(p.shape)} in the source but {tuple(target[k])} "
                                  "in the model built from the config (check the overrides)")
            out[k] = p.contiguous()
    left = sorted(k for k in set(src) - used if src[k].numel())
    if left:
        raise LlmlabError(f"{len(left)} weight(s) have no llmlab equivalent (e.g. {left[0]}); "
                          "the model uses a feature llmlab does not convert")
    for k in set(target) - set(out):
        if not target[k].numel():  # zero-size: nothing to carry
            out[k] = torch.zeros(target[k])
    missing = sorted(set(target) - set(out))
    if missing:
        raise LlmlabError(f"no source weight for {missing[0]} ({len(missing)} missing)")
    return out


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
        weights = _remap(src, _rows(hf_model.config.model_type, config), target, to_hf=False)
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
    weights = _remap(src, _rows(arch, model.config), target, to_hf=True)
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
    from llmlab.tokenizer import TOKENIZER_FILE, load_tokenizer

    out = check_out_path(out_dir, "--out", directory=True)
    src = Path(src)
    model = from_hf(src)
    tokenizer = load_tokenizer(src) if (src / TOKENIZER_FILE).is_file() else None
    if tokenizer is not None and tokenizer.vocab_size > model.config.vocab_size:
        raise LlmlabError(f"{src}/{TOKENIZER_FILE} has {tokenizer.vocab_size} ids but the model only "
                          f"{model.config.vocab_size}; they do not belong together")
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
