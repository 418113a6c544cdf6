"""The one-token decode step through `torch.compile` (as gpt-fast does it).

Why it pays: a batch-1 decode step of a small model is hundreds of tiny ops, each paying Python
and dispatcher overhead, and its matrix products are matrix-vector products that a GEMM library
runs far from memory bandwidth. Compiled (the cache is preallocated, the token and slot are fixed
tensors written in place, so every step has the same inputs), the step is one graph: norms, residuals,
the cache write and the attention mask fuse into a few loops, and with `decompose_mm_pass` inductor
turns each (1 x k) @ (k x n) product into a vectorised multiply-and-sum it fuses with its
neighbours instead of calling sgemm.

Only the one-token step is compiled; prefill (any length) stays eager. The cache's length axes are
marked dynamic, so one graph serves every generation of the same model and batch size whatever the
prompt and output lengths: no recompiling, and no cache padded to a bucket size to attend over.
"""
from __future__ import annotations

import types
import warnings
import weakref
from contextlib import nullcontext
from typing import Callable, Optional

import torch

class CompiledOrEager:
    """`compile()`'s function, or `eager` once compiling has failed. torch.compile can refuse at
    once (a Python version dynamo does not support) or at a call (no C++ compiler, an unsupported
    op); either way this warns once and the eager function, which computes the same thing, takes
    over, so a missing compiler never stops a run. Used by decoding and by training."""

    def __init__(self, eager: Callable, compile: Callable[[], Callable], what: str,
                 on_give_up: Optional[Callable[[], None]] = None):
        self.eager, self.what, self.on_give_up = eager, what, on_give_up
        try:
            self.fn: Optional[Callable] = compile()
        except Exception as e:  # noqa: BLE001
            self._give_up(e)

    def _give_up(self, e: Exception) -> None:
        msg = " ".join(str(e).split())[:200]
        warnings.warn(f"torch.compile of {self.what} failed ({type(e).__name__}: {msg}); running it eagerly",
                      RuntimeWarning, stacklevel=3)
        self.fn = None
        if self.on_give_up is not None:
            self.on_give_up()

    def __call__(self, *args):
        if self.fn is not None:
            try:
                return self.fn(*args)
            except Exception as e:  # noqa: BLE001 - compiling failed: the eager function computes the same
                self._give_up(e)
        return self.eager(*args)


# Inductor options for the step: decompose batch-1 matrix products into fused reductions.
COMPILE_OPTIONS = {"post_grad_fusion_options": {"decompose_mm_pass": {}}}



def _decode_step(model, tok: torch.Tensor, cache, slot: torch.Tensor, fused: bool) -> torch.Tensor:
    """tok (B, 1) at cache slot `slot` (1,) -> its next-token logits (B, vocab). The cache's host
    work for this step (a paged cache's block placement) was done before: this only reads tensors."""
    step = cache.begin(slot, tok.shape[0], prefill=False, fused=fused)
    return model(tok, step=step)[:, -1]


def _compile_for_one_model() -> Callable:
    """torch.compile of a private copy of `_decode_step`. Dynamo keeps its compiled graphs (and
    counts recompiles against its limit) per code object, so one shared function would pile the
    graphs of every model decoded in the process onto one list and, past the limit, silently run
    eagerly; a copy of the code object per model gives each model its own list."""
    code = _decode_step.__code__.replace()  # same bytecode, a distinct code object
    fn = types.FunctionType(code, _decode_step.__globals__, _decode_step.__name__)
    return torch.compile(fn, fullgraph=True, options=COMPILE_OPTIONS)


_steps: "weakref.WeakKeyDictionary[torch.nn.Module, CompiledOrEager]" = weakref.WeakKeyDictionary()
_compile_failed = False  # compiling the decode step failed once: later steps run eagerly, unwarned


def _step_for(model) -> Callable:
    """The model's compiled decode step (made on its first use), or the eager one for good once
    compiling has failed in this process (it warned then, once)."""
    global _compile_failed
    if _compile_failed:
        return _decode_step
    if model not in _steps:
        def failed() -> None:
            global _compile_failed
            _compile_failed = True
        _steps[model] = CompiledOrEager(_decode_step, _compile_for_one_model, "the decode step", failed)
    return _steps[model]


class DecodeStep:
    """Callable (tok (B,), slot int) -> next-token logits (B, vocab): one generation's one-token
    decode step on `cache`, through torch.compile when `compile` is set (eager if that fails).

    The token and slot are copied into tensors owned here, so every call sees the same input
    tensors and the compiled graph is reused without recompiling. Compiled, one-token attention is
    computed as fused reductions (the step's `fused` flag), which inductor turns into a few loops."""

    def __init__(self, model, cache, compile: bool = False):
        device = model.tok_emb.weight.device
        self.model, self.cache = model, cache
        self.tok = torch.zeros(cache.batch, 1, dtype=torch.long, device=device)
        self.slot = torch.zeros(1, dtype=torch.long, device=device)
        self.fn = _step_for(model) if compile else _decode_step
        self.calls = 0
        self.compile = compile
        if compile:  # (a length-1 axis is always specialised by dynamo)
            for tensor, dim in cache.length_axes():
                if tensor.shape[dim] > 1:
                    torch._dynamo.mark_dynamic(tensor, dim)

    def __call__(self, tok: torch.Tensor, slot: int) -> torch.Tensor:
        self.slot.fill_(slot)
        self.cache.prepare(slot, 1, tok.shape[0])  # host bookkeeping, outside the (compiled) step
        return self.prepared(tok)

    def prepared(self, tok: torch.Tensor, same_shapes: bool = True) -> torch.Tensor:
        """The step over the batch the cache was prepared for by the caller (a server's scheduler:
        `PagedCache.prepare_rows(rows, counts)`, one new token per row): tok (B,) -> (B, vocab).
        Keeping B fixed (all of the cache's rows) keeps one compiled graph; a caller whose B
        changes says `same_shapes=False`, so the guards pick (or compile) the graph each time."""
        b = tok.shape[0]
        self.tok[:b].copy_(tok.view(-1, 1))
        # After the first call, whose full guard check picked (or compiled) the graph, the inputs
        # are the same tensors: skip re-evaluating the guards (~0.2-0.3 ms a token on a small CPU
        # model). Unsafe where another graph could be needed: a new batch size.
        skip = self.compile and self.calls and same_shapes
        stance = torch.compiler.set_stance("default", skip_guard_eval_unsafe=True) if skip else nullcontext()
        self.calls += 1
        with stance:
            return self.fn(self.model, self.tok[:b], self.cache, self.slot, self.compile)
