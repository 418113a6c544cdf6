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

import os
import warnings

import torch

try:  # Triton is an optional extra (`pip install llmlab[kernels]`)
    import triton  # noqa: F401
    _HAVE_TRITON = True
except ImportError:  # pragma: no cover - depends on the environment
    _HAVE_TRITON = False


def _env_interpret() -> bool:
    """TRITON_INTERPRET as Triton reads it (its knobs read os.environ on every access)."""
    try:
        from triton import knobs
        return bool(knobs.runtime.interpret)
    except (ImportError, AttributeError):  # older Triton: the plain variable
        return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def _triton_interpreted() -> bool:
    """Whether Triton runs in interpreter mode in this process. Triton 3.x consults
    TRITON_INTERPRET when `@triton.jit` decorates a function, and its own language helpers
    (tl.cdiv, tl.max, tl.sum, ...) are decorated when triton.language is first imported: the
    mode is fixed then, for the whole process. (Our kernels are decorated lazily in the same
    mode, see flash_mla_triton._kernels.)"""
    from triton.language import standard
    from triton.runtime.jit import JITFunction
    return not isinstance(standard.cdiv, JITFunction)


_warned = False


def flash_mla_path(device: torch.device | str) -> str:
    """Which implementation `flash_mla_decode` uses for tensors on `device`: "triton" (compiled,
    CUDA), "triton-interpret" (Triton's interpreter) or "reference" (PyTorch).
    CPU tensors take the interpreter only when TRITON_INTERPRET=1 is set now AND was set when
    triton was first imported (otherwise the interpreter cannot run; this warns once and uses the
    reference). In a process whose Triton is in interpreter mode, CUDA tensors use it too: the
    compiler cannot run there."""
    global _warned
    if not _HAVE_TRITON:
        return "reference"
    interpreted = _triton_interpreted()
    if torch.device(device).type == "cuda":
        return "triton-interpret" if interpreted else "triton"
    if not _env_interpret():
        return "reference"
    if not interpreted:
        if not _warned:
            warnings.warn("TRITON_INTERPRET=1 was set after triton was imported, too late for Triton's "
                          "interpreter (set it before Python starts); flash_mla_decode uses the PyTorch reference")
            _warned = True
        return "reference"
    return "triton-interpret"


def check_inputs(q, kv_cache, block_table, cache_seqlens, head_dim_v) -> None:
    """Shape/dtype checks shared by both implementations (user errors -> ValueError)."""
    if q.dim() != 4:
        raise ValueError(f"q must be (batch, s_q, heads, D), got shape {tuple(q.shape)}")
    if kv_cache.dim() != 3:
        raise ValueError(f"kv_cache must be (num_blocks, block_size, D), got shape {tuple(kv_cache.shape)}")
    b, _, _, d = q.shape
    if kv_cache.shape[-1] != d:
        raise ValueError(f"q's last dim {d} != kv_cache's last dim {kv_cache.shape[-1]}")
    if not 0 < head_dim_v <= d:
        raise ValueError(f"head_dim_v must be in 1..{d}, got {head_dim_v}")
    if q.dtype != kv_cache.dtype or q.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"q and kv_cache must share a float dtype (fp32/bf16/fp16), got {q.dtype}, {kv_cache.dtype}")
    if block_table.dim() != 2 or block_table.shape[0] != b or block_table.dtype != torch.int32:
        raise ValueError(f"block_table must be int32 (batch={b}, max_blocks), got {block_table.dtype} {tuple(block_table.shape)}")
    if cache_seqlens.shape != (b,) or cache_seqlens.dtype != torch.int32:
        raise ValueError(f"cache_seqlens must be int32 (batch={b},), got {cache_seqlens.dtype} {tuple(cache_seqlens.shape)}")
    bs = kv_cache.shape[1]
    if bs < 16 or bs & (bs - 1):
        raise ValueError(f"block_size (kv_cache dim 1) must be a power of two >= 16, got {bs}")


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
    path = flash_mla_path(q.device)
    if path == "reference":
        return flash_mla_reference(q, kv_cache, block_table, cache_seqlens, head_dim_v, softmax_scale, causal)
    from llmlab.kernels.flash_mla_triton import flash_mla_triton
    return flash_mla_triton(q, kv_cache, block_table, cache_seqlens, head_dim_v, softmax_scale, causal,
                            num_splits=num_splits)
