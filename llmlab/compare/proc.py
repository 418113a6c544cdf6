"""Child processes of a comparison that die with it.

A run's process (llmlab.compare.worker) and a timing process (llmlab.compare.timing) outlive a
`kill -9` of compare unless they are told otherwise: they would go on training and later write
their numbers over a rerun's. So each child, first thing, asks Linux to SIGKILL it when its parent
dies (prctl PR_SET_PDEATHSIG), checks that the parent is still the one that started it (it may
have died before that call), and keeps a watchdog thread that exits when the parent changes (the
same on systems without prctl).

PR_SET_PDEATHSIG fires when the *thread* that forked the child ends: compare starts every child
from its main thread, which lives as long as the process.
"""
from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO, Optional, Union

PARENT_ENV = "LLMLAB_COMPARE_PARENT"
PR_SET_PDEATHSIG = 1  # linux/prctl.h


def child_env() -> dict[str, str]:
    # the child imports this same llmlab, installed or run from a checkout, and knows its parent
    root = str(Path(__file__).resolve().parents[2])
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": root + (os.pathsep + path if path else ""), PARENT_ENV: str(os.getpid())}


def spawn(module: str, *args: str, stdout: Union[IO, int, None] = None, stdin: Optional[int] = None,
          stderr: Union[IO, int, None] = None) -> subprocess.Popen:
    """`python -m module args...` as a child that dies with this process (see die_with_parent)."""
    assert threading.current_thread() is threading.main_thread(), "children are started from the main thread"
    return subprocess.Popen([sys.executable, "-m", module, *args], stdin=stdin, stdout=stdout, stderr=stderr,
                            env=child_env(), text=stdin is not None)


def die_with_parent(poll_s: float = 1.0) -> None:
    """Called first thing in a child: end this process when the compare that started it ends."""
    parent = int(os.environ.get(PARENT_ENV, "0"))
    if not parent:
        return  # started by hand, not by compare
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # the parent died before prctl: nothing would signal us
        os._exit(1)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_s)
        os._exit(1)

    threading.Thread(target=watch, name="parent-watchdog", daemon=True).start()
