"""The comparison's folder: compare writes only into a folder it made (marked by MARKER) or one that
was empty, and deletes only run directories it made (each holds compare's spec file, written
before anything else). A project folder, a user's runs/ or a file is refused in one line, before
any work: `--out .` in a project never takes its `runs/` for a comparison's."""
from __future__ import annotations

import shutil
from pathlib import Path

from llmlab.compare.settings import SPEC
from llmlab.errors import LlmlabError
from llmlab.fsutil import atomic_write_json, check_out_path

MARKER = ".llmlab-compare"


def check_out(out: Path) -> Path:
    """Refuse an --out compare may not write into: a file, under a file, unwritable, or a folder
    with something in it and no marker."""
    out = check_out_path(out, "--out", directory=True, allow_existing=True)
    if out.is_dir() and not (out / MARKER).is_file() and any(out.iterdir()):
        raise LlmlabError(f"--out {out} holds files and was not made by llmlab compare (no {MARKER} in it); "
                          "nothing was touched: pass a new or empty directory")
    return out


def claim(out: Path) -> None:
    """Make `out` (or take it, empty) for a comparison and mark it."""
    out.mkdir(parents=True, exist_ok=True)
    if not (out / MARKER).is_file():
        atomic_write_json(out / MARKER, {"made_by": "llmlab compare",
                                         "note": "compare writes in this folder and deletes only what it made"})


def made_here(run_dir: Path) -> bool:
    return not run_dir.is_symlink() and (run_dir / SPEC).is_file()


def remove_run(run_dir: Path) -> None:
    """Delete a run directory this comparison made; anything else there is refused, never deleted."""
    if not run_dir.exists() and not run_dir.is_symlink():
        return
    if not made_here(run_dir):
        raise LlmlabError(f"{run_dir} was not made by llmlab compare (no {SPEC} in it); nothing was deleted: "
                          "move it away or choose another --out")
    shutil.rmtree(run_dir)
