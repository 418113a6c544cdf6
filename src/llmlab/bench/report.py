"""The decode benchmark's tables, printed from llmlab.bench.measure's numbers."""
from __future__ import annotations

from typing import Any, Optional

from llmlab.bench.measure import HF_RUN
from llmlab.bench.shapes import UNCACHED_STEPS


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


