"""Flash MLA decode: attention of absorbed MLA queries over a paged latent cache.

One function, `flash_mla_decode`, picks the implementation: the Triton kernel
(`flash_mla_triton.py`) for CUDA tensors, or on any device when Triton's interpreter is on
(`TRITON_INTERPRET=1`), and the PyTorch reference `flash_mla_reference` everywhere else (and
whenever Triton cannot be imported). `flash_mla_path` says which one a call would take.

The math (DeepSeek-V2 MLA with the key/value up-projections absorbed into the query/output):
each cached token holds one row [c (d_c) | k_pe (d_r)] that serves every head, as key (all D
channels) and as value (the first head_dim_v = d_c channels). For a query head with row
[q_lat (d_c) | q_pe (d_r)]:

    score_j = (q_lat . c_j + q_pe . k_pe_j) * softmax_scale
    lse     = log sum_j exp(score_j)                      (natural log, float32)
    out     = sum_j exp(score_j - lse) * c_j[:head_dim_v]

Causal (FlashMLA's convention): with s_q new query tokens at the end of a sequence of seqlen
cached tokens, query i sits at position seqlen - s_q + i and sees positions <= that. A query row
that sees no token (seqlen == 0, or seqlen < s_q) gets out = 0 and lse = -inf.
"""
from __future__ import annotations

import torch

from llmlab.kernels import dispatch
from llmlab.kernels.dispatch import check_inputs, flash_mla_path  # noqa: F401 - the public names live here too


def flash_mla_reference(q: torch.Tensor, kv_cache: torch.Tensor, block_table: torch.Tensor,
                        cache_seqlens: torch.Tensor, head_dim_v: int, softmax_scale: float,
                        causal: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """PyTorch reference, fp32 math, one sequence at a time: gather the sequence's rows through
    its block table, then plain softmax attention of all heads against them.
    Returns out (B, s_q, H, head_dim_v) in q's dtype and lse (B, H, s_q) float32."""
    check_inputs(q, kv_cache, block_table, cache_seqlens, head_dim_v)
    b, s_q, h, d = q.shape
    bs = kv_cache.shape[1]
    out = torch.zeros(b, s_q, h, head_dim_v, dtype=torch.float32, device=q.device)
    lse = torch.full((b, h, s_q), float("-inf"), dtype=torch.float32, device=q.device)
    for i, n in enumerate(cache_seqlens.tolist()):
        if n <= 0:
            continue
        if n > block_table.shape[1] * bs:
            raise ValueError(f"sequence {i}: length {n} exceeds its block table ({block_table.shape[1]} blocks of {bs})")
        blocks = block_table[i, : -(-n // bs)].long()
        kv = kv_cache[blocks].reshape(-1, d)[:n].float()  # (n, D) this sequence's rows, in order
        s = torch.einsum("qhd,nd->hqn", q[i].float(), kv) * softmax_scale  # (H, s_q, n)
        if causal:
            last = n - s_q + torch.arange(s_q, device=q.device)  # each query's own position
            visible = torch.arange(n, device=q.device)[None, :] <= last[:, None]  # (s_q, n)
            s = s.masked_fill(~visible, float("-inf"))
        row_lse = torch.logsumexp(s, dim=-1)  # (H, s_q); -inf where nothing is visible
        p = torch.exp(s - torch.where(torch.isinf(row_lse), 0.0, row_lse)[..., None])
        out[i] = torch.einsum("hqn,nv->qhv", p, kv[:, :head_dim_v])
        lse[i] = row_lse
    return out.to(q.dtype), lse


def flash_mla_decode(q: torch.Tensor, kv_cache: torch.Tensor, block_table: torch.Tensor,
                     cache_seqlens: torch.Tensor, head_dim_v: int, softmax_scale: float,
                     causal: bool = True, *, num_splits: int | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Absorbed-MLA decode attention over a paged latent cache (FlashMLA's interface).

    q (B, s_q, H, D), kv_cache (num_blocks, block_size, D), block_table (B, max_blocks) int32,
    cache_seqlens (B,) int32 (tokens per sequence, including the s_q new ones; each at most
    max_blocks * block_size: the kernel does not check this, to avoid a device-to-host sync).
    Returns out (B, s_q, H, head_dim_v) in q's dtype and lse (B, H, s_q) float32.
    `num_splits` (Triton path only) overrides the split-KV heuristic."""
    path = dispatch.flash_mla_path(q.device)
    if path == "reference":
        return flash_mla_reference(q, kv_cache, block_table, cache_seqlens, head_dim_v, softmax_scale, causal)
    from llmlab.kernels.flash_mla_triton import flash_mla_triton
    return flash_mla_triton(q, kv_cache, block_table, cache_seqlens, head_dim_v, softmax_scale, causal,
                            num_splits=num_splits)


# One opaque op for torch.compile: a compiled decode step traces through this call as one node
# (the reference's per-sequence loop and the Triton launch stay outside the graph), so a model that
# decodes through the kernel still compiles as one graph.
@torch.library.custom_op("llmlab::flash_mla_decode", mutates_args=())
def flash_mla_decode_op(q: torch.Tensor, kv_cache: torch.Tensor, block_table: torch.Tensor,
                        cache_seqlens: torch.Tensor, head_dim_v: int, softmax_scale: float,
                        causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    out, lse = flash_mla_decode(q, kv_cache, block_table, cache_seqlens, head_dim_v, softmax_scale, causal)
    return out.clone() if out.data_ptr() == q.data_ptr() else out, lse


@flash_mla_decode_op.register_fake
def _(q, kv_cache, block_table, cache_seqlens, head_dim_v, softmax_scale, causal):
    b, s_q, h, _ = q.shape
    return q.new_empty(b, s_q, h, head_dim_v), q.new_empty(b, h, s_q, dtype=torch.float32)
