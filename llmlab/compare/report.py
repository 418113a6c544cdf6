"""DIR/report.md and the plots, from a results.json document only (llmlab.compare.results): the
claims table, the ladder (each rung against its parent), speeds, the attention kinds on one base,
and the controlled pairs of rungs that change several things at once. Measures nothing itself;
docs/make_ladder.py renders the same tables into docs/ladder.md."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from llmlab.compare import claims as claims_mod
from llmlab.compare.results import (attention_label, by_name, change_groups, config_diff, decode_speed, describe,
                                    ok, train_speed, val)
from llmlab.compare.stats import compare_means
from llmlab.fsutil import atomic_write_bytes, atomic_write_json

PLOTS = {"frontier": "frontier.png", "val_loss": "val_loss.png", "decode": "decode.png", "cache": "cache_bytes.png"}


def _num(x: Optional[float], digits: int = 0) -> str:
    return "n/a" if x is None else f"{x:,.{digits}f}"


def _table(header: list[str], rows: list[list[str]], left: int = 2) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" if i < left else "---:" for i in range(len(header))) + "|"]
    lines += ["| " + " | ".join(c.replace("|", "/") for c in r) + " |" for r in rows]
    return "\n".join(lines)


def versus_parent(doc: dict, e: dict) -> str:
    parent = by_name(doc).get(e.get("parent") or "")
    if parent is None:
        return "–" if not e.get("parent_label") else f"({e['parent_label']} not compared)"
    return compare_means(val(e), val(parent))[2]


def ladder_table(doc: dict) -> str:
    header = ["preset", "changes vs parent", "params", "val loss (whole split)", "Δ vs parent", "val loss (last eval)",
              "cache bytes/token", "decode path", "peak memory (MiB)"]
    rows = []
    for e in doc["entries"]:
        if e["status"] != "ok":
            rows.append([e["name"], f"failed: {e.get('error', '')}"] + ["-"] * (len(header) - 2))
            continue
        changes = f"{e['parent_label']}: {describe(e['changes'])}" if e.get("parent_label") else "(first rung)"
        rows.append([e["name"], changes, _num(e["params"]), val(e).text(), versus_parent(doc, e),
                     val(e, "val_loss").text(), _num(e["cache_bytes_per_token"]) if e["cache_bytes_per_token"]
                     else "no cache", e["decode_path"], _num(e["peak_mem_mib"], 1)])
    return _table(header, rows)


def speed_table(doc: dict) -> str:
    ctxs = doc["settings"]["contexts"]
    variants = ("own", "compiled") if doc["settings"]["compile"] else ("own",)
    header = ["preset", "train tokens/s"] + [f"decode tok/s @ {c}" for c in ctxs] + \
        ([f"compiled @ {c}" for c in ctxs] if doc["settings"]["compile"] else [])
    rows = []
    for e in ok(doc):
        t = e.get("timing", {})
        if t.get("error") and not t.get("rounds"):
            rows.append([e["name"], f"not timed: {t['error']}"] + ["-"] * (len(header) - 2))
            continue
        cells = [e["name"], (train_speed(e).text() if train_speed(e) else "n/a")]
        for variant in variants:
            cells += [(r.text() if (r := decode_speed(e, variant, c)) else "n/a") for c in ctxs]
        rows.append(cells)
    return _table(header, rows, left=1)


def attention_tables(doc: dict) -> str:
    """One table per set of entries that differ only in attention (MHA first, then by cache)."""
    out = []
    ctx = max(doc["settings"]["contexts"])
    variants = ("own", "compiled", "decompressing") if doc["settings"]["compile"] else ("own", "decompressing")
    for mha, others in claims_mod.groups(doc):
        block = ", ".join(f"{k} {mha['config'][k]}" for k in ("position", "norm", "mlp", "tie_embeddings", "bias"))
        rows = []
        for e in [mha] + sorted(others, key=lambda x: -(x["cache_bytes_per_token"] or 0)):
            cache = e["cache_bytes_per_token"]
            speeds = {v: decode_speed(e, v, ctx) for v in variants}
            rows.append([e["name"], attention_label(e["config"]), _num(e["params"]), _num(cache),
                         f"{cache / mha['cache_bytes_per_token']:.3f}" if cache else "n/a", val(e).text(),
                         "–" if e is mha else compare_means(val(e), val(mha))[2]]
                        + [s.text() if s else "n/a" for s in speeds.values()])
        out.append(f"On one base ({block}; everything else equal):\n\n" + _table(
            ["entry", "attention", "params", "cache bytes/token", "cache vs MHA", "val loss (whole split)", "Δ vs MHA",
             f"decode tok/s @ {ctx}"] + [f"{v} @ {ctx}" for v in variants[1:]], rows))
    return "\n\n".join(out) if out else "No two entries differ only in attention."


def controlled_pairs(doc: dict) -> str:
    """For each entry that changes several things against its parent: entries of this comparison
    that split the change, each pair differing in one thing only."""
    lines = []
    named = by_name(doc)
    for e in ok(doc):
        groups = e.get("change_groups", [])
        if len(groups) < 2:
            continue
        head = f"- **{e['name']}** changes {len(groups)} things against {e['parent_label']} ({', '.join(groups)})"
        found = []
        parent = named.get(e.get("parent") or "")
        for x in ok(doc):
            if x is e or parent is None or x is parent:
                continue
            diff = config_diff(x["config"], e["config"])
            g = change_groups(diff)
            rest = config_diff(parent["config"], x["config"])
            # a clean split: parent -> x changes everything but one thing, x -> e that one thing
            if len(g) == 1 and set(change_groups(rest)) == set(groups) - set(g):
                found.append(f"{x['name']} → {e['name']} changes only {describe(diff)}: "
                             f"{compare_means(val(e), val(x))[2]}; {parent['name']} → {x['name']} changes the "
                             f"rest ({describe(rest)}): {compare_means(val(x), val(parent))[2]}")
        lines.append(head + (": " + "; ".join(found) if found else
                             ": no controlled pair in this comparison (add one: --presets NAME=PRESET --set NAME:KEY=VALUE)"))
    return "\n".join(lines) if lines else "Every rung here changes one thing against its parent."


def settings_text(doc: dict) -> str:
    s = doc["settings"]
    data = s["data"] or "the built-in corpus (Python standard-library sources)"
    seeds = f"seeds {s['seed']}..{s['seed'] + s['seeds'] - 1}" if s["seeds"] > 1 else f"seed {s['seed']}"
    return (f"Same for every run: data {data}, tokenizer {s['tokenizer']}, {seeds} (one run per preset and seed), "
            f"{s['max_iters']} steps of {s['batch_size']} x {s['block_size']} tokens (lr {s['lr']}, warmup and cosine "
            f"as `llmlab train`), evals every {s['eval_interval']} steps over {s['eval_iters']} batches; n_layer "
            f"{s['n_layer']}, n_head {s['n_head']}, n_embd {s['n_embd']}; per-preset settings: "
            f"{', '.join(s['set']) if s['set'] else 'none'}.")


def timing_text(doc: dict) -> str:
    s = doc["settings"]
    return (f"Speeds: {s['rounds']} rounds, round-robin over one process per preset (the order of turns is in "
            f"results.json), after an untimed warm-up round; each cell is the median with the min–max over the "
            f"rounds. Decode: batch 1, {s['decode_steps']} greedy tokens after a context of C tokens "
            "(a recomputing rung: 1), on random weights of the rung's architecture (speed does not depend on "
            "their values; learned positions get a table as long as the longest context).")


def render(doc: dict, plots: list[str]) -> str:
    threads = doc["settings"]["threads"] or "torch's default"
    entries = ok(doc)
    device = entries[0]["device"] if entries else doc["settings"]["device"]
    text = f"""# llmlab compare

- Date: {doc['date']}. Machine: {doc['machine']}; device {device}; torch threads per process: {threads}.
- Time: {doc['wall_s']:.0f} s for this invocation ({sum(1 for e in doc['entries'] for r in e['runs'] if r.get('reused'))} run(s) reused).
- {settings_text(doc)}
- {timing_text(doc)}

## Claims

Each rung's claim, checked against results.json: ✓ holds, ✗ does not (its numbers stay here, with
a sentence on why it can fail), – not measured in this comparison. A difference inside the noise
is never a win (val loss: mean ± standard deviation over seeds, noise = 2 standard errors of the
difference; speed: ranges over the rounds that overlap).

{claims_mod.markdown(claims_mod.evaluate(doc))}

## The ladder: each rung against its parent

{ladder_table(doc)}

Rungs that change several things at once, split into controlled pairs:

{controlled_pairs(doc)}

## Attention kinds, everything else equal

{attention_tables(doc)}

## Speed

{speed_table(doc)}

Columns: **val loss**: mean cross-entropy (nats/token) of the final weights, mean ± standard
deviation over the seeds; whole split: every consecutive block of the validation split
(`llmlab.training.evaluate.mean_loss`, the same windows for every run: what the claims and the Δ
columns use); last eval: the sampled eval batches `llmlab train` logs. **Δ vs parent / MHA**:
difference of the whole-split means, "within noise" when inside 2 standard errors. **train tokens/s**:
the training step of `train()` on batch x block tokens. **decode tok/s @ C**: the rung's own path
(recompute, cache or paged kernel), eager; **compiled**: the cached one-token step through
torch.compile; **decompressing**: MLA expanding every cached latent each step instead of absorbing
the weights. **cache bytes/token**: measured from a fresh cache's buffers, all layers. **peak
memory**: the training process's peak resident memory (CPU) or `torch.cuda.max_memory_allocated`.
"""
    failed = [e for e in doc["entries"] if e["status"] != "ok"]
    if failed:
        text += "\nFailed: " + "; ".join(f"{e['name']} ({e.get('error', '')})" for e in failed) + "\n"
    text += "".join(f"\n![{Path(p).stem}]({p})\n" for p in plots)
    return text


def write_report(out: Path, doc: dict[str, Any]) -> dict[str, Path]:
    """results.json, the plots and report.md (in that order: the report names the plots written)."""
    from llmlab.compare.plots import write_plots

    atomic_write_json(out / "results.json", doc)
    paths = {"results": out / "results.json", "report": out / "report.md"}
    plots = write_plots(out, doc, PLOTS)
    paths.update(plots)
    atomic_write_bytes(out / "report.md", render(doc, [p.name for p in plots.values()]).encode("utf-8"))
    return paths
