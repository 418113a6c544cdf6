"""The experts' matrix multiply: rows sorted by expert, each expert's weight applied to its own
contiguous rows (a "grouped" matmul), with no host sync in the traced graph.

    y[offs[e-1]:offs[e]] = x[offs[e-1]:offs[e]] @ w[e]        x (M, D), w (E, D, H), offs (E,) int32 ends

Two implementations, tested equal (tests/test_moe.py):
* `torch.nn.functional.grouped_mm` (torch._grouped_mm), one kernel for all experts. torch documents it
  for bf16 on CUDA (SM >= 80); torch 2.13 also runs it on CPU (a loop in C++) for bf16 and, eagerly
  only, fp32. Its fake (tracing) implementation accepts bf16 alone, so llmlab picks it for bf16 inputs
  with 16-byte-aligned rows (dims a multiple of 8), i.e. CUDA autocast / bf16 FSDP. Not yet run on a GPU here.
* `expert_mm_loop`, the reference: a Python loop over experts on their row ranges. It reads the
  offsets on the host, so it is registered as a torch custom op (`llmlab::expert_mm_loop`, with a
  fake that gives the (M, H) output shape and an autograd formula): torch.compile sees one opaque
  node and the forward still compiles as one graph. On CPU (fp32 training) that read is no sync at all.
"""
from __future__ import annotations

import torch
from torch import Tensor

IMPLS = ("auto", "grouped", "loop")


@torch.library.custom_op("llmlab::expert_mm_loop", mutates_args=())
def expert_mm_loop(x: Tensor, w: Tensor, offs: Tensor) -> Tensor:
    """Reference grouped matmul: one matmul per expert on its contiguous rows, written in place."""
    out = x.new_empty(x.shape[0], w.shape[2])
    start = 0
    for e, end in enumerate(offs.tolist()):
        if end > start:
            torch.mm(x[start:end], w[e], out=out[start:end])
        start = end
    out[start:].zero_()  # rows past the last expert's (none when every row is assigned)
    return out


@expert_mm_loop.register_fake
def _(x: Tensor, w: Tensor, offs: Tensor) -> Tensor:
    return x.new_empty(x.shape[0], w.shape[2])


@torch.library.custom_op("llmlab::expert_mm_loop_wgrad", mutates_args=())
def expert_mm_loop_wgrad(x: Tensor, grad: Tensor, offs: Tensor) -> Tensor:
    """d(loss)/dw of expert_mm_loop: w[e]'s gradient is x_e^T @ grad_e over its rows (zero if none)."""
    out = x.new_empty(offs.shape[0], x.shape[1], grad.shape[1])
    start = 0
    for e, end in enumerate(offs.tolist()):
        if end > start:
            torch.mm(x[start:end].t(), grad[start:end], out=out[e])
        else:
            out[e].zero_()
        start = end
    return out


@expert_mm_loop_wgrad.register_fake
def _(x: Tensor, grad: Tensor, offs: Tensor) -> Tensor:
    return x.new_empty(offs.shape[0], x.shape[1], grad.shape[1])


def _setup(ctx, inputs, output) -> None:
    x, w, offs = inputs
    ctx.save_for_backward(x, w, offs)


def _backward(ctx, grad: Tensor):
    x, w, offs = ctx.saved_tensors
    gx = expert_mm_loop(grad, w.transpose(1, 2), offs) if ctx.needs_input_grad[0] else None
    gw = expert_mm_loop_wgrad(x, grad, offs) if ctx.needs_input_grad[1] else None
    return gx, gw, None


expert_mm_loop.register_autograd(_backward, setup_context=_setup)


def grouped_mm_fits(x: Tensor, w: Tensor) -> bool:
    """torch's grouped kernel: bf16 (what its fake accepts, so it traces), rows of 16-byte multiples,
    CPU or CUDA (llmlab computes in bf16 on CUDA only where torch says the GPU supports it, SM >= 80)."""
    align = 16 // x.element_size()
    return (x.dtype == w.dtype == torch.bfloat16 and x.shape[1] % align == 0 and w.shape[2] % align == 0
            and x.device.type in ("cpu", "cuda"))


def expert_matmul(x: Tensor, w: Tensor, offs: Tensor, impl: str = "auto") -> Tensor:
    """x (M, D) rows sorted by expert, w (E, D, H), offs (E,) int32 cumulative row counts -> (M, H).
    Under autocast both operands are cast to its dtype first, as torch does for a plain matmul.
    impl: "auto" (grouped kernel where it fits, else the loop), "grouped" or "loop"."""
    if impl not in IMPLS:
        raise ValueError(f"expert matmul impl must be one of {IMPLS}, got {impl!r}")
    if torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
        x, w = x.to(dtype), w.to(dtype)
    else:
        w = w.to(x.dtype)
    if impl == "grouped" or (impl == "auto" and grouped_mm_fits(x, w)):
        return torch.nn.functional.grouped_mm(x, w, offs=offs)
    return expert_mm_loop(x, w, offs)
