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
MOE_FIELDS = ("n_routed_experts", "n_shared_experts", "num_experts_per_tok", "moe_intermediate_size", "moe_score",
              "norm_topk_prob", "routed_scaling_factor", "n_group", "topk_group", "first_k_dense_replace",
              "moe_capacity_factor")
MOE_SCORES = ("sigmoid", "softmax")


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
    # RoPE stretched to a longer context with YaRN (llmlab.model.yarn), as DeepSeek-V2/V3 ship it; None: plain
    rope_scaling: Optional[str] = None  # "yarn"
    rope_factor: Optional[float] = None  # s: how many times the pretraining context
    rope_original_positions: Optional[int] = None  # L: the pretraining context
    rope_beta_fast: float = 32.0
    rope_beta_slow: float = 1.0
    rope_mscale: float = 0.0  # YaRN's m of the attention factor (0: unset, as in transformers)
    rope_mscale_all_dim: float = 0.0  # m_all (0: unset)
    norm: str = "layernorm"
    norm_eps: float = 1e-5
    mlp: str = "gelu"
    # Multi-head latent attention (attention="mla", DeepSeek-V2 §2.1); None: derived from head_size.
    kv_lora_rank: Optional[int] = None  # d_c, the latent each token's keys and values are compressed to (4*hd)
    q_lora_rank: Optional[int] = None  # d_c' of the query latent; None: full-rank queries
    qk_nope_head_dim: Optional[int] = None  # per-head query/key width without position (hd)
    qk_rope_head_dim: Optional[int] = None  # d_r, the decoupled rotary width (hd/2 with RoPE, else 0)
    v_head_dim: Optional[int] = None  # per-head value width (hd)
    # Mixture of experts (mlp="moe", llmlab/model/moe.py: DeepSeekMoE, DeepSeek-V2 §2.2, V3 §2.1.2); None: the
    # default in brackets. Names as in Hugging Face's DeepseekV2/V3 configs.
    n_routed_experts: Optional[int] = None  # fine-grained routed SwiGLU experts (8)
    n_shared_experts: Optional[int] = None  # always-on experts every token passes through (1; 0: none)
    num_experts_per_tok: Optional[int] = None  # k routed experts per token (2)
    moe_intermediate_size: Optional[int] = None  # each expert's hidden width (ffn_size // (shared + k))
    moe_score: Optional[str] = None  # router scores: "sigmoid" (V3) or "softmax" (V2) (sigmoid)
    norm_topk_prob: Optional[bool] = None  # the k weights divided by their sum (sigmoid: True, softmax: False)
    routed_scaling_factor: Optional[float] = None  # multiplies the routed experts' weights (1.0)
    n_group: Optional[int] = None  # group-limited routing: experts in n_group groups (None: no limit)
    topk_group: Optional[int] = None  # ... of which each token may use the topk_group best
    first_k_dense_replace: Optional[int] = None  # the first k layers keep a dense SwiGLU (0)
    moe_capacity_factor: Optional[float] = None  # training drops assignments past cf*tokens*k/E per expert (none)

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
        if self.mlp in ("swiglu", "moe"):  # Llama: 2/3 of 4*d, rounded up to a multiple of 64 (MoE: its dense layers)
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

    # MoE sizes with their defaults (llmlab/model/moe.py)
    @property
    def routed_experts(self) -> int:
        return 8 if self.n_routed_experts is None else self.n_routed_experts

    @property
    def shared_experts(self) -> int:
        return 1 if self.n_shared_experts is None else self.n_shared_experts

    @property
    def experts_per_token(self) -> int:
        return 2 if self.num_experts_per_tok is None else self.num_experts_per_tok

    @property
    def expert_size(self) -> int:
        """Each expert's hidden width; by default shared + routed-per-token experts add up to the
        dense SwiGLU's width, so a token's active MLP parameters stay those of the dense layer."""
        if self.moe_intermediate_size is not None:
            return self.moe_intermediate_size
        return max(1, self.ffn_size // (self.shared_experts + self.experts_per_token))

    @property
    def router_score(self) -> str:
        return self.moe_score or "sigmoid"

    @property
    def normalize_topk(self) -> bool:
        return self.router_score == "sigmoid" if self.norm_topk_prob is None else self.norm_topk_prob

    @property
    def routed_scale(self) -> float:
        return 1.0 if self.routed_scaling_factor is None else float(self.routed_scaling_factor)

    @property
    def dense_layers(self) -> int:
        return self.first_k_dense_replace or 0

    def mlp_for_layer(self, layer: int) -> str:
        """The MLP kind of block `layer`: an MoE model's first `first_k_dense_replace` blocks are dense SwiGLU."""
        return "swiglu" if self.mlp == "moe" and layer < self.dense_layers else self.mlp

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
        self._validate_rope_scaling(need)
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
        self._validate_moe(need)

    def _validate_rope_scaling(self, need) -> None:
        need(self.rope_scaling in (None, "yarn"), f"rope_scaling must be 'yarn' or unset, got {self.rope_scaling!r}")
        if self.rope_scaling is None:
            return
        need(self.position == "rope", f"rope_scaling applies to position='rope' (got {self.position!r})")
        need(self.rope_factor is not None and self.rope_factor >= 1,
             f"rope_factor (YaRN's context extension) must be >= 1, got {self.rope_factor}")
        need(self.rope_original_positions is not None and self.rope_original_positions > 0,
             f"rope_original_positions (YaRN's pretraining context) must be > 0, got {self.rope_original_positions}")
        need(self.rope_beta_fast > 0 and self.rope_beta_slow > 0,
             f"rope_beta_fast and rope_beta_slow must be > 0, got {self.rope_beta_fast}, {self.rope_beta_slow}")
        need(self.rope_mscale >= 0 and self.rope_mscale_all_dim >= 0, "rope_mscale and rope_mscale_all_dim must be >= 0")

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

    def _validate_moe(self, need) -> None:
        if self.mlp != "moe":
            given = [f for f in MOE_FIELDS if getattr(self, f) is not None]
            need(not given, f"{', '.join(given)} apply to mlp='moe' only (this config has mlp={self.mlp!r})")
            return
        # types were checked first (check_fields: a bool or 2.0 where a count is meant is one line); ranges here
        for name, low in (("n_routed_experts", 1), ("n_shared_experts", 0), ("num_experts_per_tok", 1),
                          ("moe_intermediate_size", 1), ("n_group", 1), ("topk_group", 1),
                          ("first_k_dense_replace", 0)):
            value = getattr(self, name)
            need(value is None or value >= low, f"{name} must be an integer >= {low} (or unset), got {value!r}")
        for name in ("routed_scaling_factor", "moe_capacity_factor"):
            value = getattr(self, name)
            need(value is None or value > 0, f"{name} must be a finite number > 0 (or unset), got {value!r}")
        need(self.moe_score is None or self.moe_score in MOE_SCORES,
             f"moe_score must be one of {', '.join(MOE_SCORES)} (or unset), got {self.moe_score!r}")
        e, k = self.routed_experts, self.experts_per_token
        need(k <= e, f"num_experts_per_tok ({k}) must be <= n_routed_experts ({e})")
        need(self.dense_layers < self.n_layer,
             f"first_k_dense_replace ({self.dense_layers}) must be < n_layer ({self.n_layer}) so some layer is "
             "MoE; for a dense model use mlp='swiglu'")
        need((self.n_group is None) == (self.topk_group is None),
             "group-limited routing needs both n_group and topk_group (or neither)")
        if self.n_group is not None:
            g, tg = self.n_group, self.topk_group
            need(e % g == 0, f"n_group ({g}) must divide n_routed_experts ({e})")
            need(tg <= g, f"topk_group ({tg}) must be <= n_group ({g})")
            need(k <= tg * (e // g), f"num_experts_per_tok ({k}) must be <= topk_group x experts per group "
                                     f"({tg} x {e // g}): the eligible groups must hold k experts")
            need(self.router_score == "softmax" or e // g >= 2,
                 f"sigmoid routing scores a group by its 2 best experts: n_group ({g}) must leave >= 2 experts a group")

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
