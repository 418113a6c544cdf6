"""Loss curves of a run, from its metrics.jsonl (and, for MoE models, each MoE layer's expert load
max/mean per step in a second panel)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from llmlab.errors import LlmlabError
from llmlab.fsutil import atomic_write_bytes, check_out_path, one_line

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
CHECKPOINT_FILES = ("config.json", "model.safetensors", "train_state.safetensors", "dcp", "tokenizer.json")


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
    """The PNG to write: RUN_DIR/loss.png, --out itself, or loss.png inside an --out directory.
    Never a file that is not a PNG already, nor anything inside a checkpoint."""
    if out is None:
        return run_dir / "loss.png"
    text = str(out)
    if text.strip() == "":
        raise LlmlabError("--out is empty; pass a PNG path or a directory")
    path = Path(text).expanduser()
    if text.endswith(("/", "\\")) or path.is_dir():
        path = path / "loss.png"
    if path.suffix.lower() != ".png":
        raise LlmlabError(f"--out {path} is not a .png file name; pass NAME.png or a directory (DIR/loss.png)")
    path = check_out_path(path, "--out", directory=False)
    parent = path.parent
    if any((parent / name).exists() for name in CHECKPOINT_FILES):
        raise LlmlabError(f"--out {path} is inside a checkpoint ({parent}); write the plot elsewhere")
    if path.is_symlink() or (path.exists() and not _is_png(path)):
        raise LlmlabError(f"--out {path} exists and is not a PNG image; nothing was overwritten: pass another path")
    return path


def _is_png(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            return fh.read(len(PNG_MAGIC)) == PNG_MAGIC
    except OSError:
        return False


def _describe(run_dir: Path) -> str:
    """'data X, N params' from the run's checkpoint, or '' when it has none (yet)."""
    from llmlab import checkpoint as ckpt
    from llmlab.memory import count_params

    try:
        directory = ckpt.resolve_checkpoint(run_dir)
        meta = ckpt.read_meta(directory)
        params = count_params(ckpt.model_config(meta, directory))
    except LlmlabError:
        return ""
    data = meta["train"].get("data") or "built-in corpus"
    preset = meta["train"].get("preset")
    return ", ".join(x for x in (preset and f"preset {preset}", f"data {Path(str(data)).name}",
                                 f"{params / 1e6:.2f}M params") if x)


def _y_top(train: list, val: list) -> Optional[float]:
    """An upper y limit the first steps' loss (often 2x the rest) does not set: the highest val loss
    past step 0, or the 98th percentile of train losses past the first tenth of the steps."""
    import numpy as np

    tail = [v for s, v in val if s > 0]
    if train:
        cut = train[0][0] + 0.1 * (train[-1][0] - train[0][0])
        later = [v for s, v in train if s >= cut]
        if later:
            tail.append(float(np.percentile(later, 98)))
    return max(tail) * 1.08 if tail else None


def plot_run(run_dir: Path, out=None) -> Path:
    """Write the loss curves as a PNG (atomically) and return the path of the file written."""
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
    for i, (step, _) in enumerate(_points(recs, "resumed_at")):
        ax.axvline(step, color="grey", linestyle="--", linewidth=1, label="resumed" if i == 0 else None)
    top = _y_top(train, val)
    if top is not None:
        low = min(v for _, v in train + val)
        ax.set_ylim(max(0.0, low - 0.05 * (top - low)), top)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    details = _describe(run_dir)
    ax.set_title(run_dir.resolve().name + (f"\n{details}" if details else ""), fontsize=10)
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
