"""Which implementation of a kernel a call takes (shared by the kernels and their dispatchers, so
that no kernel module imports its dispatcher): Triton compiled on CUDA, Triton's interpreter on
the CPU when TRITON_INTERPRET=1 was set before triton was imported, else the PyTorch reference.
Also the Flash MLA decode's input checks, shared by the kernel and the reference."""
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


