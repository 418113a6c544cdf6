"""`llmlab compare`: every chosen rung trained and measured side by side, then one report.

    runner.py  CompareSettings, run_compare(): a process per preset, reuse of finished presets
    worker.py  one preset's process: train() into DIR/runs/<preset>/, then measure it
    report.py  DIR/results.json, DIR/report.md and the PNG plots, from the workers' numbers
"""
from llmlab.compare.runner import CompareSettings, run_compare

__all__ = ["CompareSettings", "run_compare"]
