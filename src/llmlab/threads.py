"""How many threads torch should use: one per core that is free now.

torch's CPU ops split their work over OpenMP threads, one per core, and every op ends at a barrier
that waits for all of them. If another process holds a core, the thread that shares it runs only
when the scheduler gives it a slice (milliseconds), so each of a small model's hundreds of tiny ops
per step waits that long: steps get several times slower than with one thread (measured by
benchmarks/busy_core.py). Passive waiting does not help: the wait is for the thread that has no
core. So the CLI counts the cores other processes keep busy (a short look at /proc/stat, taken
while this process is idle) and gives torch one thread per free core, never more than it would
use anyway. OMP_NUM_THREADS, if set, is the user's choice and left alone."""
from __future__ import annotations

import os
import time
from typing import Optional


def _cpu_times() -> dict[str, tuple[int, int]]:
    """{cpuN: (busy, total)} jiffies from /proc/stat (Linux); {} elsewhere."""
    out = {}
    try:
        with open("/proc/stat") as fh:
            for line in fh:
                if line.startswith("cpu") and line[3:4].isdigit():
                    name, *fields = line.split()
                    v = [int(x) for x in fields[:8]]
                    idle = v[3] + v[4]  # idle + iowait
                    out[name] = (sum(v) - idle, sum(v))
    except (OSError, ValueError):
        return {}
    return out


def busy_cores(sample_s: float = 0.1) -> Optional[float]:
    """Cores' worth of CPU time other processes used during `sample_s` (this process sleeps
    meanwhile), over the CPUs this process may run on; None where /proc/stat is not available."""
    allowed = {f"cpu{i}" for i in os.sched_getaffinity(0)} if hasattr(os, "sched_getaffinity") else None
    a = _cpu_times()
    time.sleep(sample_s)
    b = _cpu_times()
    names = [n for n in a if n in b and (allowed is None or n in allowed)]
    if not names:
        return None
    busy = 0.0
    for n in names:
        d_total = b[n][1] - a[n][1]
        busy += (b[n][0] - a[n][0]) / d_total if d_total > 0 else 0.0
    return busy


def free_core_threads(max_threads: int, sample_s: float = 0.1) -> int:
    """One thread per core not held by another process, between 1 and max_threads."""
    busy = busy_cores(sample_s)
    if busy is None:
        return max_threads
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(max_threads, round(cores - busy)))


def use_free_cores(leave: int = 0) -> Optional[int]:
    """Set torch's thread count to the free cores unless OMP_NUM_THREADS says otherwise; returns
    the count set (None: left as it was). `leave`: cores kept for another busy process of ours
    (llmlab serve's HTTP process beside its engine's), at least one thread always."""
    if os.environ.get("OMP_NUM_THREADS"):
        return None
    import torch

    n = max(1, free_core_threads(torch.get_num_threads()) - leave)
    torch.set_num_threads(n)
    return n
