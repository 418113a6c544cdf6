"""Hugging Face configs <-> ModelConfig: GPT-2, Llama, Qwen2 here, DeepSeek-V2/V3 in deepseek.py;
RoPE's base and YaRN settings read and written alike for all of them. `transformers` is imported
lazily (only its config classes are used here)."""
from __future__ import annotations

from llmlab.config import ModelConfig
from llmlab.errors import LlmlabError, one_line
from llmlab.hf.deepseek import ARCHS as DEEPSEEK
from llmlab.hf.deepseek import config_from_deepseek, config_to_deepseek

ARCHS = ("gpt2", "llama", "qwen2") + DEEPSEEK
GPT2_ACTS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu", "gelu_python": "gelu"}


def _transformers():
    try:
        import transformers
    except ImportError:
        raise LlmlabError("Hugging Face conversion needs the `transformers` package; "
                          "install it with `pip install transformers`") from None
    return transformers


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


