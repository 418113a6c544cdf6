"""Text in, text out: encode a prompt, stream the continuation as decoded text."""
from __future__ import annotations

from typing import Iterator, Optional

import torch

from llmlab.errors import LlmlabError
from llmlab.generation import stream


def encode_prompt(tokenizer, prompt: Optional[str]) -> list[int]:
    """The prompt's ids; with no prompt, a newline (or the BPE end-of-text token) starts the text."""
    if prompt:
        ids = tokenizer.encode(prompt)
        if ids:
            return ids
    if tokenizer.eos_id is not None:
        return [tokenizer.eos_id]
    try:
        return tokenizer.encode("\n")
    except LlmlabError:  # a char vocabulary without newline: start from its first character
        return [0]


def stream_text(model, tokenizer, prompt: Optional[str], max_new_tokens: int, temperature: float = 0.8,
                top_k: Optional[int] = None, top_p: Optional[float] = None, seed: Optional[int] = None,
                use_cache: Optional[bool] = None, compile: Optional[bool] = None,
                cache: Optional[str] = None) -> Iterator[str]:
    """Yield decoded text as tokens arrive (llmlab.textstream: incremental decoding; a multi-byte
    character split across tokens is held back until it is complete)."""
    from llmlab.textstream import TextStream

    ids = encode_prompt(tokenizer, prompt)
    stops = [tokenizer.eos_id] if tokenizer.eos_id is not None else []
    new: list[int] = []
    text = TextStream(tokenizer)
    for tok in stream(model, torch.tensor([ids]), max_new_tokens, temperature, top_k, top_p, seed,
                      stop_tokens=stops, use_cache=use_cache, compile=compile, cache=cache):
        t = int(tok[0])
        if t in stops:
            break
        new.append(t)
        delta = text.feed(new)
        if delta:
            yield delta
    delta = text.feed(new, final=True)
    if delta:
        yield delta


def sample_text(model, tokenizer, prompt: Optional[str], max_new_tokens: int, **kwargs) -> str:
    """The prompt followed by its continuation."""
    return (prompt or "") + "".join(stream_text(model, tokenizer, prompt, max_new_tokens, **kwargs))
