"""The typed model configuration: one dataclass picks every swappable piece of the decoder."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional

from llmlab.errors import LlmlabError

# The kinds each field may take. A later rung adds a kind here and a module in llmlab/model/.
ATTENTION_KINDS = ("mha",)  # multi-head (with n_kv_head < n_head: GQA / MQA)
ATTN_BACKENDS = ("manual", "sdpa")
POSITION_KINDS = ("learned", "sinusoidal", "rope", "none")
NORM_KINDS = ("layernorm", "rmsnorm")
MLP_KINDS = ("gelu", "gelu_tanh", "swiglu")


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
    attn_backend: str = "sdpa"
    position: str = "learned"
    rope_theta: float = 10000.0
    norm: str = "layernorm"
    norm_eps: float = 1e-5
    mlp: str = "gelu"
    use_cache: bool = True  # generate()'s default: reuse cached keys/values instead of recomputing
    extra: dict[str, Any] = field(default_factory=dict)  # kind-specific settings of later rungs

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

    # ---- checks --------------------------------------------------------------------------
    def validate(self) -> None:
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise LlmlabError(msg)

        for name, kinds in (("attention", ATTENTION_KINDS), ("attn_backend", ATTN_BACKENDS),
                            ("position", POSITION_KINDS), ("norm", NORM_KINDS), ("mlp", MLP_KINDS)):
            value = getattr(self, name)
            need(value in kinds, f"unknown {name} {value!r}; choose one of: {', '.join(kinds)}")
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            need(int(getattr(self, name)) > 0, f"{name} must be a positive integer, got {getattr(self, name)}")
        need(0.0 <= self.dropout < 1.0, f"dropout must be in [0, 1), got {self.dropout}")
        if self.head_dim is None:
            need(self.n_embd % self.n_head == 0,
                 f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head}); "
                 f"pick e.g. n_embd={self.n_head * max(1, round(self.n_embd / self.n_head))}")
        need(self.kv_heads > 0 and self.n_head % self.kv_heads == 0,
             f"n_head ({self.n_head}) must be a multiple of n_kv_head ({self.kv_heads}); "
             "use n_kv_head = n_head (MHA), a divisor of it (GQA) or 1 (MQA)")
        if self.position == "rope":
            need(self.head_size % 2 == 0, f"RoPE needs an even head size, got {self.head_size}")

    # ---- (de)serialisation ---------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
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
