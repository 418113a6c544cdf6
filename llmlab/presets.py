"""The ladder: each rung is a named preset of the one generic decoder (never a copy of the model).

A preset fixes the *kinds* of the parts (attention, positions, norm, MLP) and the runtime defaults
(attention implementation, cache kind: llmlab.runtime); sizes come from the defaults below or from
the user's flags. basic, flash, kv_cache and flash_mla differ from their parent rung only in runtime."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import llmlab.model  # noqa: F401 - registers the parts and implementations the presets name
from llmlab.config import ModelConfig
from llmlab.errors import LlmlabError
from llmlab.runtime import Runtime


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    fields: dict[str, Any] = field(default_factory=dict)  # ModelConfig fields: what the weights are
    runtime: Runtime = field(default_factory=Runtime)  # how they run by default


# A small default model: trains on a 2-core CPU in a couple of minutes.
SMALL = dict(n_layer=4, n_head=4, n_embd=128, block_size=128, dropout=0.0)

PRESETS: dict[str, Preset] = {}


def register(name: str, description: str, runtime: Runtime = Runtime(), **fields: Any) -> None:
    PRESETS[name] = Preset(name, description, fields, runtime)


GPT = dict(attention="mha", position="learned", norm="layernorm", mlp="gelu")

register("basic", "nanoGPT-style GPT: learned positions, hand-written attention (mask + softmax)",
         Runtime(attention="manual", cache="none"), **GPT)
register("flash", "basic on torch scaled_dot_product_attention (fused/flash kernels)",
         Runtime(attention="sdpa", cache="none"), **GPT)
CACHED = GPT
register("kv_cache", "flash + a static KV cache: prefill once, then decode one token per step", **CACHED)
register("mqa", "kv_cache with multi-query attention: all query heads share 1 key/value head",
         **CACHED | dict(n_kv_head=1))
register("gqa", "kv_cache with grouped-query attention: 2 key/value heads shared by groups of query heads",
         **CACHED | dict(n_kv_head=2))
register("naive_mla", "kv_cache with multi-head latent attention (DeepSeek-V2) without RoPE: keys/values from "
         "one cached latent per token", **CACHED | dict(attention="mla", qk_rope_head_dim=0))
register("sinusoidal", "kv_cache with fixed sinusoidal positions (Vaswani et al. 2017): no parameters, any length",
         **CACHED | dict(position="sinusoidal"))
register("rope", "kv_cache with rotary positions (RoFormer): q and k rotated, relative by construction",
         **CACHED | dict(position="rope"))
register("rope_mla", "DeepSeek-V2 MLA with decoupled RoPE: latent + shared rope key cached, absorbed decode; "
         "RMSNorm, SwiGLU, untied", **CACHED | dict(attention="mla", position="rope", norm="rmsnorm",
                                                    mlp="swiglu", bias=False, tie_embeddings=False))
register("flash_mla", "rope_mla decoding through a paged latent cache (blocks of 64) and a fused Triton "
         "MLA decode kernel (FlashMLA-style)", Runtime(attention="flash_mla", cache="paged"),
         **PRESETS["rope_mla"].fields)
register("llama", "Llama architecture: RMSNorm, SwiGLU, RoPE, GQA, no biases, untied head",
         **CACHED | dict(position="rope", norm="rmsnorm", mlp="swiglu", n_kv_head=2, bias=False,
                         tie_embeddings=False))
register("moe", "kv_cache with DeepSeekMoE MLPs: 1 shared + 8 fine-grained routed SwiGLU experts, top-2 by sigmoid "
         "scores, auxiliary-loss-free balancing (DeepSeek-V3)", **CACHED | dict(mlp="moe"))
register("deepseek", "the DeepSeek-V2/V3 block: rope_mla attention + the moe rung's experts, first layer dense; "
         "exports to DeepseekV3ForCausalLM", **PRESETS["rope_mla"].fields | dict(mlp="moe", first_k_dense_replace=1))


def _preset(name: str) -> Preset:
    if name not in PRESETS:
        raise LlmlabError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)} "
                          "(see `llmlab presets`)")
    return PRESETS[name]


def preset_runtime(name: str, **overrides: Any) -> Runtime:
    """A preset's runtime defaults, with overrides."""
    return _preset(name).runtime.replace(**{k: v for k, v in overrides.items() if v is not None})


def preset_model(name: str, runtime: Optional[Runtime] = None, **overrides: Any):
    """Transformer(preset_config(name, **overrides)) running with the preset's runtime (or `runtime`)."""
    from llmlab.model import Transformer

    return Transformer(preset_config(name, **overrides), runtime or preset_runtime(name))

# The rung each one changes (its description says how): `llmlab compare` reports each rung's
# differences from its parent. A rung added without a line here is compared with nothing.
PARENT = {"flash": "basic", "kv_cache": "flash", "mqa": "kv_cache", "gqa": "kv_cache", "naive_mla": "kv_cache",
          "sinusoidal": "kv_cache", "rope": "kv_cache", "rope_mla": "rope", "flash_mla": "rope_mla", "llama": "rope",
          "moe": "kv_cache", "deepseek": "rope_mla"}


def preset_config(name: str, **overrides: Any) -> ModelConfig:
    """The full ModelConfig of a preset: small defaults, then the preset's kinds, then overrides."""
    values = {**SMALL, **_preset(name).fields}
    values.update({k: v for k, v in overrides.items() if v is not None})
    known = set(ModelConfig.__dataclass_fields__)
    unknown = sorted(set(values) - known)
    if unknown:
        raise LlmlabError(f"unknown model setting(s): {', '.join(unknown)}")
    return ModelConfig(**values)
