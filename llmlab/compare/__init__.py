"""`llmlab compare`: every chosen rung trained and measured side by side, then one report.

    settings.py  CompareSettings (the flags are derived from it), entries and --set overrides
    runner.py    run_compare(): a process per run (--jobs at once), reuse of finished runs, then timing
    worker.py    one run's process: train() into DIR/runs/<entry>/seed<N>/, then its quality numbers
    timing.py    speeds: one process per entry, turns round-robin, median with min-max
    runtime.py   cache_kind(): how a model decodes, asked in one place
    results.py   DIR/results.json: raw numbers and their readers
    stats.py     mean ± spread over seeds, "within noise"
    claims.py    each rung's claim, ✓ or ✗, computed from results.json
    report.py    DIR/report.md; plots.py the PNGs
    outdir.py    the marked output folder (writes only in it, deletes only what it made)
    proc.py      child processes that die with the comparison
"""
from llmlab.compare.runner import run_compare
from llmlab.compare.settings import CompareSettings

__all__ = ["CompareSettings", "run_compare"]
