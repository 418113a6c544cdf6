"""`llmlab bench decode`: greedy decode speed against Hugging Face transformers, prefill / decode
tokens/s at several context lengths (without cache, with it, and with the compiled decode step),
and cache bytes per token. Every llmlab number is timed through the public generate()/stream().

Every timing is a median over repeats, and runs that are compared are interleaved (HF, llmlab, HF,
llmlab, ...) so background load hits both sides alike. The last line printed is a JSON object with
the key numbers. Measuring and printing are apart: measure_* return numbers (`llmlab compare`
reuses measure_contexts and cache_bytes_entry), print_* format them.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from llmlab.model.cache import values_per_token
from llmlab.registry import lookup

SHAPES = ("gpt2", "llama", "deepseek")
# The benchmark model: small enough that batch-1 decode is dominated by per-token overhead, which
# is exactly what a KV cache and a lean decode loop are about.
N_LAYER, N_EMBD, N_HEAD, VOCAB = 4, 256, 8, 512
LLAMA_KV_HEADS, LLAMA_FFN = 2, 688
# DeepSeek-V2 shape (MLA): latent d_c, rope d_r, per-head nope and value widths
MLA_SIZES = dict(kv_lora_rank=128, qk_rope_head_dim=16, qk_nope_head_dim=32, v_head_dim=32)
DECODE_STEPS = 64  # cached decode steps timed per context length
HF_RUN, CACHED_RUN = "HF generate (DynamicCache)", "llmlab generate, cache"
COMPILED_RUN, UNCACHED_RUN = "llmlab generate, cache + compile", "llmlab generate, no cache"
UNCACHED_STEPS = 4  # full-recompute steps timed per context length (each costs a whole forward)


def _(default: Any, help: str, **meta: Any) -> Any:
    return dataclasses.field(default=default, metadata={"help": help, **meta})


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


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line through llmlab's CLI, never a usage block
        from llmlab.errors import LlmlabError

        raise LlmlabError(f"{self.prog}: {message} (see `{self.prog} --help`)")


def build_parser() -> argparse.ArgumentParser:
    from llmlab.settings import add_flags

    p = _Parser(prog="llmlab bench decode", description=__doc__.split("\n\n")[0],
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


# ---- models ---------------------------------------------------------------------------------------
def _hf_model(shape: str, max_len: int):
    import transformers

    common = dict(vocab_size=VOCAB, bos_token_id=None, eos_token_id=None, pad_token_id=0)
    if shape == "gpt2":
        cfg = transformers.GPT2Config(n_layer=N_LAYER, n_embd=N_EMBD, n_head=N_HEAD, n_positions=max_len,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **common)
        model = transformers.GPT2LMHeadModel(cfg)
    elif shape == "llama":
        cfg = transformers.LlamaConfig(num_hidden_layers=N_LAYER, hidden_size=N_EMBD, num_attention_heads=N_HEAD,
                                       num_key_value_heads=LLAMA_KV_HEADS, intermediate_size=LLAMA_FFN,
                                       max_position_embeddings=max_len, **common)
        model = transformers.LlamaForCausalLM(cfg)
    else:  # dense DeepSeek-V2: MLA in every layer, no MoE
        cfg = transformers.DeepseekV2Config(num_hidden_layers=N_LAYER, hidden_size=N_EMBD, num_attention_heads=N_HEAD,
                                            num_key_value_heads=N_HEAD, intermediate_size=LLAMA_FFN, q_lora_rank=None,
                                            first_k_dense_replace=N_LAYER, max_position_embeddings=max_len,
                                            **MLA_SIZES, **common)
        model = transformers.DeepseekV2ForCausalLM(cfg)
    return model.eval()


def build_models(shape: str, max_len: int, want_hf: bool, seed: int):
    """(hf_model or None, llmlab model, weights_shared, note). With transformers and a working
    `llmlab.from_hf` the two models share weights; otherwise llmlab gets its own random weights."""
    import llmlab
    from llmlab.model import Transformer
    from llmlab.presets import preset_config

    torch.manual_seed(seed)
    hf, note = None, ""
    if want_hf:
        try:
            import transformers  # noqa: F401
        except ImportError:
            note = "transformers is not installed: no HF comparison"
        else:
            hf = _hf_model(shape, max_len)
            try:
                return hf, llmlab.from_hf(hf).eval(), True, ""
            except Exception as e:  # noqa: BLE001 - the mapping may not exist (yet) for this shape
                note = f"llmlab.from_hf failed ({type(e).__name__}: {' '.join(str(e).split())[:160]})"
                if shape != "gpt2":
                    return hf, None, False, note
                note += "; llmlab uses its own random weights (same shape), so tokens are not compared"
    if shape == "gpt2":
        cfg = preset_config("kv_cache", n_layer=N_LAYER, n_embd=N_EMBD, n_head=N_HEAD, vocab_size=VOCAB,
                            block_size=max_len, dropout=0.0, mlp="gelu_tanh")
    elif shape == "llama":
        cfg = preset_config("kv_cache", n_layer=N_LAYER, n_embd=N_EMBD, n_head=N_HEAD, n_kv_head=LLAMA_KV_HEADS,
                            vocab_size=VOCAB, block_size=max_len, dropout=0.0, bias=False, position="rope",
                            norm="rmsnorm", mlp="swiglu", intermediate_size=LLAMA_FFN, tie_embeddings=False)
    else:
        cfg = preset_config("rope_mla", n_layer=N_LAYER, n_embd=N_EMBD, n_head=N_HEAD, vocab_size=VOCAB,
                            block_size=max_len, dropout=0.0, intermediate_size=LLAMA_FFN, **MLA_SIZES)
    return hf, Transformer(cfg).eval(), False, note


# ---- timing -----------------------------------------------------------------------------------------
def _timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def interleaved(runs: dict[str, Callable[[], Any]], repeats: int, warmup: int = 1):
    """Run each callable `warmup` + `repeats` times, round-robin; return ({name: [seconds]}, {name: last output})."""
    times = {k: [] for k in runs}
    outs: dict[str, Any] = {}
    for r in range(warmup + repeats):
        for name, fn in runs.items():
            dt, outs[name] = _timed(fn)
            if r >= warmup:
                times[name].append(dt)
    return times, outs


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


@contextmanager
def _threads(n: int):
    old = torch.get_num_threads()
    if n > 0:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


# ---- measuring (numbers only; the printers below format them) ----------------------------------
def measure_speed(hf, model, prompt: torch.Tensor, new_tokens: int, repeats: int, compile: bool,
                  weights_shared: bool) -> dict[str, Any]:
    """Greedy generate() tokens/s of each run (HF, llmlab cached / compiled / recomputed), timed
    interleaved, and whether each run's tokens equal llmlab's cached ones. Prints nothing."""
    from llmlab.generation import generate

    n = new_tokens
    runs: dict[str, Callable[[], Any]] = {}
    if hf is not None:
        mask = torch.ones_like(prompt)
        runs[HF_RUN] = lambda: hf.generate(
            prompt, attention_mask=mask, do_sample=False, max_new_tokens=n, min_new_tokens=n, pad_token_id=0)[0, -n:]
    runs[CACHED_RUN] = lambda: generate(model, prompt, n, temperature=0, use_cache=True)[0, -n:]
    compile_s = None
    if compile:
        runs[COMPILED_RUN] = lambda: generate(model, prompt, n, temperature=0, compile=True)[0, -n:]
        compile_s, _ = _timed(runs[COMPILED_RUN])  # the first call compiles: timed apart
    runs[UNCACHED_RUN] = lambda: generate(model, prompt, n, temperature=0, use_cache=False)[0, -n:]
    times, outs = interleaved(runs, repeats)
    same = {name: (None if name == HF_RUN and not weights_shared else torch.equal(outs[CACHED_RUN], out))
            for name, out in outs.items() if name != CACHED_RUN}
    return {"prompt_len": prompt.shape[1], "new_tokens": n, "repeats": repeats, "compile_s": compile_s,
            "tokens_per_s": {k: n / median(v) for k, v in times.items()},
            "ms_per_token": {k: 1000 * median(v) / n for k, v in times.items()}, "same_tokens": same}


def speed_summary(m: dict[str, Any]) -> dict[str, Any]:
    """The JSON keys of measure_speed's numbers (the benchmark's last line)."""
    tps = m["tokens_per_s"]
    hf_tps = tps.get(HF_RUN)
    res: dict[str, Any] = {"hf_tokens_per_s": hf_tps, "llmlab_cached_tokens_per_s": tps[CACHED_RUN],
                           "llmlab_uncached_tokens_per_s": tps[UNCACHED_RUN]}
    if hf_tps:
        res["ratio"] = tps[CACHED_RUN] / hf_tps
    if COMPILED_RUN in tps:
        res["llmlab_compiled_tokens_per_s"] = tps[COMPILED_RUN]
        res["compile_s"] = m["compile_s"]
        if hf_tps:
            res["compiled_ratio"] = tps[COMPILED_RUN] / hf_tps
    keys = {HF_RUN: "tokens_match", COMPILED_RUN: "compiled_tokens_same", UNCACHED_RUN: "uncached_tokens_same"}
    for name, same in m["same_tokens"].items():
        if same is not None:
            res[keys[name]] = same
    return res


def _sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA runs asynchronously: a clock read alone would stop early)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def stream_timed(model, ids: torch.Tensor, steps: int, **kw) -> tuple[float, float, torch.Tensor]:
    """Greedy llmlab.stream over ids: (seconds to the first token = prefill, seconds for the next
    `steps` tokens = decode, those tokens). `llmlab compare` times its decode rounds with it."""
    from llmlab.generation import stream

    device = model.tok_emb.weight.device
    it = stream(model, ids, steps + 1, temperature=0, **kw)
    _sync(device)
    t0 = time.perf_counter()
    next(it)
    _sync(device)
    t1 = time.perf_counter()
    toks = torch.cat([next(it) for _ in range(steps)])
    _sync(device)
    t2 = time.perf_counter()
    it.close()
    return t1 - t0, t2 - t1, toks


def bench_variants(decode_steps: int, compile: bool) -> dict[str, tuple[dict[str, Any], int]]:
    """The benchmark's decode variants: name -> (stream() keywords, timed steps). The first one's
    prefill is the one reported."""
    variants = {"cache": (dict(use_cache=True, compile=False), decode_steps),
                "no cache": (dict(use_cache=False), UNCACHED_STEPS)}
    if compile:
        variants["compiled"] = (dict(use_cache=True, compile=True), decode_steps)
    return variants


def measure_contexts(model, contexts: list[int], repeats: int, variants: dict[str, tuple[dict[str, Any], int]],
                     seed: int) -> list[dict[str, Any]]:
    """Per context length C: prefill tokens/s of C random tokens and decode tokens/s of each
    variant after them, through llmlab.stream (round-robin over the variants, the first round a
    warm-up, medians of `repeats`). Returns [{"context", "prefill_tokens_per_s", "decode_tokens_per_s":
    {variant: tokens/s}, "same_tokens": {variant: equal to the first variant's tokens}}]."""
    gen = torch.Generator().manual_seed(seed + 1)
    first = next(iter(variants))
    results = []
    for c in contexts:
        ids = torch.randint(0, model.config.vocab_size, (1, c), generator=gen)
        times: dict[str, list[tuple[float, float]]] = {k: [] for k in variants}
        toks: dict[str, torch.Tensor] = {}
        for r in range(1 + repeats):
            for name, (kw, steps) in variants.items():
                pre, dec, toks[name] = stream_timed(model, ids, steps, **kw)
                if r:
                    times[name].append((pre, dec))
        n = min(steps for _, steps in variants.values())  # every variant decodes at least n tokens
        results.append({
            "context": c, "prefill_tokens_per_s": c / median([p for p, _ in times[first]]),
            "decode_tokens_per_s": {k: variants[k][1] / median([d for _, d in v]) for k, v in times.items()},
            "same_tokens": {k: torch.equal(toks[k][:n], toks[first][:n]) for k in variants if k != first}})
    return results


def contexts_summary(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The JSON keys of the benchmark's variants (bench_variants) per context."""
    out = []
    for r in results:
        d = r["decode_tokens_per_s"]
        row = {"context": r["context"], "prefill_tokens_per_s": r["prefill_tokens_per_s"],
               "decode_tokens_per_s": d["cache"], "uncached_tokens_per_s": d["no cache"]}
        if "compiled" in d:
            row.update(compiled_decode_tokens_per_s=d["compiled"], compiled_tokens_same=r["same_tokens"]["compiled"])
        out.append(row)
    return out


def cache_bytes_entry(name: str, model, max_len: int = 64) -> dict[str, Any]:
    """Measured `bytes_per_token()` of a fresh cache of `model` next to n_layer * (values per
    token per layer, as its attention kind states them) * bytes per element. A model whose
    generation recomputes (basic, flash) keeps no cache: measured and formula are None, as
    `llmlab compare` reports it."""
    from llmlab.compare.results import attention_label
    from llmlab.compare.runtime import NONE, cache_kind

    cfg = model.config
    elem = model.tok_emb.weight.element_size()
    attn = lookup("attention", cfg.attention)  # each kind states what it caches per token
    per_layer = values_per_token(attn.cache_spec(cfg))
    entry = {"name": name, "attention": attention_label(cfg.to_dict()), "n_layer": cfg.n_layer, "n_head": cfg.n_head,
             "values_per_layer": per_layer, "formula_text": attn.cache_formula(cfg),
             "dtype": str(model.tok_emb.weight.dtype), "cache_kind": cache_kind(model)}
    if entry["cache_kind"] == NONE:
        return entry | {"measured": None, "formula": None}
    cache = model.new_cache(1, min(max_len, model.pos.max_positions or max_len), kind=entry["cache_kind"])
    return entry | {"measured": cache.bytes_per_token(), "formula": cfg.n_layer * per_layer * elem}


def cache_bytes_rows(extra: Optional[tuple[str, Any]] = None, max_len: int = 64) -> list[dict[str, Any]]:
    """cache_bytes_entry of every preset in the registry (at the benchmark's sizes), plus the
    benchmark's own model; a preset that cannot build is {"name", "skipped": reason}."""
    from llmlab.presets import PRESETS, preset_model

    sizes = dict(n_layer=N_LAYER, n_embd=N_EMBD, n_head=N_HEAD, vocab_size=VOCAB, block_size=max_len)
    out = []
    for name in PRESETS:  # each with its own runtime: basic and flash recompute (no cache)
        try:
            try:
                model = preset_model(name, **sizes)
            except Exception:  # noqa: BLE001 - a preset whose kinds do not accept these sizes: its defaults
                model = preset_model(name, vocab_size=VOCAB)
        except Exception as e:  # noqa: BLE001 - a preset that cannot build at all is skipped
            out.append({"name": name, "skipped": f"{type(e).__name__}: {' '.join(str(e).split())[:80]}"})
            continue
        out.append(cache_bytes_entry(name, model, max_len))
    if extra is not None:
        out.append(cache_bytes_entry(*extra, max_len=max_len))
    return out


# ---- printing -------------------------------------------------------------------------------------------
def print_table(title: str, header: list[str], rows: list[list[Any]]) -> None:
    cells = [[str(c) for c in header]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    print(f"\n{title}")
    for j, r in enumerate(cells):
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
        if j == 0:
            print("  ".join("-" * w for w in widths))


def _fmt(x: Optional[float], digits: int = 0) -> str:
    return "n/a" if x is None or x != x else f"{x:,.{digits}f}"


def print_speed(m: dict[str, Any]) -> None:
    tps, ms = m["tokens_per_s"], m["ms_per_token"]
    hf_tps = tps.get(HF_RUN)
    rows = [[k, _fmt(v), _fmt(ms[k], 2),
             "1.00x" if k == HF_RUN else (f"{v / hf_tps:.2f}x" if hf_tps else "n/a")] for k, v in tps.items()]
    print_table(f"Table 1: greedy decode, batch 1, prompt {m['prompt_len']}, {m['new_tokens']} new tokens "
                f"(median of {m['repeats']})", ["run", "tokens/s", "ms/token", "vs HF"], rows)
    if m["compile_s"] is not None:
        print(f"compile: the first compiled generate() took {m['compile_s']:.1f} s (torch.compile of the decode "
              "step; inductor's on-disk cache makes later processes faster)")
    for name, same in m["same_tokens"].items():
        if same is None:
            print("tokens vs HF: n/a (weights differ)")
        else:
            print(f"{name} tokens equal llmlab's cached greedy tokens: {'yes' if same else 'NO'}")


def print_contexts(summary: list[dict[str, Any]], decode_steps: int, repeats: int) -> None:
    compiled = any("compiled_decode_tokens_per_s" in r for r in summary)
    rows = []
    for r in summary:
        row = [r["context"], _fmt(r["prefill_tokens_per_s"]), _fmt(r["decode_tokens_per_s"]),
               _fmt(r["uncached_tokens_per_s"], 1), f"{r['decode_tokens_per_s'] / r['uncached_tokens_per_s']:.1f}x"]
        if compiled:
            row += [_fmt(r["compiled_decode_tokens_per_s"]), "yes" if r["compiled_tokens_same"] else "NO"]
        rows.append(row)
    header = ["context", "prefill tok/s", "decode tok/s (cache)", "decode tok/s (no cache)", "cache speedup"]
    if compiled:
        header += ["decode tok/s (compiled)", "same tokens"]
    print_table(f"Table 2: prefill and decode after a context of C tokens, batch 1, through llmlab.stream "
                f"(decode: {decode_steps} cached steps or {UNCACHED_STEPS} full recomputes; median of "
                f"{repeats} after a warm-up round; the compiled step serves every length)", header, rows)


def print_cache_bytes(entries: list[dict[str, Any]]) -> None:
    rows = []
    for e in entries:
        if "skipped" in e:
            rows.append([e["name"], "-", "-", "-", "-", "-", "skipped", e["skipped"]])
            continue
        if e["measured"] is None:  # recomputes every token: nothing is cached
            rows.append([e["name"], e["attention"], e["n_layer"], "-", "-", e["dtype"].replace("torch.", ""),
                         "no cache (recomputes)", "-"])
            continue
        f = e["formula"]
        ok = "yes" if f == e["measured"] else "NO"
        rows.append([e["name"], e["attention"], e["n_layer"], e["formula_text"], e["values_per_layer"],
                     e["dtype"].replace("torch.", ""), _fmt(e["measured"]), f"{_fmt(f)} ({ok})"])
    print_table("Table 3: cache bytes per token (measured from the allocated buffers vs "
                "n_layer * values per layer * bytes_per_element)",
                ["model", "attention", "layers", "values/token/layer", "=", "dtype", "measured B/token",
                 "formula B/token"], rows)


# ---- main --------------------------------------------------------------------------------------------------
def main(argv: Optional[list[str]] = None) -> int:
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


if __name__ == "__main__":
    sys.exit(main())
