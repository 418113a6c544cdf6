"""Triton split-KV kernels for Flash MLA decode (see flash_mla.py for the math and interface).

Stage 1, `_mla_split_kernel`: one program per (group of BLOCK_M query rows, KV split, sequence).
  * Rows fold s_q into the heads: row r = i * H + h is query token i of head h. All s_q * H rows of
    a sequence read the same latent rows, so folding them lets one latent tile serve the whole
    group (for s_q = 2 the latent is read once for 2H rows instead of twice); each row carries its
    own causal limit, seqlen - s_q + i.
  * Per tile of BLOCK_N tokens (inside one page of the cache, found through the block table) it
    loads the latent tile ONCE for all rows of the group and does the score as two dots,
    (rows x d_c) @ (d_c x N) + (rows x d_r) @ (d_r x N), then the value dot (rows x N) @ (N x d_c)
    with the same tile: one latent row is every head's key and value.
  * Flash-style online softmax in base 2 (exp2 is the hardware instruction): scores are
    pre-multiplied by scale * log2(e); running max m, running sum l and an fp32 accumulator are
    rescaled by 2^(m_old - m_new) whenever the max grows.
  * Its share of the sequence: the sequence's tiles are cut into NUM_SPLITS contiguous ranges; a
    program whose range is empty writes lse = -inf and a zero output.
  With one split it writes the final output directly; otherwise fp32 partial outputs + partial LSEs.

Stage 2, `_mla_merge_kernel`: one program per (row, sequence) merges the splits by their LSE:
    lse = log sum_s exp(lse_s),   out = sum_s exp(lse_s - lse) * out_s
(each out_s is normalised within its split, so exp(lse_s - lse) is the split's share of the mass).

Kernels are plain functions wrapped on first use, for the interpreter or the compiler as
flash_mla_path decides: `@triton.jit` at import would pick the mode from TRITON_INTERPRET at that
moment, which need not be Triton's mode (fixed when triton.language was imported).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from llmlab.kernels.dispatch import check_inputs, flash_mla_path

# Untuned defaults (never run on a GPU yet; benchmarks/flash_mla_gpu.py sweeps alternatives):
# 16 rows x 512 fp32 accumulator per program, 32-token tiles (32 x 576 bf16 = 36 KB per stage).
GPU_DEFAULTS = dict(block_m=16, block_n=32, num_warps=4, num_stages=2)
_empty = torch.empty  # every buffer the launcher allocates (tests poison them with NaN)


def _mla_split_kernel(
    Q, KV, BT, SEQ, O_PART, L_PART, OUT, LSE,
    stride_qb, stride_qs, stride_qh, stride_kvb, stride_kvt, stride_btb,
    stride_ob, stride_os, stride_oh, stride_lb, stride_lh,
    H, R, SQ, scale_log2,
    DV: tl.constexpr, DR: tl.constexpr, DVP: tl.constexpr, DRP: tl.constexpr,
    PAGE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
    NUM_SPLITS: tl.constexpr, CAUSAL: tl.constexpr, DIRECT: tl.constexpr,
    DOT_FP32: tl.constexpr, PREC: tl.constexpr,
):
    g = tl.program_id(0)  # row group: fastest axis, so the groups of one sequence run together (L2 reuse)
    split = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)

    rows = g * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < R
    qi = rows // H  # query token of the row
    qh = rows % H  # head of the row
    offs_c = tl.arange(0, DVP)
    offs_r = tl.arange(0, DRP)
    c_ok = offs_c < DV
    r_ok = offs_r < DR

    seqlen = tl.load(SEQ + b)
    n_tiles = tl.cdiv(seqlen, BLOCK_N)
    per_split = tl.cdiv(n_tiles, NUM_SPLITS)
    t_lo = split * per_split
    t_hi = tl.minimum(t_lo + per_split, n_tiles)
    if CAUSAL:
        last = seqlen - SQ + qi  # (BLOCK_M,) last visible position of each row
    else:
        last = tl.zeros([BLOCK_M], dtype=tl.int32) + seqlen - 1

    q_ptr = Q + b * stride_qb + qi * stride_qs + qh * stride_qh
    q_lat = tl.load(q_ptr[:, None] + offs_c[None, :], mask=row_ok[:, None] & c_ok[None, :], other=0.0)
    q_pe = tl.load(q_ptr[:, None] + DV + offs_r[None, :], mask=row_ok[:, None] & r_ok[None, :], other=0.0)
    if DOT_FP32:
        q_lat = q_lat.to(tl.float32)
        q_pe = q_pe.to(tl.float32)

    m = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, DVP], dtype=tl.float32)
    for t in range(t_lo, t_hi):
        start = t * BLOCK_N
        page = tl.load(BT + b * stride_btb + start // PAGE).to(tl.int64)
        slot = start % PAGE + tl.arange(0, BLOCK_N)  # BLOCK_N divides PAGE: a tile never straddles pages
        pos = start + tl.arange(0, BLOCK_N)
        tok_ok = pos < seqlen  # rows past the length are never loaded: stale data in a reused block stays out
        row_ptr = KV + page * stride_kvb + slot * stride_kvt
        c = tl.load(row_ptr[:, None] + offs_c[None, :], mask=tok_ok[:, None] & c_ok[None, :], other=0.0)
        pe = tl.load(row_ptr[:, None] + DV + offs_r[None, :], mask=tok_ok[:, None] & r_ok[None, :], other=0.0)
        if DOT_FP32:
            c = c.to(tl.float32)
            pe = pe.to(tl.float32)
        s = tl.dot(q_lat, tl.trans(c), input_precision=PREC)
        s += tl.dot(q_pe, tl.trans(pe), input_precision=PREC)
        s = s * scale_log2
        visible = tok_ok[None, :] & (pos[None, :] <= last[:, None])
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing visible yet: no NaN
        alpha = tl.exp2(m - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l = l * alpha + tl.sum(p, 1)
        # p is rounded to the cache dtype for the value dot (tensor cores); the interpreter, whose
        # dot works in fp32, rounds it the same way so both paths share the numerics.
        p = p.to(KV.dtype.element_ty)
        if DOT_FP32:
            p = p.to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(p, c, input_precision=PREC)
        m = m_new

    l_safe = tl.where(l == 0.0, 1.0, l)
    o = acc / l_safe[:, None]
    lse = tl.where(l == 0.0, float("-inf"), (m + tl.log2(l_safe)) * 0.6931471805599453)  # log2 -> ln
    if DIRECT:
        o_ptr = OUT + b * stride_ob + qi * stride_os + qh * stride_oh
        tl.store(o_ptr[:, None] + offs_c[None, :], o.to(OUT.dtype.element_ty), mask=row_ok[:, None] & c_ok[None, :])
        tl.store(LSE + b * stride_lb + qh * stride_lh + qi, lse, mask=row_ok)
    else:
        part = (b * R + rows) * NUM_SPLITS + split  # partials are (B, R, NUM_SPLITS, DVP), contiguous
        tl.store(O_PART + part[:, None] * DVP + offs_c[None, :], o, mask=row_ok[:, None])
        tl.store(L_PART + part, lse, mask=row_ok)


def _mla_merge_kernel(
    O_PART, L_PART, OUT, LSE,
    stride_ob, stride_os, stride_oh, stride_lb, stride_lh,
    H, R,
    DV: tl.constexpr, DVP: tl.constexpr, NUM_SPLITS: tl.constexpr, SP: tl.constexpr,
):
    r = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    qi = r // H
    qh = r % H
    offs_s = tl.arange(0, SP)
    offs_c = tl.arange(0, DVP)
    s_ok = offs_s < NUM_SPLITS
    part = (b * R + r) * NUM_SPLITS + offs_s
    lse_s = tl.load(L_PART + part, mask=s_ok, other=float("-inf"))
    o_s = tl.load(O_PART + part[:, None] * DVP + offs_c[None, :], mask=s_ok[:, None], other=0.0)
    m = tl.max(lse_s, 0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp(lse_s - m_safe)  # empty splits (lse_s = -inf) weigh 0
    total = tl.sum(w, 0)
    total_safe = tl.where(total == 0.0, 1.0, total)
    o = tl.sum(w[:, None] * o_s, 0) / total_safe
    lse = tl.where(total == 0.0, float("-inf"), m_safe + tl.log(total_safe))
    tl.store(OUT + b * stride_ob + qi * stride_os + qh * stride_oh + offs_c, o.to(OUT.dtype.element_ty),
             mask=offs_c < DV)
    tl.store(LSE + b * stride_lb + qh * stride_lh + qi, lse)


_KERNELS: dict[bool, tuple] = {}


def _kernels(interpret: bool):
    """(split, merge) kernels for the interpreter or the compiler, decorated on first use and
    explicitly (`triton.jit` would pick the mode from the environment at that moment)."""
    if interpret not in _KERNELS:
        if interpret:
            from triton.runtime.interpreter import InterpretedFunction as wrap
        else:
            from triton.runtime.jit import JITFunction as wrap
        _KERNELS[interpret] = (wrap(_mla_split_kernel), wrap(_mla_merge_kernel))
    return _KERNELS[interpret]


def compile_for_gpu(arch: int = 90, dtype: str = "bf16", d_c: int = 512, d_r: int = 64, page: int = 64,
                    num_splits: int = 4, **config) -> dict:
    """Compile both kernels ahead of time for CUDA compute capability `arch` (90 = H100/H200)
    down to a cubin, with no GPU (Triton ships ptxas): catches the compiler-only failures the
    interpreter cannot see (dot shapes, layouts, shared memory). Returns the split kernel's
    {"shared": bytes of shared memory, "config": launch configuration}."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    cfg = {**GPU_DEFAULTS, **config}
    target = GPUTarget("cuda", arch, 32)
    ints = ["stride_qb", "stride_qs", "stride_qh", "stride_kvb", "stride_kvt", "stride_btb",
            "stride_ob", "stride_os", "stride_oh", "stride_lb", "stride_lh", "H", "R", "SQ"]
    sig = dict(Q="*" + dtype, KV="*" + dtype, BT="*i32", SEQ="*i32", O_PART="*fp32", L_PART="*fp32",
               OUT="*" + dtype, LSE="*fp32", **{n: "i32" for n in ints}, scale_log2="fp32")
    const = dict(DV=d_c, DR=d_r, DVP=_pow2(d_c), DRP=_pow2(d_r), PAGE=page, BLOCK_N=cfg["block_n"],
                 BLOCK_M=cfg["block_m"], NUM_SPLITS=num_splits, CAUSAL=True, DIRECT=num_splits == 1,
                 DOT_FP32=False, PREC="ieee" if dtype == "fp32" else "tf32")
    split = triton.compile(ASTSource(JITFunction(_mla_split_kernel), {**sig, **{k: "constexpr" for k in const}}, const),
                           target=target, options=dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"]))
    msig = dict(O_PART="*fp32", L_PART="*fp32", OUT="*" + dtype, LSE="*fp32", **{n: "i32" for n in ints[6:13]})
    mconst = dict(DV=d_c, DVP=_pow2(d_c), NUM_SPLITS=num_splits, SP=_pow2(num_splits, floor=2))
    triton.compile(ASTSource(JITFunction(_mla_merge_kernel), {**msig, **{k: "constexpr" for k in mconst}}, mconst),
                   target=target, options=dict(num_warps=4))
    return {"shared": split.metadata.shared, "config": cfg}


def choose_num_splits(batch: int, n_row_groups: int, max_tiles: int, num_sms: int) -> int:
    """Split-KV heuristic. Without splits the grid has batch * n_row_groups programs; a small batch
    leaves most SMs idle while each program walks the whole sequence. Aim for ~2 programs per SM
    (so a wave's tail is short), but give every split >= 4 tiles of work (below that the partial
    writes and the merge cost more than the parallelism gains), and at most 32 splits.
    max_tiles comes from the block table's width (an upper bound of the longest sequence), so
    choosing needs no device-to-host sync."""
    want = -(-2 * num_sms // max(1, batch * n_row_groups))
    return max(1, min(want, max_tiles // 4, 32))


def _pow2(n: int, floor: int = 16) -> int:
    return max(floor, 1 << max(0, (n - 1).bit_length()))


def flash_mla_triton(q: torch.Tensor, kv_cache: torch.Tensor, block_table: torch.Tensor,
                     cache_seqlens: torch.Tensor, head_dim_v: int, softmax_scale: float,
                     causal: bool = True, *, num_splits: int | None = None, block_m: int | None = None,
                     block_n: int | None = None, num_warps: int | None = None, num_stages: int | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """The Triton implementation of `flash_mla_decode` (same arguments and results); the keyword
    knobs override the launch configuration (for tests and tuning)."""
    check_inputs(q, kv_cache, block_table, cache_seqlens, head_dim_v)
    path = flash_mla_path(q.device)
    if path == "reference":
        raise RuntimeError("the Triton kernel needs CUDA tensors, or Triton's interpreter: TRITON_INTERPRET=1 "
                           "set before triton is imported")
    interp = path == "triton-interpret"
    b, s_q, h, d = q.shape
    page = kv_cache.shape[1]
    dv, dr = head_dim_v, d - head_dim_v
    rows = s_q * h
    # Interpreter: whole pages and all rows per program (fewer Python-level steps); GPU: defaults.
    block_m = block_m or (_pow2(rows) if interp else GPU_DEFAULTS["block_m"])
    block_n = min(block_n or (page if interp else GPU_DEFAULTS["block_n"]), page)
    if block_m < 16 or block_m & (block_m - 1) or block_n < 16 or page % block_n:
        raise ValueError(f"block_m must be a power of two >= 16 and block_n a power of two >= 16 "
                         f"dividing the block size {page}; got {block_m}, {block_n}")
    n_groups = -(-rows // block_m)
    max_tiles = block_table.shape[1] * (page // block_n)
    if num_splits is None:
        sms = torch.cuda.get_device_properties(q.device).multi_processor_count if q.is_cuda else 4
        num_splits = choose_num_splits(b, n_groups, max_tiles, sms)
    if num_splits < 1:
        raise ValueError(f"num_splits must be >= 1, got {num_splits}")

    if q.stride(-1) != 1:
        q = q.contiguous()
    if kv_cache.stride(-1) != 1:
        kv_cache = kv_cache.contiguous()
    block_table = block_table if block_table.stride(-1) == 1 else block_table.contiguous()
    out = _empty(b, s_q, h, dv, dtype=q.dtype, device=q.device)
    lse = _empty(b, h, s_q, dtype=torch.float32, device=q.device)
    dvp, drp = _pow2(dv), _pow2(dr)
    direct = num_splits == 1
    if direct:  # unused by the kernel (DIRECT writes out/lse), any valid tensor will do
        o_part = l_part = lse
    else:
        o_part = _empty(b, rows, num_splits, dvp, dtype=torch.float32, device=q.device)
        l_part = _empty(b, rows, num_splits, dtype=torch.float32, device=q.device)
    split_kernel, merge_kernel = _kernels(interp)
    # fp32 inputs: true fp32 dots ("ieee"; the default tf32 would cost ~1e-3 relative error).
    prec = "ieee" if q.dtype == torch.float32 else "tf32"
    launch = {} if interp else dict(num_warps=num_warps or GPU_DEFAULTS["num_warps"],
                                    num_stages=num_stages or GPU_DEFAULTS["num_stages"])
    split_kernel[(n_groups, num_splits, b)](
        q, kv_cache, block_table, cache_seqlens, o_part, l_part, out, lse,
        q.stride(0), q.stride(1), q.stride(2), kv_cache.stride(0), kv_cache.stride(1), block_table.stride(0),
        out.stride(0), out.stride(1), out.stride(2), lse.stride(0), lse.stride(1),
        h, rows, s_q, softmax_scale * math.log2(math.e),
        DV=dv, DR=dr, DVP=dvp, DRP=drp, PAGE=page, BLOCK_N=block_n, BLOCK_M=block_m,
        NUM_SPLITS=num_splits, CAUSAL=causal, DIRECT=direct, DOT_FP32=interp, PREC=prec, **launch)
    if not direct:
        merge_kernel[(rows, b)](
            o_part, l_part, out, lse,
            out.stride(0), out.stride(1), out.stride(2), lse.stride(0), lse.stride(1),
            h, rows, DV=dv, DVP=dvp, NUM_SPLITS=num_splits, SP=_pow2(num_splits, floor=2),
            **({} if interp else dict(num_warps=4)))
    return out, lse
