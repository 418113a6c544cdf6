"""The decode benchmark's models and measurements: numbers only (llmlab.bench.report prints them).
`llmlab compare` reuses stream_timed, measure_contexts and cache_bytes_entry."""
from __future__ import annotations

import statistics
import time
from contextlib import contextmanager
from typing import Any, Callable, Optional

import torch

from llmlab.bench.shapes import (LLAMA_FFN, LLAMA_KV_HEADS, MLA_SIZES, N_EMBD, N_HEAD, N_LAYER,
                                 UNCACHED_STEPS, VOCAB)
from llmlab.model.cache import values_per_token
from llmlab.registry import lookup

HF_RUN, CACHED_RUN = "HF generate (DynamicCache)", "llmlab generate, cache"
COMPILED_RUN, UNCACHED_RUN = "llmlab generate, cache + compile", "llmlab generate, no cache"


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


