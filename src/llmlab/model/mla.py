"""Multi-head latent attention (MLA, DeepSeek-V2, arXiv 2405.04434 §2.1 and appendix C).

Keys and values of every head come from one small latent per token, c_kv = RMSNorm(W_DKV x)
(d_c wide), so the cache holds only c_kv, plus, with RoPE, one rotated rope key k_pe = RoPE(W_KR x)
(d_r wide) shared by all heads: (d_c + d_r) values per token and layer instead of MHA's
2·n_head·head_dim. Per head h:

    k_h = [W_UK_h c_kv | k_pe],  v_h = W_UV_h c_kv,  q_h = [q_nope_h | RoPE(q_pe_h)]
    score_h(s) = q_h · k_h(s) / √(d_nope + d_r)

RoPE cannot be folded into the latent (its rotation depends on the position, which would tie W_UK
to it), hence the decoupled rope slice. Training and prefill decompress keys and values (kv_up)
and run the runtime's attention implementation. A cached decode step uses weight absorption
(appendix C): q_nope_h · W_UK_h c = (W_UK_hᵀ q_nope_h) · c, so each head's query is folded into
latent space and attends over the cached [c_kv | k_pe] rows directly, like multi-query attention
with one (d_c + d_r)-wide key head whose value is the c_kv part; W_UV_h is applied after the
weighted sum. The cache is never decompressed.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from llmlab.config import ModelConfig
from llmlab.model import yarn
from llmlab.model.attention import AttentionImpl, sdpa_attention
from llmlab.model.cache import CachedTensor, CacheStep
from llmlab.model.layers import linear_weight
from llmlab.model.positions import Rotary, apply_rope
from llmlab.registry import register

LATENT_EPS = 1e-6  # RMSNorm eps of the latents (DeepSeek-V2's, whatever the block norms use)


def flash_mla_latent_decode(q: torch.Tensor, pool: torch.Tensor, table: torch.Tensor, lengths: torch.Tensor,
                            head_dim_v: int, scale: float) -> torch.Tensor:
    """Absorbed queries (B, T, H, d_c + d_r) over a paged pool of latent rows through the fused
    kernel (llmlab.kernels, one opaque op to torch.compile); out (B, T, H, d_c), still latent."""
    from llmlab.kernels import flash_mla_decode_op  # Triton is imported on first use only

    return flash_mla_decode_op(q, pool, table, lengths, head_dim_v, scale, True)[0]


# The flash_mla rung's implementation: dense attention (training, prefill) is SDPA; cached steps
# read the paged latent pool through the FlashMLA-style kernel.
register("attention_impl", "flash_mla")(AttentionImpl(sdpa_attention, latent_decode=flash_mla_latent_decode,
                                                      kinds=("mla",), needs_cache="paged",
                                                      min_block_size=16))


@register("attention", "mla")
class MultiHeadLatentAttention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        h, c = config.n_head, config.n_embd
        self.n_head, self.d_c, self.d_r = h, config.latent_dim, config.rope_head_dim
        self.d_nope, self.d_v = config.nope_head_dim, config.value_head_dim
        q_dim = self.d_nope + self.d_r
        # YaRN checkpoints scale the scores further; the dense implementations scale by 1/√q_dim
        # themselves, so the decompressed path folds the extra factor into the query
        self.score_factor = yarn.softmax_factor(config)
        self.scale = self.score_factor / math.sqrt(q_dim)
        self.q_lora = bool(config.q_lora_rank)
        if self.q_lora:  # queries through their own latent: W_UQ RMSNorm(W_DQ x)
            self.q_down = nn.Linear(c, config.q_lora_rank, bias=config.has_qkv_bias)
            self.q_norm = nn.RMSNorm(config.q_lora_rank, eps=LATENT_EPS)
            self.q_up = nn.Linear(config.q_lora_rank, h * q_dim, bias=False)
        else:
            self.q = nn.Linear(c, h * q_dim, bias=False)
        self.kv_down = nn.Linear(c, self.d_c + self.d_r, bias=config.has_qkv_bias)  # [c_kv | k_pe]
        self.kv_norm = nn.RMSNorm(self.d_c, eps=LATENT_EPS)
        # rows per head: [W_UK_h (d_nope rows) | W_UV_h (d_v rows)], each (.., d_c)
        self.kv_up = nn.Linear(self.d_c, h * (self.d_nope + self.d_v), bias=False)
        self.proj = nn.Linear(h * self.d_v, c, bias=config.bias)
        self.proj.residual_proj = True  # scaled init (see Transformer._init_weights)
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)
        self.absorb = True  # how cached steps are computed (tests switch it off to compare)
        self.use_impl(AttentionImpl(sdpa_attention))

    def use_impl(self, impl: AttentionImpl) -> None:
        """The implementation this layer computes with (Transformer.use_runtime picks it)."""
        self.attend, self.latent_decode = impl.dense, impl.latent_decode

    @staticmethod
    def rotary_dim(config: ModelConfig) -> int:
        return config.rope_head_dim  # only the decoupled rope slice rotates

    @staticmethod
    def cache_spec(config: ModelConfig) -> dict[str, CachedTensor]:
        """One row [c_kv | k_pe] per token, whatever n_head (FlashMLA's paged layout)."""
        return {"kv": CachedTensor((config.latent_dim + config.rope_head_dim,))}

    @staticmethod
    def cache_formula(config: ModelConfig) -> str:
        return f"d_c + d_r = {config.latent_dim} + {config.rope_head_dim}"

    def forward(self, x: torch.Tensor, rotary: Rotary = None, step: Optional[CacheStep] = None, layer: int = 0):
        b, t, _ = x.shape
        q = self.q_up(self.q_norm(self.q_down(x))) if self.q_lora else self.q(x)
        q_nope, q_pe = q.view(b, t, self.n_head, -1).transpose(1, 2).split([self.d_nope, self.d_r], dim=-1)
        c_kv, k_pe = self.kv_down(x).split([self.d_c, self.d_r], dim=-1)  # (B, T, d_c), (B, T, d_r)
        if rotary is not None and self.d_r:
            q_pe = apply_rope(q_pe, *rotary)  # (B, H, T, d_r)
            k_pe = apply_rope(k_pe.unsqueeze(1), *rotary).squeeze(1)  # one head, shared
        kv = torch.cat([self.kv_norm(c_kv), k_pe], dim=-1)  # (B, T, d_c + d_r): what the cache keeps
        if step is None:  # training, or a forward without a cache
            y = self.decompressed_attention(q_nope, q_pe, kv, None, self.dropout if self.training else 0.0)
        else:
            step.write(layer, kv=kv)
            if step.prefill:  # every row starts here: attend over its own latents, decompressed
                y = self.decompressed_attention(q_nope, q_pe, kv, step.own_mask(kv.dtype), 0.0)
            elif self.latent_decode is not None and step.table is not None:  # the kernel reads the pool
                y = self.paged_attention(q_nope, q_pe, step, layer)
            elif self.absorb:  # (B, S, d_c + d_r) every stored latent of each row, never decompressed
                y = self.absorbed_attention(q_nope, q_pe, step.read(layer, "kv"), step.mask(kv.dtype))
            else:
                y = self.decompressed_attention(q_nope, q_pe, step.read(layer, "kv"), step.mask(kv.dtype), 0.0)
        y = y.transpose(1, 2).reshape(b, t, self.n_head * self.d_v)  # (B, T, H·d_v)
        return self.resid_dropout(self.proj(y))

    def decompressed_attention(self, q_nope, q_pe, kv, mask: Optional[torch.Tensor], dropout_p: float):
        """Keys and values of every head from the latents (training, prefill): (B, H, T, d_v).
        mask: (B, 1, T, S) additive, or None for plain causal."""
        b, s, _ = kv.shape
        c_kv, k_pe = kv.split([self.d_c, self.d_r], dim=-1)
        k_nope, v = self.kv_up(c_kv).view(b, s, self.n_head, -1).transpose(1, 2).split([self.d_nope, self.d_v], -1)
        k = torch.cat([k_nope, k_pe.unsqueeze(1).expand(b, self.n_head, s, self.d_r)], dim=-1)
        q = torch.cat([q_nope, q_pe], dim=-1)
        return self.attend(q * self.score_factor if self.score_factor != 1.0 else q, k, v, mask, dropout_p)

    def absorbed_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(W_UK (H, d_nope, d_c), W_UV (H, d_v, d_c)): views of kv_up, nothing copied (with a LoRA
        adapter on kv_up: of its base weight plus the adapter's delta)."""
        w = linear_weight(self.kv_up).view(self.n_head, self.d_nope + self.d_v, self.d_c)
        return w[:, : self.d_nope], w[:, self.d_nope:]

    def absorbed_query(self, q_nope: torch.Tensor, q_pe: torch.Tensor) -> torch.Tensor:
        """[W_UK_hᵀ q_nope_h | q_pe_h]: (B, H, T, d_c + d_r), a query against the cached rows."""
        w_uk, _ = self.absorbed_weights()
        return torch.cat([torch.einsum("bhtn,hnc->bhtc", q_nope, w_uk), q_pe], dim=-1)

    def absorbed_attention(self, q_nope, q_pe, kv, mask: Optional[torch.Tensor]):
        """Attention over the latent rows kv (B, S, d_c + d_r) without decompressing them:
        p = softmax(q_abs · kv_s · scale + mask), out_h = W_UV_h Σ_s p_s c_kv_s. (B, H, T, d_v)."""
        _, w_uv = self.absorbed_weights()
        scores = torch.einsum("bhtd,bsd->bhts", self.absorbed_query(q_nope, q_pe), kv) * self.scale
        if mask is not None:  # (B, 1, T, S) additive
            scores = scores + mask
        p = F.softmax(scores, dim=-1, dtype=torch.float32).to(kv.dtype)
        o_latent = torch.einsum("bhts,bsc->bhtc", p, kv[..., : self.d_c])  # (B, H, T, d_c)
        return torch.einsum("bhtc,hvc->bhtv", o_latent, w_uv)

    def paged_attention(self, q_nope, q_pe, step: CacheStep, layer: int):
        """The absorbed cached step through the implementation's paged-latent kernel (FlashMLA's
        interface): q (B, T, H, d_c + d_r) against the layer's pool; the latent output (B, T, H,
        d_c) is brought to values by W_UV."""
        _, w_uv = self.absorbed_weights()
        q = self.absorbed_query(q_nope, q_pe).transpose(1, 2).contiguous()
        pool = step.cache.pools[layer]["kv"]
        out = self.latent_decode(q, pool, step.table, step.lengths, self.d_c, self.scale)
        return torch.einsum("bthc,hvc->bhtv", out, w_uv)  # (B, H, T, d_v)
