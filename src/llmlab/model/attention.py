"""Causal self-attention: multi-head with optional shared key/value heads (GQA, MQA), and the
attention implementations a Runtime picks from (llmlab.runtime): `manual` (q·kᵀ/√d, explicit
mask, softmax, dropout, ·v, as in nanoGPT) or `sdpa` (torch.nn.functional.scaled_dot_product_attention).
An implementation is chosen once, when the model is built or given a runtime (`use_runtime`)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from llmlab.config import ModelConfig
from llmlab.model.cache import CachedTensor, CacheStep
from llmlab.model.positions import Rotary, apply_rope
from llmlab.registry import register


@dataclass(frozen=True)
class AttentionImpl:
    """An attention implementation: `dense(q, k, v, mask, dropout_p)` serves training, prefill and
    reads of a cache; `latent_decode`, where set, computes MLA's cached steps straight from a paged
    pool (a fused kernel) instead of MLA's own absorbed attention. `kinds`: the attention kinds it
    implements (empty: all); `needs_cache`: the cache kind its cached path reads; `min_block_size`: the
    smallest paged-cache block its kernel takes."""
    dense: Callable
    latent_decode: Optional[Callable] = None
    kinds: tuple[str, ...] = ()
    needs_cache: Optional[str] = None
    min_block_size: int = 1


def causal_mask(t: int, s: int, device) -> torch.Tensor:
    """(T, S) boolean, True where allowed: query i (the last T of S positions) sees keys j <= i."""
    return torch.ones(t, s, dtype=torch.bool, device=device).tril(diagonal=s - t)


def manual_attention(q, k, v, mask: Optional[torch.Tensor], dropout_p: float) -> torch.Tensor:
    """q, k: (B, H, T, hd), (B, Hkv, S, hd); v: (B, Hkv, S, hv) with H a multiple of Hkv; mask:
    additive (0 / -inf) or boolean (True = attend), broadcastable to (B, H, T, S), or None for plain
    causal. Scores are scaled by 1/√hd. Query heads are grouped onto their shared k/v head by a
    reshape + broadcast, so the shared heads are never copied."""
    b, h, t, hd = q.shape
    hkv, s = k.shape[1], k.shape[2]
    q = q.view(b, hkv, h // hkv, t, hd)  # (B, Hkv, G, T, hd)
    att = (q @ k.unsqueeze(2).transpose(-2, -1)) * (1.0 / math.sqrt(hd))  # (B, Hkv, G, T, S)
    if mask is None:
        mask = causal_mask(t, s, q.device)
    elif mask.dim() == 4:  # (B|1, 1, T, S) -> (B|1, 1, 1, T, S)
        mask = mask.unsqueeze(2)
    att = att.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else att + mask
    att = F.softmax(att, dim=-1)
    if dropout_p > 0.0:
        att = F.dropout(att, p=dropout_p)
    return (att @ v.unsqueeze(2)).view(b, h, t, v.shape[-1])


def sdpa_attention(q, k, v, mask: Optional[torch.Tensor], dropout_p: float) -> torch.Tensor:
    gqa = k.shape[1] != q.shape[1]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p,
                                          is_causal=mask is None, enable_gqa=gqa)


def decode_attention(q, k, v, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """One query token (T = 1) against the cache, as plain products and sums:
    scores_s = q·k_s/√d + mask_s, p = softmax(scores), out = Σ_s p_s v_s.
    Used under torch.compile, where inductor fuses these into a few vectorised loops; SDPA would
    be an opaque kernel call whose per-call setup outweighs this tiny amount of math."""
    b, h, _, hd = q.shape
    hkv = k.shape[1]
    qg = q.view(b, hkv, h // hkv, 1, hd)  # query heads grouped onto their shared k/v head
    scores = (qg * k.unsqueeze(2)).sum(-1) * (1.0 / math.sqrt(hd))  # (B, Hkv, G, S)
    if mask is not None:  # (B|1, 1, 1, S) additive
        scores = scores + mask.view(mask.shape[0], 1, 1, -1)
    p = F.softmax(scores, dim=-1)
    return (p.unsqueeze(-1) * v.unsqueeze(2)).sum(-2).view(b, h, 1, v.shape[-1])


register("attention_impl", "manual")(AttentionImpl(manual_attention))
register("attention_impl", "sdpa")(AttentionImpl(sdpa_attention))


@register("attention", "mha")
class CausalSelfAttention(nn.Module):
    """MHA when n_kv_head == n_head, GQA when it divides n_head, MQA when it is 1.
    One fused projection yields [q (H·hd) | k (Hkv·hd) | v (Hkv·hd)]."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.kv_heads, config.head_size
        qkv_out = (self.n_head + 2 * self.n_kv_head) * self.head_dim
        self.qkv = nn.Linear(config.n_embd, qkv_out, bias=config.has_qkv_bias)
        self.proj = nn.Linear(self.n_head * self.head_dim, config.n_embd, bias=config.bias)
        self.proj.residual_proj = True  # scaled init (see Transformer._init_weights)
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)
        self.use_impl(AttentionImpl(sdpa_attention))

    def use_impl(self, impl: AttentionImpl) -> None:
        """The implementation this layer computes with (Transformer.use_runtime picks it)."""
        self.attend = impl.dense

    @staticmethod
    def rotary_dim(config: ModelConfig) -> int:
        return config.head_size  # RoPE rotates the whole of every q and k head

    @staticmethod
    def cache_spec(config: ModelConfig) -> dict[str, CachedTensor]:
        """A key and a value per shared head and token, stored (blocks, Hkv, tokens, hd)."""
        per_token = CachedTensor((config.kv_heads, config.head_size), seq_dim=1)
        return {"k": per_token, "v": per_token}

    @staticmethod
    def cache_formula(config: ModelConfig) -> str:
        return f"2*n_kv_head*head_dim = 2*{config.kv_heads}*{config.head_size}"

    def forward(self, x: torch.Tensor, rotary: Rotary = None, step: Optional[CacheStep] = None, layer: int = 0):
        b, t, _ = x.shape
        hd = self.head_dim
        q, k, v = self.qkv(x).split([self.n_head * hd, self.n_kv_head * hd, self.n_kv_head * hd], dim=-1)
        q = q.view(b, t, self.n_head, hd).transpose(1, 2)  # (B, H, T, hd)
        k = k.view(b, t, self.n_kv_head, hd)  # (B, T, Hkv, hd): token-major, as the cache stores it
        v = v.view(b, t, self.n_kv_head, hd)
        if rotary is not None:
            q, k = apply_rope(q, *rotary), apply_rope(k.transpose(1, 2), *rotary).transpose(1, 2)
        if step is None:  # training, or a forward without a cache: plain causal attention
            y = self.attend(q, k.transpose(1, 2), v.transpose(1, 2), None, self.dropout if self.training else 0.0)
        else:
            step.write(layer, k=k, v=v)
            if step.prefill:  # every row starts here: its own tokens are all there is to see
                y = self.attend(q, k.transpose(1, 2), v.transpose(1, 2), step.own_mask(q.dtype), 0.0)
            else:  # (B, Hkv, S, hd) every stored token of each row
                kc, vc, mask = step.read(layer, "k"), step.read(layer, "v"), step.mask(q.dtype)
                y = decode_attention(q, kc, vc, mask) if step.fused and t == 1 else self.attend(q, kc, vc, mask, 0.0)
        y = y.transpose(1, 2).reshape(b, t, self.n_head * hd)
        return self.resid_dropout(self.proj(y))
