"""The run directory at start: one `llmlab train` at a time (a lock), and repairs of what a kill
can leave behind, made before anything else reads it:
  - killed between the two renames that swap in a new last/: only `.last.old` is left -> renamed back;
  - killed while writing best/ after last/ recorded a better val loss -> best/ rebuilt from last/.
"""
from __future__ import annotations

import fcntl
import json
import os
import shutil
from pathlib import Path
from typing import Optional

from llmlab.errors import LlmlabError

LOCK_FILE = ".lock"
# Every name train writes in a run folder (files, or directories it replaces by rename)
RUN_ENTRIES = (LOCK_FILE, "metrics.jsonl", "last", "best", ".last.tmp", ".last.old", ".best.tmp", ".best.old")


def refuse_links(out: Path) -> None:
    """A link in a run folder would be written through: `.lock -> ~/.bashrc` truncated by the lock,
    `metrics.jsonl -> notes` appended to. llmlab never follows one there; it refuses in one line."""
    for name in RUN_ENTRIES:
        if (out / name).is_symlink():
            raise LlmlabError(f"{out / name} is a symbolic link; llmlab never writes through links in a run "
                              "folder: remove the link (or choose another --out)")


def open_no_follow(path: Path, flags: int) -> int:
    """os.open that fails instead of following a link planted after the check (O_NOFOLLOW)."""
    try:
        return os.open(path, flags | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0), 0o666)
    except OSError:
        if path.is_symlink():
            raise LlmlabError(f"{path} is a symbolic link; llmlab never writes through links in a run folder: "
                              "remove it") from None
        raise


class RunLock:
    """An exclusive flock on RUN/.lock for the life of the run (the OS drops it if the process
    dies, so a kill never leaves a stale lock). A second train on the same --out is refused."""

    def __init__(self, out: Path):
        self.out, self.created = Path(out), not Path(out).exists()
        self.out.mkdir(parents=True, exist_ok=True)
        refuse_links(self.out)
        self.fh = os.fdopen(open_no_follow(self.out / LOCK_FILE, os.O_RDWR | os.O_CREAT), "r+")
        try:
            fcntl.flock(self.fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.fh.seek(0)
            holder = self.fh.read().strip() or "another process"
            self.fh.close()
            raise LlmlabError(f"{self.out} is in use by another `llmlab train` ({holder}); wait for it to finish "
                              "or choose another --out") from None
        self.fh.seek(0)
        self.fh.truncate()
        self.fh.write(f"pid {os.getpid()}")
        self.fh.flush()

    def release(self) -> None:
        """Unlock; a directory this run created and left empty (it failed at once) is removed."""
        self.fh.close()
        if self.created and [p.name for p in self.out.iterdir()] == [LOCK_FILE]:
            shutil.rmtree(self.out, ignore_errors=True)


def _state(directory: Path) -> Optional[dict]:
    try:
        meta = json.loads((directory / "config.json").read_text())
    except (OSError, ValueError):
        return None
    state = meta.get("state") if isinstance(meta, dict) else None
    return state if isinstance(state, dict) else None


def _below(val: float, best_val) -> bool:
    """val beats best/'s recorded loss (a best/ without a readable one is beaten; 0.0 is a loss)."""
    return best_val is None or val < best_val


def _number(x) -> Optional[float]:
    """A number from a config.json a user may have edited; anything else counts as unknown."""
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else None


def recover(out: Path) -> list[str]:
    """Repair what a kill mid-checkpoint left; returns what was done (one line each)."""
    done = []
    for name in ("last", "best"):
        target, old = out / name, out / f".{name}.old"
        if not target.exists() and _state(old) is not None:  # killed between the two renames
            os.replace(old, target)
            done.append(f"recovered {target} from {old.name} (a checkpoint swap was interrupted)")
        shutil.rmtree(out / f".{name}.tmp", ignore_errors=True)  # a write that never finished
    last, best = _state(out / "last") or {}, _state(out / "best")
    val, best_val = _number(last.get("val_loss")), _number(last.get("best_val_loss"))
    if val is not None and best_val is not None and val <= best_val \
            and (best is None or _below(val, _number(best.get("val_loss")))):
        _best_from_last(out)  # last/ holds the best weights but best/ was not written (killed)
        done.append(f"rebuilt {out / 'best'} from {out / 'last'} (val loss {val:.4f}; "
                    "its write was interrupted)")
    return done


def _best_from_last(out: Path) -> None:
    from llmlab import checkpoint as ckpt
    from llmlab.training import dcp

    if dcp.is_sharded(out / "last"):
        dcp.to_single(out / "last", out / "best")
        return
    skip = {ckpt.TRAIN_STATE_FILE}

    def write(tmp: Path) -> None:
        for f in (out / "last").iterdir():
            if f.is_file() and f.name not in skip:
                shutil.copy2(f, tmp / f.name)

    ckpt.write_dir_atomically(out / "best", write)
