"""`llmlab bench decode`: greedy decode speed against Hugging Face transformers, prefill / decode
tokens/s at several context lengths (with and without the KV cache), and cache bytes per token.

Every timing is a median over repeats, and runs that are compared are interleaved (HF, llmlab, HF,
llmlab, ...) so background load hits both sides alike. The last line printed is a JSON object with
the key numbers.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from contextlib import contextmanager, nullcontext
from typing import Any, Callable, Optional

import torch

SHAPES = ("gpt2", "llama")
# The benchmark model: small enough that batch-1 decode is dominated by per-token overhead, which
# is exactly what a KV cache and a lean decode loop are about.
N_LAYER, N_EMBD, N_HEAD, VOCAB = 4, 256, 8, 512
LLAMA_KV_HEADS, LLAMA_FFN = 2, 688
DECODE_STEPS = 64  # cached decode steps timed per context length
UNCACHED_STEPS = 4  # full-recompute steps timed per context length (each costs a whole forward)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="llmlab bench decode", description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=SHAPES, default="gpt2",
                   help="gpt2: 4 layers, d 256, 8 heads, vocab 512; llama: the same with 2 KV heads, "
                        "RoPE, RMSNorm, SwiGLU (default gpt2)")
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--contexts", default="64,256,1024", help="comma-separated context lengths for table 2")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats per measurement (median)")
    p.add_argument("--decode-steps", type=int, default=DECODE_STEPS,
                   help=f"cached decode steps timed per context (default {DECODE_STEPS})")
    p.add_argument("--compile", action="store_true",
                   help="also time a torch.compile'd decode step (static shapes; compile time shown apart)")
    p.add_argument("--no-hf", action="store_true", help="skip the Hugging Face comparison (table 1 llmlab only)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads for every run, HF's included (default 1: batch-1 decode of this model "
                        "is latency-bound, and on a shared machine OpenMP threads spin-waiting for a busy core "
                        "slow every op many times over; 0: torch's default)")
    p.add_argument("--seed", type=int, default=0)
    return p


def _contexts(spec: str) -> list[int]:
    try:
        values = [int(s) for s in spec.split(",") if s.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise SystemExit(f"error: --contexts must be comma-separated positive integers, got {spec!r}")
    return values


# ---- models ---------------------------------------------------------------------------------------
def _hf_model(shape: str, max_len: int):
    import transformers

    common = dict(vocab_size=VOCAB, bos_token_id=None, eos_token_id=None, pad_token_id=0)
    if shape == "gpt2":
        cfg = transformers.GPT2Config(n_layer=N_LAYER, n_embd=N_EMBD, n_head=N_HEAD, n_positions=max_len,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **common)
        model = transformers.GPT2LMHeadModel(cfg)
    else:
        cfg = transformers.LlamaConfig(num_hidden_layers=N_LAYER, hidden_size=N_EMBD, num_attention_heads=N_HEAD,
                                       num_key_value_heads=LLAMA_KV_HEADS, intermediate_size=LLAMA_FFN,
                                       max_position_embeddings=max_len, **common)
        model = transformers.LlamaForCausalLM(cfg)
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
    else:
        cfg = preset_config("kv_cache", n_layer=N_LAYER, n_embd=N_EMBD, n_head=N_HEAD, n_kv_head=LLAMA_KV_HEADS,
                            vocab_size=VOCAB, block_size=max_len, dropout=0.0, bias=False, position="rope",
                            norm="rmsnorm", mlp="swiglu", intermediate_size=LLAMA_FFN, tie_embeddings=False)
    return hf, Transformer(cfg).eval(), False, note


# ---- timing -----------------------------------------------------------------------------------------
def _timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


class Timed(float):
    """Returned by a run that times only part of itself (e.g. decode after an untimed prefill)."""


def interleaved(runs: dict[str, Callable[[], Any]], repeats: int, warmup: int = 1):
    """Run each callable `warmup` + `repeats` times, round-robin; return ({name: [seconds]}, {name: last output})."""
    times = {k: [] for k in runs}
    outs: dict[str, Any] = {}
    for r in range(warmup + repeats):
        for name, fn in runs.items():
            dt, outs[name] = _timed(fn)
            if isinstance(outs[name], Timed):
                dt = float(outs[name])
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


# ---- decode loops -------------------------------------------------------------------------------------
class Decoder:
    """Greedy decode driven step by step on one preallocated cache, optionally through a compiled
    step function. The cache is reused across runs: slots past the current position are masked,
    so stale entries from an earlier run are never read."""

    def __init__(self, model, max_len: int, compiled: bool = False):
        self.model = model
        self.max_len = max_len
        self.cache = model.new_cache(1, max_len)
        self.pos = torch.zeros(1, dtype=torch.long)  # the decode step's slot: a fixed 1-element tensor
        self.tok = torch.zeros(1, 1, dtype=torch.long)
        self.step_fn = self._step
        self.compiled = compiled
        self.warm = False
        if compiled:
            # Static shapes (the cache is preallocated, tok and pos are fixed tensors written in
            # place), so one graph serves every step. freezing: weights become constants that
            # inductor prepacks for its CPU matmuls; cpp_wrapper: the graph is called from C++, not
            # through a Python wrapper. Both only cut per-step overhead; the math is unchanged.
            self.step_fn = torch.compile(self._step, fullgraph=True, dynamic=False,
                                         options={"freezing": True, "cpp_wrapper": True})

    def _step(self, tok: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        return self.model(tok, self.cache, pos)[:, -1].argmax(dim=-1)

    def prefill(self, ids: torch.Tensor) -> torch.Tensor:
        t = ids.shape[1]
        return self.model(ids, self.cache, torch.arange(t))[:, -1].argmax(dim=-1)

    def decode(self, first: torch.Tensor, start: int, steps: int) -> torch.Tensor:
        """`steps` tokens, the first fed at slot `start`; returns the tokens produced (steps,)."""
        out = torch.empty(steps, dtype=torch.long)
        nxt = first
        # Once compiled, guards need not be re-checked every token: the inputs are the same tensors
        # each time (guard evaluation costs ~0.1-0.3 ms/token here). "Unsafe" only if a step could
        # need another graph; the tables check the compiled tokens against the eager ones.
        stance = torch.compiler.set_stance("default", skip_guard_eval_unsafe=True) \
            if self.compiled and self.warm else nullcontext()
        with stance:
            for i in range(steps):
                self.tok.copy_(nxt.view(1, 1))
                self.pos.fill_(start + i)
                nxt = self.step_fn(self.tok, self.pos)
                out[i] = nxt[0]
        return out

    def generate(self, prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
        first = self.prefill(prompt)
        if new_tokens <= 1:
            return first[:new_tokens]
        return torch.cat([first, self.decode(first, prompt.shape[1], new_tokens - 1)])

    def warm_compile(self, start: int) -> float:
        """First calls of the compiled step (compilation); returns their seconds."""
        t0 = time.perf_counter()
        self.decode(torch.zeros(1, dtype=torch.long), start, 3)
        self.warm = True
        return time.perf_counter() - t0


# ---- tables ---------------------------------------------------------------------------------------------
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


def table_speed(hf, model, prompt: torch.Tensor, new_tokens: int, repeats: int, decoder_c: Optional[Decoder],
                weights_shared: bool) -> dict[str, Any]:
    from llmlab.generation import generate

    n = new_tokens
    runs: dict[str, Callable[[], Any]] = {}
    if hf is not None:
        mask = torch.ones_like(prompt)
        runs["HF generate (DynamicCache)"] = lambda: hf.generate(
            prompt, attention_mask=mask, do_sample=False, max_new_tokens=n, min_new_tokens=n, pad_token_id=0)[0, -n:]
    runs["llmlab generate, cache"] = lambda: generate(model, prompt, n, temperature=0, use_cache=True)[0, -n:]
    runs["llmlab generate, no cache"] = lambda: generate(model, prompt, n, temperature=0, use_cache=False)[0, -n:]
    if decoder_c is not None:
        runs["llmlab compiled step loop"] = lambda: decoder_c.generate(prompt, n)
    times, outs = interleaved(runs, repeats)
    tps = {k: n / median(v) for k, v in times.items()}
    hf_tps = tps.get("HF generate (DynamicCache)")
    rows = []
    for k, v in tps.items():
        rows.append([k, _fmt(v), _fmt(1000 * median(times[k]) / n, 2),
                     "1.00x" if k.startswith("HF") else (f"{v / hf_tps:.2f}x" if hf_tps else "n/a")])
    print_table(f"Table 1: greedy decode, batch 1, prompt {prompt.shape[1]}, {n} new tokens "
                f"(median of {repeats})", ["run", "tokens/s", "ms/token", "vs HF"], rows)
    res: dict[str, Any] = {"hf_tokens_per_s": hf_tps,
                           "llmlab_cached_tokens_per_s": tps["llmlab generate, cache"],
                           "llmlab_uncached_tokens_per_s": tps["llmlab generate, no cache"]}
    if decoder_c is not None:
        res["llmlab_compiled_tokens_per_s"] = tps["llmlab compiled step loop"]
    if hf_tps:
        res["ratio"] = res["llmlab_cached_tokens_per_s"] / hf_tps
    ref = outs["llmlab generate, cache"]
    same_uncached = torch.equal(ref, outs["llmlab generate, no cache"])
    if hf is not None and weights_shared:
        match = torch.equal(ref, outs["HF generate (DynamicCache)"])
        res["tokens_match"] = match
        print(f"tokens match: {'yes' if match else 'no'} (llmlab cached vs HF greedy, {n} tokens)")
    elif hf is not None:
        print("tokens match: n/a (weights differ)")
    print(f"cached vs uncached llmlab tokens: {'same' if same_uncached else 'DIFFERENT'}")
    if decoder_c is not None:
        print(f"compiled step loop tokens: {'same' if torch.equal(ref, outs['llmlab compiled step loop']) else 'DIFFERENT'}")
    return res


def table_contexts(model, contexts: list[int], decode_steps: int, repeats: int, compile: bool,
                   seed: int) -> list[dict[str, Any]]:
    gen = torch.Generator().manual_seed(seed + 1)
    results, rows = [], []
    for c in contexts:
        dec = Decoder(model, c + decode_steps)  # sized as generate() sizes its cache: prompt + new tokens
        decoder_c, compile_s = make_compiled(model, c + decode_steps) if compile else (None, None)
        ids = torch.randint(0, model.config.vocab_size, (1, c + decode_steps), generator=gen)
        ctx = ids[:, :c]
        first = ids[0, c:c + 1]

        def uncached():  # each step recomputes the whole sequence so far (no cache at all)
            for i in range(UNCACHED_STEPS):
                model(ids[:, : c + i + 1])[:, -1].argmax(-1)

        runs: dict[str, Callable[[], Any]] = {
            "prefill": lambda: dec.prefill(ctx),
            "decode": lambda: dec.decode(first, c, decode_steps),
            "uncached": uncached,
        }
        if decoder_c is not None:
            def compiled():
                decoder_c.prefill(ctx)  # eager, untimed
                return Timed(_timed(lambda: decoder_c.decode(first, c, decode_steps))[0])

            runs["compiled"] = compiled
            runs["eager decode tokens"] = lambda: dec.decode(first, c, decode_steps)  # untimed check below
            runs["compiled decode tokens"] = lambda: decoder_c.decode(first, c, decode_steps)
        times, outs = interleaved(runs, repeats)
        r = {"context": c, "prefill_tokens_per_s": c / median(times["prefill"]),
             "decode_tokens_per_s": decode_steps / median(times["decode"]),
             "uncached_tokens_per_s": UNCACHED_STEPS / median(times["uncached"])}
        if decoder_c is not None:
            r["compiled_decode_tokens_per_s"] = decode_steps / median(times["compiled"])
            r["compile_s"] = compile_s
            r["compiled_tokens_same"] = torch.equal(outs["eager decode tokens"], outs["compiled decode tokens"])
        results.append(r)
        row = [c, _fmt(r["prefill_tokens_per_s"]), _fmt(r["decode_tokens_per_s"]),
               _fmt(r["uncached_tokens_per_s"], 1), f"{r['decode_tokens_per_s'] / r['uncached_tokens_per_s']:.1f}x"]
        if compile:
            if decoder_c is None:
                row += ["failed", "-", "-"]
            else:
                row += [_fmt(r["compiled_decode_tokens_per_s"]), f"{compile_s:.1f}",
                        "yes" if r["compiled_tokens_same"] else "NO"]
        rows.append(row)
    header = ["context", "prefill tok/s", "decode tok/s (cache)", "decode tok/s (no cache)", "cache speedup"]
    if compile:
        header += ["decode tok/s (compiled)", "compile s", "same tokens"]
    print_table(f"Table 2: prefill and decode at context C, batch 1 (decode: {decode_steps} cached steps "
                f"or {UNCACHED_STEPS} full recomputes from C; median of {repeats}; a cache of C+{decode_steps} "
                f"slots)", header, rows)
    return results


def make_compiled(model, max_len: int) -> tuple[Optional[Decoder], Optional[float]]:
    """A compiled Decoder for `max_len` slots, warmed up (compiled); (None, None) if compiling fails."""
    try:
        import torch._dynamo.config as dynamo_config

        for name in ("recompile_limit", "cache_size_limit"):  # one graph per cache size: allow many sizes
            if hasattr(dynamo_config, name):
                setattr(dynamo_config, name, max(64, getattr(dynamo_config, name)))
        dec = Decoder(model, max_len, compiled=True)
        return dec, dec.warm_compile(0)
    except Exception as e:  # noqa: BLE001 - report and go on without it
        print(f"note: torch.compile of the decode step failed ({type(e).__name__}: "
              f"{' '.join(str(e).split())[:200]}); compiled runs skipped")
        return None, None


def cache_bytes_rows(extra: Optional[tuple[str, Any]] = None, max_len: int = 64) -> list[dict[str, Any]]:
    """Measured `bytes_per_token()` of a fresh cache next to 2·n_layer·n_kv_head·head_dim·bytes for
    every preset in the registry (at the benchmark's sizes), plus the benchmark's own model."""
    from llmlab.model import Transformer
    from llmlab.presets import PRESETS, preset_config

    sizes = dict(n_layer=N_LAYER, n_embd=N_EMBD, n_head=N_HEAD, vocab_size=VOCAB, block_size=max_len)
    entries: list[tuple[str, Any]] = []
    for name in PRESETS:
        try:
            try:
                model = Transformer(preset_config(name, **sizes))
            except Exception:  # noqa: BLE001 - a preset whose kinds do not accept these sizes: its defaults
                model = Transformer(preset_config(name, vocab_size=VOCAB))
        except Exception as e:  # noqa: BLE001 - a preset that cannot build at all is skipped
            entries.append((name, e))
            continue
        entries.append((name, model))
    if extra is not None:
        entries.append(extra)
    out = []
    for name, model in entries:
        if isinstance(model, Exception):
            out.append({"name": name, "skipped": f"{type(model).__name__}: {' '.join(str(model).split())[:80]}"})
            continue
        cfg = model.config
        cache = model.new_cache(1, min(max_len, model.pos.max_positions or max_len))
        measured = cache.bytes_per_token()
        elem = model.tok_emb.weight.element_size()
        formula = (2 * cfg.n_layer * cfg.kv_heads * cfg.head_size * elem) if cfg.attention == "mha" else None
        out.append({"name": name, "attention": cfg.attention, "n_layer": cfg.n_layer, "n_head": cfg.n_head,
                    "kv_heads": cfg.kv_heads, "head_dim": cfg.head_size, "dtype": str(model.tok_emb.weight.dtype),
                    "measured": measured, "formula": formula})
    return out


def table_cache_bytes(extra=None) -> list[dict[str, Any]]:
    rows = []
    entries = cache_bytes_rows(extra)
    for e in entries:
        if "skipped" in e:
            rows.append([e["name"], "-", "-", "-", "-", "-", "skipped", e["skipped"]])
            continue
        f = e["formula"]
        ok = "" if f is None else ("yes" if f == e["measured"] else "NO")
        rows.append([e["name"], e["attention"], e["n_layer"], f"{e['n_head']}/{e['kv_heads']}", e["head_dim"],
                     e["dtype"].replace("torch.", ""), _fmt(e["measured"]), ("n/a" if f is None else _fmt(f)) +
                     (f" ({ok})" if ok else "")])
    print_table("Table 3: KV cache bytes per token (measured from the allocated buffers vs "
                "2*n_layer*n_kv_head*head_dim*bytes_per_element)",
                ["model", "attention", "layers", "heads/kv", "head_dim", "dtype", "measured B/token",
                 "formula B/token"], rows)
    return entries


# ---- main --------------------------------------------------------------------------------------------------
def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "decode":  # `python -m llmlab.bench decode ...` as well as the cli's remainder
        argv = argv[1:]
    ns = build_parser().parse_args(argv)
    for flag in ("prompt_len", "new_tokens", "repeats", "decode_steps"):
        if getattr(ns, flag) < 1:
            print(f"error: --{flag.replace('_', '-')} must be >= 1", file=sys.stderr)
            return 2
    contexts = _contexts(ns.contexts)
    max_len = max(ns.prompt_len + ns.new_tokens, max(contexts) + ns.decode_steps)

    with _threads(ns.threads), torch.inference_mode():
        hf, model, shared, note = build_models(ns.shape, max_len, not ns.no_hf, ns.seed)
        print(f"llmlab bench decode: shape {ns.shape}, {N_LAYER} layers, d_model {N_EMBD}, {N_HEAD} heads"
              f"{f' ({LLAMA_KV_HEADS} KV heads)' if ns.shape == 'llama' else ''}, vocab {VOCAB}, "
              f"max length {max_len}; torch {torch.__version__}, {torch.get_num_threads()} threads"
              + (f"; HF weights shared: {'yes' if shared else 'no'}" if hf is not None else "; no HF"))
        if note:
            print(f"note: {note}")
        if model is None:
            print(f"note: --shape {ns.shape} needs llmlab.from_hf support for it; skipped")
            print(json.dumps({"shape": ns.shape, "skipped": note}))
            return 0

        decoder_c, compile_s = None, None
        if ns.compile:  # cache sized as generate() sizes it: prompt + new tokens
            decoder_c, compile_s = make_compiled(model, ns.prompt_len + ns.new_tokens)
            if decoder_c is not None:
                print(f"torch.compile of the decode step ({ns.prompt_len + ns.new_tokens}-slot cache): "
                      f"{compile_s:.1f} s (first calls; inductor's on-disk cache makes reruns faster)")

        gen = torch.Generator().manual_seed(ns.seed)
        prompt = torch.randint(0, VOCAB, (1, ns.prompt_len), generator=gen)
        speed = table_speed(hf, model, prompt, ns.new_tokens, ns.repeats, decoder_c, shared)
        ctx = table_contexts(model, contexts, ns.decode_steps, ns.repeats, ns.compile, ns.seed)
        if ns.compile:
            graphs = _compiled_graphs()
            if graphs is not None:
                print(f"compiled step: {graphs} graph(s) compiled for {1 + len(contexts)} cache sizes "
                      "(one per size: no recompilation per token)")
        entries = table_cache_bytes((f"bench model ({ns.shape})", model))

    summary = {"shape": ns.shape, "weights_shared": shared, **speed,
               "contexts": [{k: (round(v, 1) if isinstance(v, float) else v) for k, v in r.items()} for r in ctx],
               "cache_bytes_per_token": {e["name"]: e.get("measured") for e in entries if "skipped" not in e}}
    if compile_s is not None:
        summary["compile_s"] = compile_s
    print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in summary.items()}))
    return 0


def _compiled_graphs() -> Optional[int]:
    try:
        from torch._dynamo.utils import counters
        return int(counters["stats"]["unique_graphs"])
    except Exception:  # noqa: BLE001 - a private counter: report nothing if it moved
        return None


if __name__ == "__main__":
    sys.exit(main())
