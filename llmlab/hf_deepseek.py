"""DeepSeek-V2 / V3 (`DeepseekV2ForCausalLM`, `DeepseekV3ForCausalLM`) <-> llmlab's `mla` attention
and `moe` MLP: config fields, weight names and the rope channel layout. Used by llmlab.hf; imports
nothing of it (transformers is passed in).

Which HF class: DeepSeek-V2 routes with softmax scores (topk_method "greedy", or
"group_limited_greedy" = llmlab's n_group/topk_group scored by each group's best expert) and never
normalises the top-k weights; DeepSeek-V3 routes with sigmoid scores, a selection-only
e_score_correction_bias (= llmlab's router.bias, the balancing bias), groups scored by their two best
experts, and optional normalisation. So an llmlab model exports to V3 when moe_score is "sigmoid",
to V2 when it is "softmax" (or when it has no MoE layer). Layers before first_k_dense_replace hold a
dense SwiGLU (`mlp.gate_proj/up_proj/down_proj`), the others `mlp.gate` (router), `mlp.experts`
(gate_up_proj (E, 2I, D), down_proj (E, D, I): exactly llmlab's Experts.fc / .proj) and
`mlp.shared_experts` (one SwiGLU of n_shared_experts x moe_intermediate_size).

Rope layout: transformers' DeepSeek-V2 rotates *adjacent* channel pairs (x[2i], x[2i+1]) as one
complex number, and V3 does the same when `rope_interleave` is true (its default, and the layout of
DeepSeek's checkpoints), while llmlab's `apply_rope` rotates (x[i], x[i + d_r/2]) (the half split of
Llama checkpoints), both with angle p·θ^(-2i/d_r). Reordering the rope rows of the projections that
produce q_pe and k_pe by [0, 2, 4, ..., 1, 3, 5, ...] maps one onto the other; q_pe·k_pe is
unchanged because both sides are reordered alike. Nothing else needs permuting.
"""
from __future__ import annotations

from typing import Callable

import torch

from llmlab.config import ModelConfig
from llmlab.errors import LlmlabError

Row = tuple[str, tuple[str, ...], bool]
ARCHS = ("deepseek_v2", "deepseek_v3")
V2_TOPK = ("greedy", "group_limited_greedy")


def interleaved(c) -> bool:
    """Does this HF config rotate adjacent rope pairs (V2 always, V3 unless rope_interleave=False)?"""
    return c.model_type == "deepseek_v2" or bool(getattr(c, "rope_interleave", True))


def _moe_from_deepseek(c, arch: str) -> dict:
    """The ModelConfig MoE fields of an HF config whose layers from first_k_dense_replace on are MoE."""
    if int(getattr(c, "moe_layer_freq", 1) or 1) != 1:
        raise LlmlabError(f"{arch}: moe_layer_freq={c.moe_layer_freq} (MoE in every n-th layer only) is not supported")
    fields = dict(mlp="moe", n_routed_experts=c.n_routed_experts, n_shared_experts=c.n_shared_experts or 0,
                  num_experts_per_tok=c.num_experts_per_tok, moe_intermediate_size=c.moe_intermediate_size,
                  routed_scaling_factor=float(c.routed_scaling_factor),
                  first_k_dense_replace=c.first_k_dense_replace or None)
    if arch == "deepseek_v2":
        method, score = c.topk_method, getattr(c, "scoring_func", "softmax")
        if method not in V2_TOPK or score != "softmax":
            raise LlmlabError(f"deepseek_v2: routing topk_method={method!r}, scoring_func={score!r} is not supported "
                              f"(transformers' DeepseekV2 runs softmax scores with {' or '.join(V2_TOPK)})")
        if c.norm_topk_prob:
            raise LlmlabError("deepseek_v2: norm_topk_prob=True is ambiguous (transformers' DeepseekV2 ignores it, "
                              "DeepSeek's own code normalises the top-k weights); set it to false or use deepseek_v3")
        grouped = method == "group_limited_greedy" and (c.n_group or 1) > 1
        return fields | dict(moe_score="softmax", norm_topk_prob=False, n_group=c.n_group if grouped else None,
                             topk_group=c.topk_group if grouped else None)
    grouped = (c.n_group or 1) > 1
    return fields | dict(moe_score="sigmoid", norm_topk_prob=bool(c.norm_topk_prob),
                         n_group=c.n_group if grouped else None, topk_group=c.topk_group if grouped else None)


def config_from_deepseek(c, rope: dict) -> ModelConfig:
    """The ModelConfig of an HF DeepseekV2Config / DeepseekV3Config (its RoPE fields, plain or
    YaRN, read by the caller: llmlab.hf.rope_fields)."""
    arch, n_layer = c.model_type, c.num_hidden_layers
    if c.hidden_act not in ("silu", "swish"):
        raise LlmlabError(f"{arch}: MLP activation {c.hidden_act!r} is not supported (only silu / SwiGLU)")
    if (c.num_key_value_heads or c.num_attention_heads) != c.num_attention_heads:
        raise LlmlabError(f"{arch}: num_key_value_heads must equal num_attention_heads "
                          "(MLA's keys come from the latent, one per query head)")
    if not c.qk_rope_head_dim:
        raise LlmlabError(f"{arch}: qk_rope_head_dim must be > 0 (decoupled RoPE)")
    moe = (c.first_k_dense_replace or 0) < n_layer and (c.n_routed_experts or 0) > 0
    mlp = _moe_from_deepseek(c, arch) if moe else dict(mlp="swiglu")
    # V3's MLPs never have biases; V2's have mlp_bias
    attn_bias, mlp_bias = bool(c.attention_bias), arch == "deepseek_v2" and bool(getattr(c, "mlp_bias", False))
    return ModelConfig(
        vocab_size=c.vocab_size, block_size=c.max_position_embeddings, n_layer=n_layer,
        n_head=c.num_attention_heads, n_embd=c.hidden_size, intermediate_size=c.intermediate_size,
        dropout=0.0, bias=attn_bias or mlp_bias, qkv_bias=None if attn_bias == (attn_bias or mlp_bias) else attn_bias,
        tie_embeddings=bool(c.tie_word_embeddings), attention="mla", position="rope",
        **rope, norm="rmsnorm", norm_eps=c.rms_norm_eps,
        kv_lora_rank=c.kv_lora_rank, q_lora_rank=c.q_lora_rank or None, qk_nope_head_dim=c.qk_nope_head_dim,
        qk_rope_head_dim=c.qk_rope_head_dim, v_head_dim=c.v_head_dim, **mlp)


def config_to_deepseek(tf, cfg: ModelConfig, no_ids: dict, rope: dict):
    """(model_type, HF config) for an `mla` + rope + rmsnorm + swiglu/moe ModelConfig."""
    if not (cfg.position == "rope" and cfg.norm == "rmsnorm" and cfg.mlp in ("swiglu", "moe")):
        raise LlmlabError("cannot export to Hugging Face DeepSeek-V2/V3: attention='mla' needs position='rope', "
                          f"norm='rmsnorm', mlp='swiglu' or 'moe' (got {cfg.position!r}, {cfg.norm!r}, {cfg.mlp!r})")
    common = dict(
        vocab_size=cfg.vocab_size, hidden_size=cfg.n_embd, intermediate_size=cfg.ffn_size,
        num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head, num_key_value_heads=cfg.n_head,
        max_position_embeddings=cfg.block_size, rms_norm_eps=cfg.norm_eps, hidden_act="silu",
        rope_parameters=rope, attention_bias=cfg.has_qkv_bias or cfg.bias,
        attention_dropout=cfg.dropout, tie_word_embeddings=cfg.tie_embeddings,
        kv_lora_rank=cfg.latent_dim, q_lora_rank=cfg.q_lora_rank, qk_nope_head_dim=cfg.nope_head_dim,
        qk_rope_head_dim=cfg.rope_head_dim, v_head_dim=cfg.value_head_dim, **no_ids)
    if cfg.mlp == "swiglu":  # every layer dense
        return "deepseek_v2", tf.DeepseekV2Config(mlp_bias=cfg.bias, first_k_dense_replace=cfg.n_layer, **common)
    common.update(n_routed_experts=cfg.routed_experts, n_shared_experts=cfg.shared_experts,
                  num_experts_per_tok=cfg.experts_per_token, moe_intermediate_size=cfg.expert_size,
                  routed_scaling_factor=cfg.routed_scale, first_k_dense_replace=cfg.dense_layers)
    if cfg.router_score == "sigmoid":  # V3 needs n_group: 1 group of all experts is no limit
        return "deepseek_v3", tf.DeepseekV3Config(
            n_group=cfg.n_group or 1, topk_group=cfg.topk_group or 1, norm_topk_prob=cfg.normalize_topk,
            rope_interleave=True, num_mtp_layers=0, **common)
    if cfg.normalize_topk:
        raise LlmlabError("cannot export to Hugging Face DeepSeek-V2: its softmax router never normalises the top-k "
                          "weights (norm_topk_prob=True); use moe_score='sigmoid' (DeepSeek-V3) or norm_topk_prob=False")
    return "deepseek_v2", tf.DeepseekV2Config(
        mlp_bias=cfg.bias, topk_method="group_limited_greedy" if cfg.n_group else "greedy",
        n_group=cfg.n_group, topk_group=cfg.topk_group, norm_topk_prob=False, **common)


def rows(cfg: ModelConfig) -> list[Row]:
    """(our key, HF keys, transposed) for every tensor of a DeepSeek-V2/V3 model (both name them alike)."""
    out: list[Row] = [("tok_emb.weight", ("model.embed_tokens.weight",), False)]
    attn = {"kv_down": "kv_a_proj_with_mqa", "kv_norm": "kv_a_layernorm", "kv_up": "kv_b_proj", "proj": "o_proj"}
    attn.update({"q_down": "q_a_proj", "q_norm": "q_a_layernorm", "q_up": "q_b_proj"} if cfg.q_lora_rank
                else {"q": "q_proj"})
    for i in range(cfg.n_layer):
        b, h = f"blocks.{i}.", f"model.layers.{i}."
        for s in ("weight", "bias"):
            out += [(b + f"attn.{ours}.{s}", (h + f"self_attn.{theirs}.{s}",), False) for ours, theirs in attn.items()
                    if not (s == "bias" and ours.endswith("norm"))]
        if cfg.mlp_for_layer(i) == "moe":
            out += _moe_rows(cfg, b + "mlp.", h + "mlp.")
        else:
            out += _swiglu_rows(b + "mlp.", h + "mlp.")
        out += [(b + "norm1.weight", (h + "input_layernorm.weight",), False),
                (b + "norm2.weight", (h + "post_attention_layernorm.weight",), False)]
    return out + [("norm_f.weight", ("model.norm.weight",), False), ("lm_head.weight", ("lm_head.weight",), False)]


def _swiglu_rows(ours: str, theirs: str) -> list[Row]:
    """Our fused SwiGLU `fc` is HF's gate_proj rows then up_proj rows."""
    return [r for s in ("weight", "bias") for r in (
        (ours + f"fc.{s}", (theirs + f"gate_proj.{s}", theirs + f"up_proj.{s}"), False),
        (ours + f"proj.{s}", (theirs + f"down_proj.{s}",), False))]


def _moe_rows(cfg: ModelConfig, ours: str, theirs: str) -> list[Row]:
    out: list[Row] = [(ours + "router.weight", (theirs + "gate.weight",), False),
                      # V3's selection bias; V2 has none (a zero bias then, and a non-zero one cannot export)
                      (ours + "router.bias", (theirs + "gate.e_score_correction_bias",), False),
                      (ours + "experts.fc", (theirs + "experts.gate_up_proj",), False),
                      (ours + "experts.proj", (theirs + "experts.down_proj",), False)]
    if cfg.shared_experts:  # without shared experts HF still holds zero-size tensors for them
        out += _swiglu_rows(ours + "shared.", theirs + "shared_experts.")
    return out


def _rope_rows(cfg: ModelConfig) -> Callable[[str, torch.Tensor], torch.Tensor]:
    """A function (HF key, tensor) -> index of its rows in the order that puts every rope slice
    from the adjacent-pair layout into the half split (identity for other rows)."""
    d_r, q_dim = cfg.rope_head_dim, cfg.nope_head_dim + cfg.rope_head_dim
    half_split = torch.cat([torch.arange(0, d_r, 2), torch.arange(1, d_r, 2)])

    def index(key: str, t: torch.Tensor) -> torch.Tensor:
        idx = torch.arange(t.shape[0])
        if key.endswith(("q_proj.weight", "q_b_proj.weight")):  # per head: [nope | rope] rows
            idx = idx.view(cfg.n_head, q_dim).clone()
            idx[:, cfg.nope_head_dim:] = idx[:, cfg.nope_head_dim:][:, half_split]
            return idx.reshape(-1)
        if "kv_a_proj_with_mqa" in key:  # [c_kv | k_pe] rows
            idx[cfg.latent_dim:] = idx[cfg.latent_dim:][half_split]
        return idx
    return index


def rope_to_half_split(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """HF-named DeepSeek tensors with their rope rows in llmlab's layout (HF -> llmlab)."""
    index = _rope_rows(cfg)
    return {k: v[index(k, v)] if v.dim() else v for k, v in sd.items()}


def rope_to_adjacent_pairs(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """The inverse reordering (llmlab -> HF)."""
    index = _rope_rows(cfg)
    return {k: v[torch.argsort(index(k, v))] if v.dim() else v for k, v in sd.items()}
