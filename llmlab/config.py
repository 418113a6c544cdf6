"""The typed model configuration: one dataclass picks every swappable piece of the decoder."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional

from llmlab.errors import LlmlabError
from llmlab.registry import names
from llmlab.runtime import LEGACY_FIELDS
from llmlab.validate import check_fields

# The kinds each of these fields may take are the names registered by the modules in llmlab/model/
# (llmlab.registry): a later rung adds a module with `@register(...)`, and nothing else lists them.
KIND_FIELDS = ("attention", "position", "norm", "mlp")
MLA_FIELDS = ("kv_lora_rank", "q_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")


@dataclass
class ModelConfig:
    vocab_size: int = 256
    block_size: int = 256  # longest context seen in training (learned positions are this long)
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: Optional[int] = None  # None: = n_head (MHA); 1: MQA; a divisor of n_head: GQA
    n_embd: int = 128
    head_dim: Optional[int] = None  # None: n_embd // n_head
    intermediate_size: Optional[int] = None  # None: 4*n_embd (gelu) or the Llama 8/3 rule (swiglu)
    dropout: float = 0.0
    bias: bool = True  # biases in linear layers and norms
    qkv_bias: Optional[bool] = None  # None: = bias (Qwen2 has qkv bias with bias=False)
    tie_embeddings: bool = True
    attention: str = "mha"
    position: str = "learned"
    rope_theta: float = 10000.0
    norm: str = "layernorm"
    norm_eps: float = 1e-5
    mlp: str = "gelu"
    # Multi-head latent attention (attention="mla", DeepSeek-V2 §2.1); None: derived from head_size.
    kv_lora_rank: Optional[int] = None  # d_c, the latent each token's keys and values are compressed to (4*hd)
    q_lora_rank: Optional[int] = None  # d_c' of the query latent; None: full-rank queries
    qk_nope_head_dim: Optional[int] = None  # per-head query/key width without position (hd)
    qk_rope_head_dim: Optional[int] = None  # d_r, the decoupled rotary width (hd/2 with RoPE, else 0)
    v_head_dim: Optional[int] = None  # per-head value width (hd)

    def __post_init__(self) -> None:
        self.validate()

    # ---- derived sizes -------------------------------------------------------------------
    @property
    def kv_heads(self) -> int:
        return self.n_head if self.n_kv_head is None else self.n_kv_head

    @property
    def head_size(self) -> int:
        return self.head_dim if self.head_dim is not None else self.n_embd // self.n_head

    @property
    def ffn_size(self) -> int:
        if self.intermediate_size is not None:
            return self.intermediate_size
        if self.mlp == "swiglu":  # Llama: 2/3 of 4*d, rounded up to a multiple of 64
            hidden = int(2 * 4 * self.n_embd / 3)
            return 64 * ((hidden + 63) // 64)
        return 4 * self.n_embd

    @property
    def has_qkv_bias(self) -> bool:
        return self.bias if self.qkv_bias is None else self.qkv_bias

    # MLA sizes with their defaults (DeepSeek-V2 uses d_c = 4·d_h and d_r = d_h/2)
    @property
    def latent_dim(self) -> int:
        return self.kv_lora_rank if self.kv_lora_rank is not None else 4 * self.head_size

    @property
    def nope_head_dim(self) -> int:
        return self.qk_nope_head_dim if self.qk_nope_head_dim is not None else self.head_size

    @property
    def rope_head_dim(self) -> int:
        if self.qk_rope_head_dim is not None:
            return self.qk_rope_head_dim
        return self.head_size // 2 if self.position == "rope" else 0

    @property
    def value_head_dim(self) -> int:
        return self.v_head_dim if self.v_head_dim is not None else self.head_size

    # ---- checks --------------------------------------------------------------------------
    def validate(self) -> None:
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise LlmlabError(msg)

        # types first (a bool or 64.5 where an int is meant, a string, NaN/inf): one line, not a traceback later
        check_fields(ModelConfig, {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}, "model config")
        for name in KIND_FIELDS:
            value, kinds = getattr(self, name), names(name)
            need(value in kinds, f"unknown {name} {value!r}; choose one of: {', '.join(kinds)}")
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            need(getattr(self, name) > 0, f"{name} must be a positive integer, got {getattr(self, name)}")
        for name in ("n_kv_head", "head_dim", "intermediate_size"):
            need(getattr(self, name) is None or getattr(self, name) > 0,
                 f"{name} must be a positive integer (or unset), got {getattr(self, name)}")
        need(0.0 <= self.dropout < 1.0, f"dropout must be in [0, 1), got {self.dropout}")
        need(self.rope_theta > 0, f"rope_theta must be a finite number > 0, got {self.rope_theta}")
        need(self.norm_eps >= 0, f"norm_eps must be a finite number >= 0, got {self.norm_eps}")
        if self.head_dim is None:
            need(self.n_embd % self.n_head == 0,
                 f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head}); "
                 f"pick e.g. n_embd={self.n_head * max(1, round(self.n_embd / self.n_head))}")
        need(self.kv_heads > 0 and self.n_head % self.kv_heads == 0,
             f"n_head ({self.n_head}) must be a multiple of n_kv_head ({self.kv_heads}); "
             "use n_kv_head = n_head (MHA), a divisor of it (GQA) or 1 (MQA)")
        if self.attention == "mla":
            self._validate_mla(need)
        else:
            given = [f for f in MLA_FIELDS if getattr(self, f) is not None]
            need(not given, f"{', '.join(given)} apply to attention='mla' only (this config has "
                            f"attention={self.attention!r})")
            if self.position == "rope":
                need(self.head_size % 2 == 0, f"RoPE needs an even head size, got {self.head_size}")

    def _validate_mla(self, need) -> None:
        for name in MLA_FIELDS:
            value = getattr(self, name)
            low = 0 if name == "qk_rope_head_dim" else 1
            need(value is None or (isinstance(value, int) and value >= low),
                 f"{name} must be an integer >= {low} (or unset), got {value!r}")
        need(self.n_kv_head is None, "attention='mla' has no key/value heads to share: leave n_kv_head unset "
                                     "(its keys and values come from one latent per token, kv_lora_rank)")
        need(self.nope_head_dim + self.rope_head_dim > 0, "MLA needs qk_nope_head_dim + qk_rope_head_dim > 0")
        if self.position == "rope":
            need(self.rope_head_dim > 0 and self.rope_head_dim % 2 == 0,
                 f"MLA with RoPE rotates a decoupled slice of qk_rope_head_dim channels, which must be even "
                 f"and > 0 (got {self.rope_head_dim}); set qk_rope_head_dim, e.g. {max(2, self.head_size // 2)}")

    # ---- (de)serialisation ---------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        """A saved config; fields of earlier versions that are not about the weights are dropped
        (attn_backend and use_cache moved to llmlab.runtime.Runtime: see its legacy_runtime)."""
        known = {f.name for f in dataclasses.fields(cls)}
        d = {k: v for k, v in d.items() if k not in LEGACY_FIELDS}
        if d.get("extra") == {}:  # written by llmlab before the typed MLA fields replaced `extra`
            d = {k: v for k, v in d.items() if k != "extra"}
        unknown = sorted(set(d) - known)
        if unknown:
            raise LlmlabError(f"unknown model config field(s): {', '.join(unknown)}")
        return cls(**d)

    def replace(self, **overrides: Any) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise LlmlabError(f"unknown model config field(s): {', '.join(unknown)}")
        return dataclasses.replace(self, **overrides)
