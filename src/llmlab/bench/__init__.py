"""`llmlab bench decode`: greedy decode speed against Hugging Face transformers, prefill / decode
tokens/s at several context lengths (without cache, with it, and with the compiled decode step),
and cache bytes per token. Every llmlab number is timed through the public generate()/stream().

Every timing is a median over repeats, and runs that are compared are interleaved (HF, llmlab, HF,
llmlab, ...) so background load hits both sides alike. The last line printed is a JSON object with
the key numbers. Measuring and printing are apart: measure_* return numbers (`llmlab compare`
reuses measure_contexts and cache_bytes_entry), print_* format them:

    shapes.py   the benchmark model's sizes
    measure.py  its models, timing and measurements (numbers only)
    report.py   the printed tables
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from typing import Optional

import torch

from llmlab.bench.measure import (CACHED_RUN, COMPILED_RUN, HF_RUN, UNCACHED_RUN, _sync, _threads, bench_variants,  # noqa: F401
                                  build_models, cache_bytes_entry, cache_bytes_rows, contexts_summary, interleaved,
                                  measure_contexts, measure_speed, median, speed_summary, stream_timed)
from llmlab.bench.report import print_cache_bytes, print_contexts, print_speed, print_table  # noqa: F401
from llmlab.bench.shapes import (DECODE_STEPS, LLAMA_FFN, LLAMA_KV_HEADS, MLA_SIZES, N_EMBD, N_HEAD,  # noqa: F401
                                 N_LAYER, SHAPES, UNCACHED_STEPS, VOCAB)
from llmlab.errors import LlmlabError
from llmlab.settings import setting as _


@dataclass
class BenchArgs:
    """The settings of `llmlab bench decode` (its flags are derived from these fields)."""
    shape: str = _("gpt2", "gpt2: 4 layers, d 256, 8 heads, vocab 512; llama: the same with 2 KV heads, RoPE, "
                           "RMSNorm, SwiGLU; deepseek: DeepSeek-V2 MLA (d_c 128, d_r 16, nope 32, v 32), RoPE, "
                           "RMSNorm, SwiGLU", choices=SHAPES)
    prompt_len: int = _(16, "prompt tokens of table 1")
    new_tokens: int = _(256, "tokens generated in table 1")
    contexts: str = _("64,256,1024", "comma-separated context lengths for table 2", metavar="C,C,...")
    repeats: int = _(3, "timed repeats per measurement (median)")
    decode_steps: int = _(DECODE_STEPS, "cached decode steps timed per context")
    compile: bool = _(True, "also time generate(compile=True) (the first call compiles for ~10-30 s)")
    hf: bool = _(True, "compare with Hugging Face transformers (off: table 1 llmlab only)")
    threads: int = _(0, "torch threads for every run, HF's included (0: torch's default, one per core); on a "
                        "machine where another process holds a core, use 1")
    seed: int = _(0, "random seed (weights, prompts)")


def build_parser() -> argparse.ArgumentParser:
    from llmlab.settings import OneLineParser, add_flags

    p = OneLineParser(prog="llmlab bench decode", description=__doc__.split("\n\n")[0],
                      argument_default=argparse.SUPPRESS)
    add_flags(p, BenchArgs)
    return p


def _contexts(spec: str) -> list[int]:
    try:
        values = [int(s) for s in spec.split(",") if s.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        from llmlab.errors import LlmlabError

        raise LlmlabError(f"--contexts must be comma-separated positive integers, got {spec!r}")
    return values


MAX_LEN = 32768  # the benchmark's caches and position tables grow with it: past this it is a typo
MAX_REPEATS = 100


def _check(ns, max_len: int) -> Optional[str]:
    """The first flag out of range, as one line (or None)."""
    import os

    for flag in ("prompt_len", "new_tokens", "repeats", "decode_steps"):
        if getattr(ns, flag) < 1:
            return f"--{flag.replace('_', '-')} must be >= 1"
    cores = os.cpu_count() or 1
    if not 0 <= ns.threads <= 4 * cores:  # far more OpenMP threads than cores crash torch
        return f"--threads must be in [0, {4 * cores}] (0: torch's default; this machine has {cores} cores)"
    if not 0 <= ns.seed < 2**63:
        return f"--seed must be in [0, 2^63), got {ns.seed}"
    if ns.repeats > MAX_REPEATS:
        return f"--repeats must be at most {MAX_REPEATS}"
    if max_len > MAX_LEN:
        return (f"--prompt-len + --new-tokens and the longest context + --decode-steps must stay within "
                f"{MAX_LEN:,} tokens (got {max_len:,})")
    return None


# ---- main --------------------------------------------------------------------------------------------------
def main(argv: Optional[list[str]] = None) -> int:
    """`llmlab bench decode`, `python -m llmlab.bench` and benchmarks/decode.py alike: bad flags are
    one `error:` line and exit 2, however it was started."""
    try:
        return _main(argv)
    except LlmlabError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _main(argv: Optional[list[str]]) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "decode":  # `python -m llmlab.bench decode ...` as well as the cli's remainder
        argv = argv[1:]
    ns = BenchArgs(**vars(build_parser().parse_args(argv)))
    contexts = _contexts(ns.contexts)
    max_len = max(ns.prompt_len + ns.new_tokens, max(contexts) + ns.decode_steps)
    problem = _check(ns, max_len)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2

    with _threads(ns.threads), torch.inference_mode():
        hf, model, shared, note = build_models(ns.shape, max_len, ns.hf, ns.seed)
        print(f"llmlab bench decode: shape {ns.shape}, {N_LAYER} layers, d_model {N_EMBD}, {N_HEAD} heads"
              f"{f' ({LLAMA_KV_HEADS} KV heads)' if ns.shape == 'llama' else ''}"
              f"{' (MLA: d_c 128, d_r 16, nope 32, v 32)' if ns.shape == 'deepseek' else ''}, vocab {VOCAB}, "
              f"max length {max_len}; torch {torch.__version__}, {torch.get_num_threads()} threads"
              + (f"; HF weights shared: {'yes' if shared else 'no'}" if hf is not None else "; no HF"))
        if note:
            print(f"note: {note}")
        if model is None:
            print(f"note: --shape {ns.shape} needs llmlab.from_hf support for it; skipped")
            print(json.dumps({"shape": ns.shape, "skipped": note}))
            return 0

        gen = torch.Generator().manual_seed(ns.seed)
        prompt = torch.randint(0, VOCAB, (1, ns.prompt_len), generator=gen)
        speed = measure_speed(hf, model, prompt, ns.new_tokens, ns.repeats, ns.compile, shared)
        print_speed(speed)
        ctx = contexts_summary(measure_contexts(model, contexts, ns.repeats,
                                                bench_variants(ns.decode_steps, ns.compile), ns.seed))
        print_contexts(ctx, ns.decode_steps, ns.repeats)
        entries = cache_bytes_rows((f"bench model ({ns.shape})", model))
        print_cache_bytes(entries)

    summary = {"shape": ns.shape, "weights_shared": shared, **speed_summary(speed),
               "contexts": [{k: (round(v, 1) if isinstance(v, float) else v) for k, v in r.items()} for r in ctx],
               "cache_bytes_per_token": {e["name"]: e.get("measured") for e in entries if "skipped" not in e}}
    print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in summary.items()}))
    return 0
