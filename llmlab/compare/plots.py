"""The comparison's pictures, from results.json only: the quality/memory frontier (val loss ± spread
against cache bytes per token, one point per attention configuration), val loss vs step (mean over
seeds), decode tokens/s vs context, and cache bytes per token. Each PNG is written atomically."""
from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from llmlab.compare.results import attention_label, base_key, decode_speed, model_key, ok, val
from llmlab.fsutil import atomic_write_bytes


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return path


def style(i: int) -> dict:
    """Ten colours, then the same colours dash-dotted, then dotted: many lines stay apart."""
    return {"color": f"C{i % 10}", "linestyle": ("-", "-.", ":")[min(i // 10, 2)]}


def frontier(ax, doc: dict) -> None:
    """Val loss (mean, error bar = standard deviation over seeds) vs cache bytes/token, one series per
    set of entries that differ only in attention."""
    from matplotlib.ticker import FuncFormatter, NullFormatter

    groups: dict[tuple, list[dict]] = {}
    seen = set()
    for e in ok(doc):
        if e["cache_bytes_per_token"] and model_key(e["config"]) not in seen:  # one point per model
            seen.add(model_key(e["config"]))
            groups.setdefault(base_key(e["config"]), []).append(e)
    for i, members in enumerate(m for m in groups.values() if len(m) > 1):
        c = members[0]["config"]
        base = f"{c['position']} positions, {c['norm']}, {c['mlp']}"
        # two curves per base: heads sharing keys/values (MHA -> GQA -> MQA) and MLA's latent ranks
        for family, marker, ls in (("MHA/GQA/MQA", "o", "-"), ("MLA", "s", "--")):
            fam = sorted((e for e in members if (e["config"]["attention"] == "mla") == (family == "MLA")),
                         key=lambda e: e["cache_bytes_per_token"])
            if not fam:
                continue
            xs, ys = [e["cache_bytes_per_token"] for e in fam], [val(e).mean for e in fam]
            ax.errorbar(xs, ys, yerr=[val(e).sd or 0 for e in fam], marker=marker, capsize=3, linestyle=ls,
                        color=f"C{i}", label=f"{base}: {family}")
            for e, x, y in zip(fam, xs, ys):
                ax.annotate(f"{e['name']} ({attention_label(e['config'])})", (x, y), textcoords="offset points",
                            xytext=(5, 5 if family != "MLA" else -11), fontsize=7, color=f"C{i}")
    ax.set_xscale("log")
    ticks = sorted({e["cache_bytes_per_token"] for m in groups.values() if len(m) > 1 for e in m})
    if ticks:
        ax.set_xticks(ticks)
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set(xlabel="cache bytes per token (all layers, log scale)", ylabel="val loss (nats/token), mean ± sd",
           title="quality vs cache: attention kinds, everything else equal (lower left is better)")
    ax.grid(alpha=0.3, which="both")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)


def write_plots(out: Path, doc: dict[str, Any], names: dict[str, str]) -> dict[str, Path]:
    entries = ok(doc)
    if not entries:
        return {}
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    paths = {}
    fig, ax = plt.subplots(figsize=(10, 6))
    frontier(ax, doc)
    paths["frontier"] = _save(fig, out / names["frontier"])

    fig, ax = plt.subplots(figsize=(10, 5.5))
    for i, e in enumerate(entries):
        curves = [c for c in e["val_curves"] if c]
        if curves:
            steps = [s for s, _ in curves[0]]
            mean = [sum(c[j][1] for c in curves) / len(curves) for j in range(len(steps))]
            ax.plot(steps, mean, marker="o", ms=3, label=f"{e['name']} ({len(curves)} seeds)", **style(i))
    ax.set(xlabel="step", ylabel="val loss (nats/token), mean over seeds",
           title="validation loss vs step (same data, seeds, steps)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, bbox_to_anchor=(1.01, 1), loc="upper left")
    paths["val_loss"] = _save(fig, out / names["val_loss"])

    fig, ax = plt.subplots(figsize=(11, 6))
    ctxs = doc["settings"]["contexts"]
    for i, e in enumerate(entries):
        for variant, mark, ls in (("own", "o", None), ("compiled", "s", ":")):
            r = [decode_speed(e, variant, c) for c in ctxs]
            if all(x is not None for x in r):
                kw = style(i) | ({"linestyle": ls} if ls else {})
                ax.errorbar(ctxs, [x.median for x in r], yerr=[[x.median - x.lo for x in r], [x.hi - x.median for x in r]],
                            marker=mark, ms=4, capsize=2, label=f"{e['name']} ({e['decode_path']}"
                            f"{', compiled' if variant == 'compiled' else ''})", **kw)
    ax.set(xlabel="context length (tokens)", ylabel="decode tokens/s (batch 1), median and min-max",
           title="decode speed vs context")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xticks(ctxs, [str(c) for c in ctxs])
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=6, bbox_to_anchor=(1.01, 1), loc="upper left")
    paths["decode"] = _save(fig, out / names["decode"])

    fig, ax = plt.subplots(figsize=(10, 4.5))
    values = [e["cache_bytes_per_token"] or 0 for e in entries]
    bars = ax.bar([e["name"] for e in entries], values,
                  color=["#bbb" if not e["cache_bytes_per_token"] else "C0" for e in entries])
    for b, e in zip(bars, entries):
        label = "no cache" if not e["cache_bytes_per_token"] else f"{e['cache_bytes_per_token']:,}"
        ax.annotate(label, (b.get_x() + b.get_width() / 2, b.get_height()), ha="center", va="bottom", fontsize=7)
    ax.set(ylabel="bytes per token (all layers)", title="cache bytes per token")
    ax.tick_params(axis="x", rotation=40)
    paths["cache"] = _save(fig, out / names["cache"])
    return paths
