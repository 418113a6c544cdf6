"""Fault injection (issue 9): the k-th file operation llmlab makes (an open for writing, a
safetensors write, os.fsync, os.replace) raises OSError, or kills the process, for every k over
the first two checkpoints. Whatever k, `llmlab train --resume` then finishes with exactly the
losses of an uninterrupted run, and `llmlab.load(run)` works.

Run as a script (`python tests/test_fault_injection.py K ARGV...`) it is the child of the kill
variant: `llmlab train ARGV` with os._exit at the K-th operation."""
from __future__ import annotations

import builtins
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

KILLED = 86  # the child's exit status when it "died" at the K-th operation
TINY = ["--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--block-size", "16", "--batch-size", "4",
        "--eval-iters", "2", "--warmup-iters", "2", "--lr", "3e-3", "--dropout", "0.1", "--sample-tokens", "0",
        "--quiet", "--max-iters", "6", "--eval-interval", "2"]  # checkpoints at steps 0, 2, 4 and 6
WRITE_MODES = set("wax+")


def _from_llmlab() -> bool:
    """Is llmlab code on the stack? (pytest's and torch's own file writes are not counted)"""
    f = sys._getframe(2)
    while f is not None:
        if f.f_globals.get("__name__", "").startswith("llmlab"):
            return True
        f = f.f_back
    return False


class Faults:
    """Counts llmlab's file operations; the k-th raises OSError (or, with kill, ends the process).
    k=None only counts, recording each operation's name in `ops`."""

    def __init__(self, k: int | None, kill: bool = False):
        self.k, self.kill, self.ops = k, kill, []

    def hit(self, what: str) -> None:
        self.ops.append(what)
        if len(self.ops) == self.k:
            if self.kill:
                print(f"killed at {what}", file=sys.stderr, flush=True)
                os._exit(KILLED)  # no cleanup, no finally: as a SIGKILL or power cut would leave it
            raise OSError(28, f"injected fault at operation {self.k} ({what})")

    def install(self, setattr) -> None:
        """Wrap the operations with `setattr(obj, name, value)` (monkeypatch.setattr, or plain)."""
        import llmlab.checkpoint as ckpt

        def wrap(obj, name, counts):
            real = getattr(obj, name)

            def wrapper(*a, **k):
                if counts(*a, **k) and _from_llmlab():
                    self.hit(f"{name}({Path(a[0]).name if a and isinstance(a[0], (str, os.PathLike)) else ''})")
                return real(*a, **k)
            setattr(obj, name, wrapper)

        def writes(file=None, mode="r", *a, **k):
            return bool(WRITE_MODES & set(k.get("mode", mode)))

        def os_writes(path, flags, *a, **k):
            return bool(flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))

        always = lambda *a, **k: True  # noqa: E731
        wrap(builtins, "open", writes)
        wrap(io, "open", writes)  # pathlib's write_text / open
        wrap(os, "open", os_writes)  # tempfile.mkstemp
        wrap(os, "fsync", always)
        wrap(os, "replace", always)
        wrap(os, "rename", always)
        wrap(ckpt, "save_model", always)  # safetensors writes files from Rust, past Python's open
        wrap(ckpt, "save_file", always)


def records(run: Path) -> tuple[dict, dict]:
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return ({r["step"]: r["loss"] for r in recs if "loss" in r},
            {r["step"]: (r["val_loss"], r["train_loss"]) for r in recs if "val_loss" in r})


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run: its losses, and how many file operations its first two checkpoints
    (steps 0 and 2) took, counted from the start."""
    from llmlab.cli import main
    from llmlab.training import checkpoints

    mp = pytest.MonkeyPatch()
    mp.setenv("LLMLAB_CACHE", str(tmp_path_factory.getbasetemp() / "llmlab-cache"))
    run = tmp_path_factory.mktemp("fault") / "reference"
    faults = Faults(None)
    saved = []
    real_save = checkpoints.save

    def save(*a, **k):
        best = real_save(*a, **k)
        saved.append(len(faults.ops))
        return best
    try:
        # fills the token cache, so that the counted run and every later one only read it
        assert main(["train", *TINY, "--out", str(run.parent / "plain")]) == 0
        faults.install(mp.setattr)
        mp.setattr(checkpoints, "save", save)
        assert main(["train", *TINY, "--out", str(run)]) == 0
    finally:
        mp.undo()
    assert len(saved) == 4 and saved[1] > 10, (saved, faults.ops)
    assert records(run) == records(run.parent / "plain")  # the counting wrappers change nothing
    return run, saved[1], faults.ops


def check_resumed(run: Path, reference: Path, capsys) -> None:
    import llmlab
    from llmlab.cli import main

    code = main(["train", *TINY, "--out", str(run), "--resume"])
    err = capsys.readouterr().err
    assert code == 0, err
    assert records(run) == records(reference)
    assert llmlab.load(run).config.n_embd == 16


@pytest.mark.slow
def test_a_failed_file_operation_is_one_line_and_resume_is_exact(reference, tmp_path, capsys, monkeypatch):
    from llmlab.cli import main

    ref, n_ops, ops = reference
    for k in range(1, n_ops + 1):
        run = tmp_path / f"k{k}"
        with monkeypatch.context() as mp:
            Faults(k).install(mp.setattr)
            code = main(["train", *TINY, "--out", str(run)])
        err = capsys.readouterr().err
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (k, ops[k - 1], err)
        assert f"operation {k}" in lines[0], (k, lines[0])
        check_resumed(run, ref, capsys)


@pytest.mark.slow
def test_a_kill_at_a_file_operation_then_resume_is_exact(reference, tmp_path, capsys):
    ref, n_ops, ops = reference
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src"), "OMP_NUM_THREADS": "1"}
    # A child per k costs an interpreter and a torch import (seconds), so not every k: the first
    # operation, and each rename that swaps a checkpoint directory in (the instants a kill can
    # leave no last/ or best/, or only .last.old), the last of them ending the second checkpoint.
    swaps = [i + 1 for i, op in enumerate(ops[:n_ops]) if op.split("(")[0] == "replace" and "tokenizer" not in op]
    assert swaps[-1] == n_ops and len(swaps) == 6, ops
    for k in [1, *swaps]:
        run = tmp_path / f"k{k}"
        child = subprocess.run([sys.executable, __file__, str(k), "train", *TINY, "--out", str(run)], env=env,
                               capture_output=True, text=True, timeout=120)
        assert child.returncode == KILLED, (k, ops[k - 1], child.stderr)
        assert child.stderr.strip().endswith(f"killed at {ops[k - 1]}"), (k, child.stderr)  # the same sequence
        check_resumed(run, ref, capsys)


if __name__ == "__main__":  # the kill variant's child
    from llmlab.cli import main

    def plain_setattr(obj, name, value):
        setattr(obj, name, value)

    Faults(int(sys.argv[1]), kill=True).install(plain_setattr)
    sys.exit(main(sys.argv[2:]))
