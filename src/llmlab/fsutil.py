"""Files written so that nothing is ever half there, and error text that fits on one line.

Every writer in llmlab goes through these helpers (checkpoints, token caches, downloads, tokenizer
files, Hugging Face exports): a file or directory is built under a temporary name beside its
target, flushed to disk and renamed into place, so a crash or a kill leaves either the old version
or the new one whole. Files get the user's umask (mkstemp alone would make them 0600).
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Union

from llmlab.errors import LlmlabError, one_line  # one_line re-exported: import it from either

PathLike = Union[str, os.PathLike]


def _umask() -> int:
    # os.umask can only be read by setting it; set it straight back (a process-wide value).
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode a plain `open(path, "w")` would give a new file: 0666 less the umask."""
    return 0o666 & ~_umask()


def _fsync(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    """Write `data` to `path` via a temp file in the same directory + os.replace."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: PathLike, obj: Any, **dump_kw: Any) -> None:
    dump_kw.setdefault("indent", 2)
    atomic_write_bytes(path, (json.dumps(obj, **dump_kw) + "\n").encode("utf-8"))


def tmp_dir_for(target: PathLike) -> Path:
    """The temporary sibling a directory is built in before it is swapped into place."""
    target = Path(target)
    return target.parent / f".{target.name}.tmp"


def fresh_dir(path: PathLike) -> Path:
    """An empty directory at `path` (what was there, a leftover of a killed write, is removed)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir()
    return path


def write_json(path: PathLike, obj: Any) -> None:
    """Plain JSON write, for files inside a directory that is swapped into place as a whole."""
    with open(path, "w") as fh:
        json.dump(obj, fh, indent=2)


def seal_dir(tmp: PathLike) -> None:
    """Give every file under `tmp` the umask's mode and flush it to disk."""
    mode = file_mode()
    for f in Path(tmp).rglob("*"):
        if f.is_file() and not f.is_symlink():
            os.chmod(f, mode)  # some writers (safetensors, mkstemp) create 0600 files
            _fsync(f)


def replace_dir(tmp: PathLike, target: PathLike) -> None:
    """Rename the finished `tmp` to `target`; the old `target` is `.NAME.old` for the instant
    between the two renames (llmlab.training.rundir.recover restores it after a kill there)."""
    tmp, target = Path(tmp), Path(target)
    old = target.parent / f".{target.name}.old"
    if target.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
    os.replace(tmp, target)
    shutil.rmtree(old, ignore_errors=True)


def swap_dir_into_place(tmp: PathLike, target: PathLike) -> None:
    seal_dir(tmp)
    replace_dir(tmp, target)


def write_dir_atomically(target: PathLike, write: Callable[[Path], None]) -> None:
    """Build directory `target` in a temp sibling (`write(tmp)` fills it), then swap it in with
    renames. At every instant either the old or the new directory is complete (a reader may also
    find the previous one as `.NAME.old` for the instant between the two renames)."""
    tmp = fresh_dir(tmp_dir_for(target))
    try:
        write(tmp)
        seal_dir(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_dir(tmp, target)


def check_out_path(path: PathLike, flag: str, *, directory: bool, allow_existing: bool = False) -> Path:
    """Refuse an output path that cannot or must not be written, before any work is done: empty,
    a file where a directory is wanted (or the reverse), under a file, unwritable, or (unless
    `allow_existing`) a non-empty directory, which would be overwritten."""
    if path is None or str(path).strip() == "":
        raise LlmlabError(f"{flag} is empty; pass a path")
    try:
        return _check_out_path(Path(path).expanduser(), flag, directory, allow_existing)
    except OSError as e:  # a name too long for the filesystem, a loop of links, ...
        raise LlmlabError(f"{flag} {path}: {one_line(e)}; pass another path") from None


def _check_out_path(p: Path, flag: str, directory: bool, allow_existing: bool) -> Path:
    if p.exists():
        if directory and not p.is_dir():
            raise LlmlabError(f"{flag} {p} is a file, not a directory; pass a new directory")
        if not directory and p.is_dir():
            raise LlmlabError(f"{flag} {p} is a directory; pass a file path (or a directory to write into)")
        if directory and not allow_existing and any(p.iterdir()):
            raise LlmlabError(f"{flag} {p} already exists and is not empty; nothing was overwritten: "
                              "pass a new directory")
    parent = p if p.is_dir() else p.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise LlmlabError(f"{flag} {p} is under {parent}, which is a file, not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise LlmlabError(f"{flag} {p}: {parent} is not writable; pass a path you can write to")
    return p
