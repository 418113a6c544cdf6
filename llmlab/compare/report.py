"""A comparison's report: DIR/results.json (a list, one object per preset), DIR/report.md (one
table, a row per preset, from exactly those numbers) and three PNG plots. Only formats what the
workers measured; measures nothing itself."""
from __future__ import annotations

import datetime
import json
import os
import platform
from pathlib import Path
from typing import Any, Optional

from llmlab.compare.runner import WARMUP_STEPS

PLOTS = {"val_loss": "val_loss.png", "decode": "decode.png", "cache": "cache_bytes.png"}


def machine() -> str:
    """One line: CPU model and cores (or the GPU), OS, Python and torch versions."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = f", GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ", no GPU"
    return (f"{cpu}, {os.cpu_count()} cores{gpu}; {platform.system()} {platform.release()}; "
            f"Python {platform.python_version()}, torch {torch.__version__}")


def _num(x: Optional[float], digits: int = 0) -> str:
    return "n/a" if x is None else f"{x:,.{digits}f}"


def columns(contexts: list[int], compile: bool) -> list[str]:
    cols = ["preset", "status", "params", "params vs first", "val loss (last eval)", "val loss (whole val split)",
            "train tokens/s", "peak memory (MiB)", "decode path"]
    cols += [f"decode tokens/s @ {c}" for c in contexts]
    if compile:
        cols += [f"compiled decode tokens/s @ {c}" for c in contexts]
    return cols + ["cache bytes/token"]


def row(r: dict[str, Any], contexts: list[int], compile: bool) -> list[str]:
    """The table's cells of one result: the JSON's own numbers, formatted (never recomputed)."""
    if r["status"] != "ok":
        reason = r.get("error", "").replace("|", "/")
        return [r["preset"], f"failed: {reason}"] + ["-"] * (len(columns(contexts, compile)) - 2)
    by_ctx = {d["context"]: d for d in r["decode"]}
    cells = [r["preset"], "ok" + (" (reused)" if r.get("reused") else ""), _num(r["params"]),
             f"{r['params_vs_first']:.3f}x", _num(r["val_loss"], 4), _num(r["val_loss_whole"], 4),
             _num(r["train_tokens_per_s"]), _num(r["peak_mem_mib"], 1), r["decode_path"]]
    cells += [_num(by_ctx[c]["tokens_per_s"]) for c in contexts]
    if compile:
        cells += [_num(by_ctx[c]["compiled_tokens_per_s"]) for c in contexts]
    return cells + [_num(r["cache_bytes_per_token"])]


def markdown_table(results: list[dict[str, Any]], contexts: list[int], compile: bool) -> str:
    cols = columns(contexts, compile)
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" if i < 2 else "---:" for i in range(len(cols))) + "|"]
    lines += ["| " + " | ".join(row(r, contexts, compile)) + " |" for r in results]
    return "\n".join(lines)


def _add_relative_params(results: list[dict[str, Any]]) -> None:
    ok = [r for r in results if r["status"] == "ok"]
    for r in ok:
        r["params_vs_first"] = round(r["params"] / ok[0]["params"], 3)


def write_report(out: Path, results: list[dict[str, Any]], s, wall_s: float) -> dict[str, Path]:
    from llmlab.checkpoint import write_json_atomically

    _add_relative_params(results)
    ok = [r for r in results if r["status"] == "ok"]
    write_json_atomically(out / "results.json", results)
    paths = {"results": out / "results.json", "report": out / "report.md"}
    paths.update(write_plots(out, ok))
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    reused = sum(bool(r.get("reused")) for r in results)
    measured_s = sum(r.get("wall_s", 0) for r in ok)
    failed = [r for r in results if r["status"] != "ok"]
    dates = sorted(r["measured_at"] for r in ok if r.get("measured_at"))
    when = f" (presets measured {dates[0]}" + (f" to {dates[-1]})" if dates[-1] != dates[0] else ")") if dates else ""
    data = s.data or "the built-in corpus (Python standard-library sources)"
    text = f"""# llmlab compare

- Date: {date}{when}. Machine: {machine()}; device {ok[0]['device'] if ok else s.device}; torch threads per preset: {s.threads or "torch's default"}.
- Time: the presets' processes (training and measuring) took {measured_s:.0f} s together; this invocation
  ran {len(results) - reused} preset(s) and reused {reused} finished earlier, in {wall_s:.0f} s.
- Same for every preset: data {data}, tokenizer {s.tokenizer}, seed {s.seed}, {s.max_iters} steps of
  {s.batch_size} x {s.block_size} tokens (lr {s.lr}, warmup and cosine as `llmlab train`), evals every
  {s.eval_interval} steps over {s.eval_iters} batches; sizes n_layer {s.n_layer}, n_head {s.n_head}, n_embd {s.n_embd}.
  Per-preset overrides: {json.dumps(s.overrides) if s.overrides else 'none'}.
- Parameter counts: the sizes are equal, so counts differ only where a rung's parts do (fewer key/value
  heads, latent projections, SwiGLU and an untied head, no position table); "params vs first" is each
  count over {ok[0]['preset'] if ok else 'the first preset'}'s.

{markdown_table(results, s.contexts, s.compile)}

Columns: **val loss (last eval)**: mean cross-entropy (nats/token) of the final weights over the eval
batches `llmlab train` logs; **whole val split**: the same evaluation (`llmlab.training.evaluate.mean_loss`)
over every consecutive {s.block_size}-token window of the validation split{f' (its first {s.val_tokens:,} tokens)' if s.val_tokens else ''}. **train tokens/s**: median
over the training steps (first {WARMUP_STEPS} left out). **peak memory**: on a CPU the peak resident memory of the
preset's process after training (Python and torch included), on CUDA
`torch.cuda.max_memory_allocated`. **decode tokens/s @ C**: batch-1 greedy decoding of
{s.decode_steps} tokens after a context of C tokens through `llmlab.stream`, on the rung's own path
(*recompute*: the whole window every token, as nanoGPT; *cache*: its KV/latent cache; *paged kernel*:
flash_mla's paged latent cache and decode kernel), median of {s.repeats} after a warm-up round.
**compiled**: the same with the compiled one-token step (n/a: the rung recomputes, or decodes through its
own kernel). **cache bytes/token**: measured from a fresh cache's buffers (n/a: no cache).
Timings come from a {'shared, noisy ' if (os.cpu_count() or 0) <= 4 else ''}machine: compare rows of one
report, not across reports.
"""
    if failed:
        text += "\nFailed: " + "; ".join(f"{r['preset']} ({r.get('error', '')})" for r in failed) + "\n"
    text += "".join(f"\n![{k}]({name})\n" for k, name in PLOTS.items() if (out / name).exists())
    tmp = out / ".report.md.tmp"
    tmp.write_text(text)
    os.replace(tmp, out / "report.md")
    return paths


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    tmp = path.with_name(f".{path.stem}.tmp.png")  # written whole, then renamed into place
    fig.tight_layout()
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def write_plots(out: Path, ok: list[dict[str, Any]]) -> dict[str, Path]:
    """Val loss vs step (every preset on one chart), decode tokens/s vs context, cache bytes/token."""
    if not ok:
        return {}
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    paths = {}
    def style(i: int) -> dict:  # ten colours, then the same colours dash-dotted: 11+ presets stay apart
        return {"color": f"C{i % 10}", "linestyle": "-" if i < 10 else "-."}

    fig, ax = plt.subplots(figsize=(9, 5))
    for i, r in enumerate(ok):
        if r["val_curve"]:
            steps, losses = zip(*r["val_curve"])
            ax.plot(steps, losses, marker="o", ms=3, label=r["preset"], **style(i))
    ax.set(xlabel="step", ylabel="val loss (nats/token)", title="validation loss vs step (same data, seed, steps)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, bbox_to_anchor=(1.01, 1), loc="upper left")
    paths["val_loss"] = _save(fig, out / PLOTS["val_loss"])

    fig, ax = plt.subplots(figsize=(10, 5.5))
    for i, r in enumerate(ok):
        ctx = [d["context"] for d in r["decode"]]
        ax.plot(ctx, [d["tokens_per_s"] for d in r["decode"]], marker="o", label=f"{r['preset']} ({r['decode_path']})",
                **style(i))
        comp = [d["compiled_tokens_per_s"] for d in r["decode"]]
        if all(c is not None for c in comp):
            ax.plot(ctx, comp, marker="s", color=f"C{i % 10}", linestyle=":", label=f"{r['preset']} (compiled)")
    ax.set(xlabel="context length (tokens)", ylabel="decode tokens/s (batch 1)", title="decode speed vs context")
    ax.set_yscale("log")
    ax.set_xticks(sorted({d["context"] for r in ok for d in r["decode"]}))
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, bbox_to_anchor=(1.01, 1), loc="upper left")
    paths["decode"] = _save(fig, out / PLOTS["decode"])

    fig, ax = plt.subplots(figsize=(8, 4))
    names = [r["preset"] for r in ok]
    values = [r["cache_bytes_per_token"] or 0 for r in ok]
    bars = ax.bar(names, values, color=["#bbb" if r["cache_bytes_per_token"] is None else "C0" for r in ok])
    for b, r in zip(bars, ok):
        label = "no cache" if r["cache_bytes_per_token"] is None else f"{r['cache_bytes_per_token']:,}"
        ax.annotate(label, (b.get_x() + b.get_width() / 2, b.get_height()), ha="center", va="bottom", fontsize=7)
    ax.set(ylabel="bytes per token (all layers)", title="cache bytes per token")
    ax.tick_params(axis="x", rotation=30)
    paths["cache"] = _save(fig, out / PLOTS["cache"])
    return paths
