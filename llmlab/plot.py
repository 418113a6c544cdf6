"""Loss curves of a run, from its metrics.jsonl (and, for MoE models, each MoE layer's expert load
max/mean per step in a second panel)."""
from __future__ import annotations

import json
from pathlib import Path

from llmlab.errors import LlmlabError
from llmlab.fsutil import atomic_write_bytes, check_out_path, one_line


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise LlmlabError(f"{run_dir} has no metrics.jsonl; pass a run directory written by `llmlab train`")
    records = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue  # a line cut short by a crash
        if isinstance(rec, dict):
            records.append(rec)
    return records


def _points(recs: list[dict], key: str) -> list[tuple[float, float]]:
    # only well-formed numbers: a hand-edited or foreign line is skipped, not a traceback
    num = (int, float)
    return [(r["step"], r[key]) for r in recs
            if isinstance(r.get("step"), num) and isinstance(r.get(key), num) and not isinstance(r.get(key), bool)]


def _layer_points(recs: list[dict], key: str) -> list[list[tuple[float, float]]]:
    """Per MoE layer, (step, value) of a per-layer list such as `expert_load` (malformed lines skipped)."""
    rows = [(r["step"], r[key]) for r in recs if isinstance(r.get("step"), (int, float))
            and isinstance(r.get(key), list) and all(isinstance(v, (int, float)) for v in r[key])]
    n = max((len(v) for _, v in rows), default=0)
    return [[(s, v[i]) for s, v in rows if len(v) == n] for i in range(n)]


def _plot_expert_load(ax, loads: list[list[tuple[float, float]]]) -> None:
    for i, points in enumerate(loads):
        ax.plot(*zip(*points), label=f"MoE layer {i + 1}", alpha=0.8)
    ax.axhline(1.0, color="gray", linestyle=":", linewidth=1)  # perfectly even load
    ax.set_xlabel("step")
    ax.set_ylabel("expert load max/mean")
    ax.legend()
    ax.grid(alpha=0.3)


def _out_path(run_dir: Path, out) -> Path:
    """The PNG to write: RUN_DIR/loss.png, --out itself, or loss.png inside an --out directory."""
    if out is None:
        return run_dir / "loss.png"
    if str(out).strip() == "":
        raise LlmlabError("--out is empty; pass a PNG path or a directory")
    if Path(out).expanduser().is_dir():
        out = Path(out).expanduser() / "loss.png"
    return check_out_path(out, "--out", directory=False)


def plot_run(run_dir: Path, out=None) -> Path:
    """Write the loss curves as a PNG (atomically, whatever the file name's extension) and return
    the path of the file written."""
    import io

    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    out = _out_path(run_dir, out)
    recs = read_metrics(run_dir)
    train = _points(recs, "loss")
    val = _points(recs, "val_loss")
    if not train and not val:
        raise LlmlabError(f"{run_dir / 'metrics.jsonl'} holds no losses yet")
    loads = _layer_points(recs, "expert_load")
    fig, axes = plt.subplots(2 if loads else 1, 1, figsize=(7, 7 if loads else 4), squeeze=False)
    ax = axes[0][0]
    if train:
        ax.plot(*zip(*train), label="train loss", alpha=0.6)
    if val:
        ax.plot(*zip(*val), "o-", label="val loss")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(run_dir.name)
    ax.legend()
    ax.grid(alpha=0.3)
    if loads:
        _plot_expert_load(axes[1][0], loads)
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=100)
    plt.close(fig)
    try:
        atomic_write_bytes(out, png.getvalue())
    except OSError as e:
        raise LlmlabError(f"cannot write {out} ({one_line(e)}); pass an --out you can write to") from None
    return out
