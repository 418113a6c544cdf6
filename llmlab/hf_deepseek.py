"""DeepSeek-V2 (`DeepseekV2ForCausalLM`) <-> llmlab's `mla` attention: config fields, weight names
and the rope channel layout. Used by llmlab.hf; imports nothing of it (transformers is passed in).

Only dense models convert: every layer's MLP must be the plain SwiGLU (`first_k_dense_replace` ≥
the number of layers); a checkpoint with MoE layers is refused.

Rope layout: transformers' DeepSeek-V2 rotates *adjacent* channel pairs (x[2i], x[2i+1]) as one
complex number, while llmlab's `apply_rope` rotates (x[i], x[i + d_r/2]) (the half split of Llama
checkpoints), both with angle p·θ^(-2i/d_r). Reordering the rope rows of the projections that
produce q_pe and k_pe by [0, 2, 4, ..., 1, 3, 5, ...] maps one onto the other; q_pe·k_pe is
unchanged because both sides are reordered alike. Nothing else needs permuting.
"""
from __future__ import annotations

from typing import Callable

import torch

from llmlab.config import ModelConfig
from llmlab.errors import LlmlabError

Row = tuple[str, tuple[str, ...], bool]


def config_from_deepseek(c, rope_theta: float) -> ModelConfig:
    """The ModelConfig of a dense HF DeepseekV2Config (`rope_theta` read by the caller)."""
    n_layer = c.num_hidden_layers
    if (c.first_k_dense_replace or 0) < n_layer:
        raise LlmlabError(f"deepseek_v2: layers {c.first_k_dense_replace or 0}..{n_layer - 1} are mixture-of-experts "
                          f"(first_k_dense_replace={c.first_k_dense_replace} < {n_layer} layers); llmlab converts "
                          "DeepSeek-V2 models with a dense MLP in every layer only")
    if c.hidden_act not in ("silu", "swish"):
        raise LlmlabError(f"deepseek_v2: MLP activation {c.hidden_act!r} is not supported (only silu / SwiGLU)")
    if (c.num_key_value_heads or c.num_attention_heads) != c.num_attention_heads:
        raise LlmlabError("deepseek_v2: num_key_value_heads must equal num_attention_heads "
                          "(MLA's keys come from the latent, one per query head)")
    if not c.qk_rope_head_dim:
        raise LlmlabError("deepseek_v2: qk_rope_head_dim must be > 0 (decoupled RoPE)")
    attn_bias, mlp_bias = bool(c.attention_bias), bool(getattr(c, "mlp_bias", False))
    return ModelConfig(
        vocab_size=c.vocab_size, block_size=c.max_position_embeddings, n_layer=n_layer,
        n_head=c.num_attention_heads, n_embd=c.hidden_size, intermediate_size=c.intermediate_size,
        dropout=0.0, bias=attn_bias or mlp_bias, qkv_bias=None if attn_bias == (attn_bias or mlp_bias) else attn_bias,
        tie_embeddings=bool(c.tie_word_embeddings), attention="mla", position="rope",
        rope_theta=rope_theta, norm="rmsnorm", norm_eps=c.rms_norm_eps, mlp="swiglu",
        kv_lora_rank=c.kv_lora_rank, q_lora_rank=c.q_lora_rank or None, qk_nope_head_dim=c.qk_nope_head_dim,
        qk_rope_head_dim=c.qk_rope_head_dim, v_head_dim=c.v_head_dim)


def config_to_deepseek(tf, cfg: ModelConfig, no_ids: dict):
    """An HF DeepseekV2Config for an `mla` + rope + rmsnorm + swiglu ModelConfig."""
    if not (cfg.position == "rope" and cfg.norm == "rmsnorm" and cfg.mlp == "swiglu"):
        raise LlmlabError("cannot export to Hugging Face DeepSeek-V2: attention='mla' needs position='rope', "
                          f"norm='rmsnorm', mlp='swiglu' (got {cfg.position!r}, {cfg.norm!r}, {cfg.mlp!r})")
    return tf.DeepseekV2Config(
        vocab_size=cfg.vocab_size, hidden_size=cfg.n_embd, intermediate_size=cfg.ffn_size,
        num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head, num_key_value_heads=cfg.n_head,
        max_position_embeddings=cfg.block_size, rms_norm_eps=cfg.norm_eps, hidden_act="silu",
        rope_theta=float(cfg.rope_theta), attention_bias=cfg.has_qkv_bias or cfg.bias, mlp_bias=cfg.bias,
        attention_dropout=cfg.dropout, tie_word_embeddings=cfg.tie_embeddings,
        first_k_dense_replace=cfg.n_layer,  # every layer dense
        kv_lora_rank=cfg.latent_dim, q_lora_rank=cfg.q_lora_rank, qk_nope_head_dim=cfg.nope_head_dim,
        qk_rope_head_dim=cfg.rope_head_dim, v_head_dim=cfg.value_head_dim, **no_ids)


def rows(n_layer: int, q_lora: bool) -> list[Row]:
    """(our key, HF keys, transposed) for every tensor of a dense DeepSeek-V2 model."""
    out: list[Row] = [("tok_emb.weight", ("model.embed_tokens.weight",), False)]
    attn = {"kv_down": "kv_a_proj_with_mqa", "kv_norm": "kv_a_layernorm", "kv_up": "kv_b_proj", "proj": "o_proj"}
    attn.update({"q_down": "q_a_proj", "q_norm": "q_a_layernorm", "q_up": "q_b_proj"} if q_lora else {"q": "q_proj"})
    for i in range(n_layer):
        b, h = f"blocks.{i}.", f"model.layers.{i}."
        for s in ("weight", "bias"):
            out += [(b + f"attn.{ours}.{s}", (h + f"self_attn.{theirs}.{s}",), False) for ours, theirs in attn.items()
                    if not (s == "bias" and ours.endswith("norm"))]
            out += [(b + f"mlp.fc.{s}", (h + f"mlp.gate_proj.{s}", h + f"mlp.up_proj.{s}"), False),
                    (b + f"mlp.proj.{s}", (h + f"mlp.down_proj.{s}",), False)]
        out += [(b + "norm1.weight", (h + "input_layernorm.weight",), False),
                (b + "norm2.weight", (h + "post_attention_layernorm.weight",), False)]
    return out + [("norm_f.weight", ("model.norm.weight",), False), ("lm_head.weight", ("lm_head.weight",), False)]


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
    return {k: v[index(k, v)] for k, v in sd.items()}


def rope_to_adjacent_pairs(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """The inverse reordering (llmlab -> HF)."""
    index = _rope_rows(cfg)
    return {k: v[torch.argsort(index(k, v))] for k, v in sd.items()}
