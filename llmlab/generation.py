"""Sampling: greedy / temperature / top-k / top-p, with a KV cache (prefill once, then one token per
step) or by full recompute, batched over prompts of different lengths, streamed token by token.

Learned positions end at block_size. Past it the window rolls: each step the last block_size tokens
are fed again (re-prefilled), exactly what uncached nanoGPT does by cropping, so the two paths agree.
RoPE / sinusoidal / no-position models just keep going: their tables grow.
"""
from __future__ import annotations

import math
import os
from typing import Iterator, Optional, Sequence, Union

import torch
import torch.nn.functional as F

from llmlab.compiled import DecodeStep
from llmlab.errors import LlmlabError

Prompts = Union[torch.Tensor, Sequence[Sequence[int]]]


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_k: Optional[int] = None,
                top_p: Optional[float] = None, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """logits (B, V) -> next ids (B,). temperature 0 is greedy (argmax)."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        # keep the smallest set of most likely tokens whose probability reaches top_p
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = F.softmax(sorted_logits, dim=-1)
        drop_sorted = probs.cumsum(dim=-1) - probs >= top_p  # mass before this token already >= p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = F.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _check_args(temperature, top_k, top_p, max_new_tokens, seed=None) -> None:
    if not (temperature >= 0 and math.isfinite(temperature)):  # NaN fails every comparison
        raise LlmlabError(f"temperature must be a finite number >= 0 (0 is greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise LlmlabError(f"top_k must be >= 1, got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise LlmlabError(f"top_p must be in (0, 1], got {top_p}")
    if max_new_tokens < 0:
        raise LlmlabError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if seed is not None and not 0 <= seed < 2**63:
        raise LlmlabError(f"seed must be in [0, 2^63), got {seed}")


def _check_cache_fits(model, batch: int, max_len: int) -> None:
    """Refuse a cache that cannot fit in memory before allocating it (a huge max_new_tokens on a
    model whose positions never run out would otherwise end in an out-of-memory kill)."""
    from llmlab import memory

    weight = model.tok_emb.weight
    need = memory.cache_bytes(model.config, batch, max_len, weight.element_size())
    memory.check_fits(need, f"a cache for {max_len:,} positions", "ask for fewer new tokens", weight.device.type)


def _left_pad(prompts: Prompts, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) ids, left-padded with 0, and each row's padding (B,)."""
    if isinstance(prompts, torch.Tensor):
        if prompts.dim() == 1:
            prompts = prompts[None]
        return prompts.to(device), torch.zeros(prompts.shape[0], dtype=torch.long, device=device)
    rows = [torch.as_tensor(list(p), dtype=torch.long) for p in prompts]
    if not rows or min(len(r) for r in rows) == 0:
        raise LlmlabError("every prompt needs at least one token")
    t = max(len(r) for r in rows)
    idx = torch.zeros(len(rows), t, dtype=torch.long)
    for i, r in enumerate(rows):
        idx[i, t - len(r):] = r
    pad = torch.tensor([t - len(r) for r in rows], dtype=torch.long)
    return idx.to(device), pad.to(device)


@torch.no_grad()
def stream(model, prompts: Prompts, max_new_tokens: int, temperature: float = 1.0,
           top_k: Optional[int] = None, top_p: Optional[float] = None, seed: Optional[int] = None,
           stop_tokens: Sequence[int] = (), use_cache: Optional[bool] = None,
           compile: bool = False) -> Iterator[torch.Tensor]:
    """Yield each step's new tokens (B,). Rows that produced a stop token keep repeating it; the
    stream ends when every row has stopped or after max_new_tokens steps. compile=True runs the
    cached one-token step through torch.compile (llmlab.compiled): the first call compiles
    (seconds), later steps and generations of the same shapes are several times faster."""
    _check_args(temperature, top_k, top_p, max_new_tokens, seed)
    if use_cache is None:  # the rung decides: basic/flash recompute (as nanoGPT), later rungs cache
        use_cache = compile or model.config.use_cache
    if compile and not use_cache:
        raise LlmlabError("compile=True (--compile) compiles the cached decode step; it cannot be combined "
                           "with use_cache=False (--no-cache)")
    device = model.tok_emb.weight.device
    idx, pad = _left_pad(prompts, device)
    gen = torch.Generator(device=device)
    # no seed: fresh entropy, without reseeding torch's global RNG as torch.seed() would
    gen.manual_seed(seed if seed is not None else int.from_bytes(os.urandom(8), "little") >> 1)
    stops = torch.as_tensor(list(stop_tokens), dtype=torch.long, device=device)
    steps = _cached_logits(model, idx, pad, max_new_tokens, compile) if use_cache else \
        _recomputed_logits(model, idx, pad)
    done = torch.zeros(idx.shape[0], dtype=torch.bool, device=device)
    was_training = model.training
    model.eval()
    try:
        logits = next(steps)
        for i in range(max_new_tokens):
            nxt = sample_next(logits, temperature, top_k, top_p, gen)
            if len(stops):
                nxt = torch.where(done, stops[0], nxt)
                done |= torch.isin(nxt, stops)
            yield nxt
            if i + 1 == max_new_tokens or (len(stops) and bool(done.all())):
                return
            logits = steps.send(nxt)
    finally:
        steps.close()
        model.train(was_training)


def _cached_logits(model, idx, pad, max_new_tokens, compile: bool = False):
    """Coroutine: yields last-position logits (B, V); is sent each new token (B,)."""
    b, t0 = idx.shape
    window = model.pos.max_positions  # None: positions never run out
    total = t0 + max_new_tokens
    max_len = total if window is None else min(total, window)
    _check_cache_fits(model, b, max_len)
    cache = model.new_cache(b, max_len)
    step = DecodeStep(model, cache, compile)
    tokens = torch.empty(b, total, dtype=torch.long, device=idx.device)
    tokens[:, :t0] = idx
    slots = torch.arange(max_len, device=idx.device)

    def prefill(n: int) -> torch.Tensor:
        """Feed tokens[:, start:n] into slots 0.. of the cache (start > 0 once the window rolls)."""
        start = max(0, n - max_len)
        cache.set_padding((pad - start).clamp_min(0))
        return model(tokens[:, start:n], cache, slots[: n - start])[:, -1]

    n = t0
    logits = prefill(n)
    while True:
        nxt = yield logits
        tokens[:, n] = nxt
        n += 1
        if n <= max_len:  # room left: one-token decode step at slot n-1
            logits = step(nxt, n - 1)
        else:  # learned positions ran out: roll the window by re-prefilling the last max_len tokens
            logits = prefill(n)


def _recomputed_logits(model, idx, pad):
    """Coroutine for the uncached path: every step runs the whole sequence (each row on its own, so
    no padding is involved), cropped to block_size for learned positions, as nanoGPT does."""
    window = model.pos.max_positions
    rows = [idx[i:i + 1, int(pad[i]):] for i in range(idx.shape[0])]
    while True:
        logits = torch.cat([model(r if window is None else r[:, -window:])[:, -1] for r in rows])
        nxt = yield logits
        rows = [torch.cat([r, nxt[i:i + 1, None]], dim=1) for i, r in enumerate(rows)]


def generate(model, idx: Prompts, max_new_tokens: int, temperature: float = 1.0,
             top_k: Optional[int] = None, top_p: Optional[float] = None, seed: Optional[int] = None,
             stop_tokens: Sequence[int] = (), use_cache: Optional[bool] = None, compile: bool = False):
    """Continue each prompt by up to max_new_tokens tokens (compile: see `stream`).

    idx: a LongTensor (B, T) -> returns (B, T + n); or a list of prompts of different lengths ->
    returns a list of 1-D tensors (prompt + continuation), each equal to generating it alone.
    """
    ragged = not isinstance(idx, torch.Tensor)
    new = list(stream(model, idx, max_new_tokens, temperature, top_k, top_p, seed, stop_tokens, use_cache,
                      compile))
    device = model.tok_emb.weight.device
    out_new = torch.stack(new, dim=1) if new else torch.empty(len(idx), 0, dtype=torch.long, device=device)
    if ragged:
        return [torch.cat([torch.as_tensor(list(p), dtype=torch.long, device=device), out_new[i]])
                for i, p in enumerate(idx)]
    prompt = idx if idx.dim() == 2 else idx[None]
    return torch.cat([prompt.to(device), out_new], dim=1)
