"""Threads from the free cores (llmlab.threads): a core held by another process is not counted."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from llmlab import threads

pytestmark = pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="needs Linux /proc/stat")


def test_busy_cores_counts_a_spinning_process():
    """A process spinning on one core adds about one busy core to whatever else runs here."""
    before = threads.busy_cores(0.3)
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        during = threads.busy_cores(0.3)
    finally:
        hog.kill()
        hog.wait()
    cores = len(os.sched_getaffinity(0))
    assert 0.0 <= before <= cores + 0.05 and 0.0 <= during <= cores + 0.05
    assert during >= min(cores, before + 0.6) - 0.15  # the spinner's core (unless all were busy already)


def test_free_core_threads_from_busy_cores(monkeypatch):
    cores = len(os.sched_getaffinity(0))
    for busy, want in ((0.0, cores), (0.9, max(1, cores - 1)), (cores + 1.0, 1)):
        monkeypatch.setattr(threads, "busy_cores", lambda s=0.1, b=busy: b)
        assert threads.free_core_threads(cores) == want
        assert threads.free_core_threads(1) == 1  # never more than asked for
    monkeypatch.setattr(threads, "busy_cores", lambda s=0.1: None)  # no /proc/stat: leave it
    assert threads.free_core_threads(cores) == cores


def test_use_free_cores_respects_omp_num_threads(monkeypatch):
    old = torch.get_num_threads()
    try:
        monkeypatch.setenv("OMP_NUM_THREADS", "2")
        torch.set_num_threads(2)
        monkeypatch.setattr(threads, "busy_cores", lambda s=0.1: 99.0)
        assert threads.use_free_cores() is None and torch.get_num_threads() == 2
        monkeypatch.delenv("OMP_NUM_THREADS")
        assert threads.use_free_cores() == 1 and torch.get_num_threads() == 1
        # llmlab serve's engine leaves a core to its HTTP process: every idle core but one, at least one
        monkeypatch.setattr(threads, "busy_cores", lambda s=0.1: 0.0)
        torch.set_num_threads(len(os.sched_getaffinity(0)))
        want = max(1, len(os.sched_getaffinity(0)) - 1)
        assert threads.use_free_cores(leave=1) == want and torch.get_num_threads() == want
        assert threads.use_free_cores(leave=99) == 1
    finally:
        torch.set_num_threads(old)
