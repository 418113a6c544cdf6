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
    return torch.multinomial(sampling_probs(logits, temperature, top_k, top_p), 1, generator=generator).squeeze(-1)


def sampling_probs(logits: torch.Tensor, temperature, top_k=None, top_p=None) -> torch.Tensor:
    """logits (B, V) -> the probabilities to draw from (B, V): divided by the temperature (> 0),
    then only the top_k most likely tokens, then the fewest most likely whose mass reaches top_p.
    Each setting is one number for every row or a (B,) tensor, one per row (a row with top_k >= V
    or top_p >= 1 keeps every token). Every operation works row by row, so a row's probabilities
    are the same alone or beside others (the server samples its batch in one call)."""
    b, v = logits.shape
    # shifted so the largest is 0 and divided in float64: a tiny temperature (1e-300, which float32
    # rounds to 0) sends the others to -inf (greedy in the limit) instead of the probabilities to NaN
    t = temperature.to(logits.device, torch.float64)[:, None] if torch.is_tensor(temperature) else temperature
    logits = logits.double()
    logits = ((logits - logits.max(dim=-1, keepdim=True).values) / t).float()
    if top_k is not None:
        k = (top_k if torch.is_tensor(top_k) else torch.full((b,), top_k)).to(logits.device).clamp(max=v)
        if bool((k < v).any()):
            # a row with k = V compares with its smallest logit: it keeps every token
            kth = torch.topk(logits, int(k.max()), dim=-1).values.gather(-1, (k - 1)[:, None])
            logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        p = (top_p if torch.is_tensor(top_p) else torch.full((b,), float(top_p))).to(logits)[:, None]
        if bool((p < 1.0).any()):
            # keep the smallest set of most likely tokens whose probability reaches top_p
            sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
            probs = F.softmax(sorted_logits, dim=-1)
            # mass before this token already >= p (a row with p = 1 drops nothing, even where float32
            # sums a probability to 1 early)
            drop_sorted = (probs.cumsum(dim=-1) - probs >= p) & (p < 1.0)
            drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
            logits = logits.masked_fill(drop, float("-inf"))
    return F.softmax(logits, dim=-1)


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check_args(temperature, top_k, top_p, max_new_tokens, seed=None) -> None:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) \
            or not (temperature >= 0 and math.isfinite(temperature)):  # NaN fails every comparison
        raise LlmlabError(f"temperature must be a finite number >= 0 (0 is greedy), got {temperature!r}")
    if top_k is not None and not (_is_int(top_k) and top_k >= 1):
        raise LlmlabError(f"top_k must be an integer >= 1, got {top_k!r}")
    if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0.0 < top_p <= 1.0):
        raise LlmlabError(f"top_p must be in (0, 1], got {top_p!r}")
    if not (_is_int(max_new_tokens) and max_new_tokens >= 0):
        raise LlmlabError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    if seed is not None and not (_is_int(seed) and 0 <= seed < 2**63):
        raise LlmlabError(f"seed must be an integer in [0, 2^63), got {seed!r}")


def _check_cache_fits(model, batch: int, max_len: int) -> None:
    """Refuse a cache that cannot fit in memory before allocating it (a huge max_new_tokens on a
    model whose positions never run out would otherwise end in an out-of-memory kill)."""
    from llmlab import memory

    weight = model.tok_emb.weight
    need = memory.cache_bytes(model.config, batch, max_len, weight.element_size())
    memory.check_fits(need, f"a cache for {max_len:,} positions", "ask for fewer new tokens", weight.device.type)


def _left_pad(prompts: Prompts, vocab_size: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) ids, left-padded with 0, and each row's padding (B,); prompts checked first: at least
    one token each, integer ids inside the vocabulary."""
    if isinstance(prompts, torch.Tensor):
        if prompts.dim() == 1:
            prompts = prompts[None]
        if prompts.dim() != 2 or prompts.shape[0] == 0 or prompts.shape[1] == 0:
            raise LlmlabError(f"prompts must be a (batch, tokens) tensor with at least one token, got shape "
                              f"{tuple(prompts.shape)}")
        if prompts.dtype.is_floating_point or prompts.dtype.is_complex or prompts.dtype == torch.bool:
            raise LlmlabError(f"prompt ids must be integers, got a {prompts.dtype} tensor")
        idx, pad = prompts.long(), torch.zeros(prompts.shape[0], dtype=torch.long)
    else:
        try:
            rows = [[int(t) if _is_int(t) or isinstance(t, torch.Tensor) and t.dim() == 0 else None for t in p]
                    for p in prompts]
        except TypeError:
            raise LlmlabError("prompts must be a tensor or a list of token-id lists") from None
        if not rows or min(len(r) for r in rows) == 0:
            raise LlmlabError("every prompt needs at least one token")
        if any(t is None for r in rows for t in r):
            raise LlmlabError("prompt ids must be integers")
        t = max(len(r) for r in rows)
        idx = torch.zeros(len(rows), t, dtype=torch.long)
        for i, r in enumerate(rows):
            idx[i, t - len(r):] = torch.tensor(r, dtype=torch.long)
        pad = torch.tensor([t - len(r) for r in rows], dtype=torch.long)
    lo, hi = int(idx.min()), int(idx.max())
    if lo < 0 or hi >= vocab_size:
        raise LlmlabError(f"prompt ids must be in [0, {vocab_size}) (the model's vocabulary), got {lo if lo < 0 else hi}")
    return idx.to(device), pad.to(device)


def decode_runtime(model, use_cache: Optional[bool] = None, compile: Optional[bool] = None,
                   cache: Optional[str] = None):
    """The model's runtime with generate()'s keyword overrides (`use_cache=False` is cache 'none';
    `use_cache=True` keeps the runtime's cache kind, or dense where the runtime recomputes)."""
    changes: dict = {}
    if cache is not None:
        changes["cache"] = cache
    elif use_cache is not None and use_cache != model.runtime.uses_cache:
        changes["cache"] = "dense" if use_cache else "none"
    if compile is not None:
        changes["compile"] = compile
    rt = model.runtime.changed(**changes)
    rt.validate(model.config)
    return rt


@torch.no_grad()
def stream(model, prompts: Prompts, max_new_tokens: int, temperature: float = 1.0,
           top_k: Optional[int] = None, top_p: Optional[float] = None, seed: Optional[int] = None,
           stop_tokens: Sequence[int] = (), use_cache: Optional[bool] = None,
           compile: Optional[bool] = None, cache: Optional[str] = None) -> Iterator[torch.Tensor]:
    """Yield each step's new tokens (B,). Rows that produced a stop token keep repeating it; the
    stream ends when every row has stopped or after max_new_tokens steps. The cache kind and
    compile default to the model's runtime (llmlab.runtime): basic/flash recompute (as nanoGPT),
    later rungs cache (dense, or paged for flash_mla); `cache` ('none', 'dense', 'paged') or
    `use_cache` override it. compile=True runs the cached one-token step through torch.compile
    (llmlab.compiled): the first call compiles (seconds), later steps and generations of the same
    shapes are several times faster."""
    _check_args(temperature, top_k, top_p, max_new_tokens, seed)
    rt = decode_runtime(model, use_cache, compile, cache)
    device = model.tok_emb.weight.device
    idx, pad = _left_pad(prompts, model.config.vocab_size, device)
    gen = torch.Generator(device=device)
    # no seed: fresh entropy, without reseeding torch's global RNG as torch.seed() would
    gen.manual_seed(seed if seed is not None else int.from_bytes(os.urandom(8), "little") >> 1)
    stops = torch.as_tensor(list(stop_tokens), dtype=torch.long, device=device)
    steps = _cached_logits(model, idx, pad, max_new_tokens, rt.cache, rt.compile) if rt.uses_cache else \
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


def _cached_logits(model, idx, pad, max_new_tokens, kind: str = "dense", compile: bool = False):
    """Coroutine: yields last-position logits (B, V); is sent each new token (B,)."""
    b, t0 = idx.shape
    window = model.pos.max_positions  # None: positions never run out
    total = t0 + max_new_tokens
    max_len = total if window is None else min(total, window)
    _check_cache_fits(model, b, max_len)
    cache = model.new_cache(b, max_len, kind=kind)
    step = DecodeStep(model, cache, compile)
    # the last max_len tokens (a rolling window once learned positions run out): never the whole
    # output, which a huge max_new_tokens would make huge
    kept = min(t0, max_len)
    tokens = torch.empty(b, max_len, dtype=torch.long, device=idx.device)
    tokens[:, :kept] = idx[:, t0 - kept:]
    pad = (pad - (t0 - kept)).clamp_min(0)

    def prefill(n: int) -> torch.Tensor:
        """Feed tokens[:, :n] into slots 0.. of the cache."""
        cache.set_padding(pad)
        return model(tokens[:, :n], cache, 0)[:, -1]

    n = kept
    logits = prefill(n)
    while True:
        nxt = yield logits
        if n < max_len:  # room left: one-token decode step at slot n
            tokens[:, n] = nxt
            logits = step(nxt, n)
            n += 1
        else:  # learned positions ran out: roll the window by re-prefilling the last max_len tokens
            tokens[:, :-1] = tokens[:, 1:].clone()
            tokens[:, -1] = nxt
            pad = (pad - 1).clamp_min(0)
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
             stop_tokens: Sequence[int] = (), use_cache: Optional[bool] = None, compile: Optional[bool] = None,
             cache: Optional[str] = None):
    """Continue each prompt by up to max_new_tokens tokens (cache kind and compile: see `stream`).

    idx: a LongTensor (B, T) -> returns (B, T + n); or a list of prompts of different lengths ->
    returns a list of 1-D tensors (prompt + continuation), each equal to generating it alone.
    """
    ragged = not isinstance(idx, torch.Tensor)
    new = list(stream(model, idx, max_new_tokens, temperature, top_k, top_p, seed, stop_tokens, use_cache,
                      compile, cache))
    device = model.tok_emb.weight.device
    out_new = torch.stack(new, dim=1) if new else torch.empty(len(idx), 0, dtype=torch.long, device=device)
    if ragged:
        return [torch.cat([torch.as_tensor(list(p), dtype=torch.long, device=device), out_new[i]])
                for i, p in enumerate(idx)]
    prompt = idx if idx.dim() == 2 else idx[None]
    return torch.cat([prompt.to(device), out_new], dim=1)
