"""The comparison: every entry (a preset, or a named configuration of one) trained once per seed on
the same data, tokenizer, sizes and step budget, each run in its own process
(llmlab.compare.worker), up to --jobs at once; then every entry timed round-robin, one process each
(llmlab.compare.timing); then one results.json and its report.

DIR/runs/<entry>/seed<N>/ is a normal run directory (`llmlab sample DIR/runs/rope/seed1337` works)
that also holds the run's measurements (compare.json), what it was asked (compare_spec.json) and
its process's log (compare.log). A run whose compare.json says "ok" with the same settings is not
run again (an interrupted comparison resumes), unless --fresh; a failed one is retried. The timing
is reused when the entries and the timing settings are the same (DIR/timing.json).
"""
from __future__ import annotations

import json
import sys
import time
from collections import deque
from pathlib import Path
from typing import Any, Optional

from llmlab.compare.outdir import check_out, claim, remove_run
from llmlab.compare.settings import RESULT, SPEC, CompareSettings, Entry
from llmlab.errors import LlmlabError
from llmlab.fsutil import atomic_write_json

TIMING = "timing.json"
TRAIN_TIMING_STEPS = 3  # training steps timed per round


def load_json(path: Path) -> Optional[Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _steps_done(run_dir: Path) -> int:
    """Training steps the run has logged so far (its last train line's step + 1)."""
    try:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    except OSError:
        return 0
    for line in reversed(lines):
        if '"tokens_per_s"' in line:
            try:
                return json.loads(line)["step"] + 1
            except (ValueError, KeyError):
                continue
    return 0


class _Run:
    """One (entry, seed) run's process."""

    def __init__(self, spec: dict[str, Any]):
        from llmlab.compare.proc import spawn

        self.spec, self.dir = spec, Path(spec["run_dir"])
        self.dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.dir / SPEC, spec)  # first: it marks the directory as compare's
        (self.dir / RESULT).unlink(missing_ok=True)
        self.log = open(self.dir / "compare.log", "w")
        self.p = spawn("llmlab.compare.worker", str(self.dir / SPEC), stdout=self.log, stderr=self.log)
        self.t0 = time.perf_counter()

    def result(self) -> dict[str, Any]:
        self.log.close()
        result = load_json(self.dir / RESULT)
        if result is None:  # killed, or crashed below Python: the log's last line is the reason
            lines = [ln for ln in (self.dir / "compare.log").read_text(errors="replace").splitlines() if ln.strip()]
            reason = lines[-1].strip()[:300] if lines else f"the run's process exited with status {self.p.returncode}"
            result = {"entry": self.spec["entry"], "preset": self.spec["preset"], "seed": self.spec["seed"],
                      "status": "failed", "settings": self.spec["settings"], "error": reason}
        return result

    def kill(self) -> None:
        self.p.kill()
        self.p.wait()
        self.log.close()


def _plan(s: CompareSettings, entries: list[Entry]) -> tuple[dict, list[dict]]:
    """(finished results to reuse by (entry, seed), specs of the runs to do). Refuses stale results
    and run directories compare did not make before anything runs."""
    reuse, todo = {}, []
    for e in entries:
        for seed in s.seed_list():
            spec = s.run_spec(e, seed)
            run_dir = Path(spec["run_dir"])
            old = load_json(run_dir / RESULT)
            if old is not None and not s.fresh and old.get("status") == "ok":
                if old.get("settings") != spec["settings"]:
                    raise LlmlabError(f"{run_dir} was measured with other settings; pass --fresh to redo the "
                                      "comparison or choose another --out")
                reuse[(e.name, seed)] = old | {"reused": True}
                continue
            if run_dir.exists() and not (run_dir / SPEC).is_file():
                raise LlmlabError(f"{run_dir} was not made by llmlab compare (no {SPEC} in it); nothing was "
                                  "touched: move it away or choose another --out")
            # --fresh or a failed run: start over; a run cut short (no result yet) continues its training
            todo.append(spec | {"restart": s.fresh or old is not None})
    return reuse, todo


def _train_all(s: CompareSettings, todo: list[dict], log) -> dict[tuple[str, int], dict]:
    """Every run of `todo`, up to s.jobs processes at once (started from this, the main, thread)."""
    from tqdm import tqdm

    results: dict[tuple[str, int], dict] = {}
    pending, active = deque(todo), []
    bar = tqdm(total=len(todo) * s.max_iters, disable=s.quiet or not todo, unit="step", desc="compare: training",
               dynamic_ncols=True)
    try:
        while pending or active:
            while pending and len(active) < s.jobs:
                spec = pending.popleft()
                if spec.pop("restart"):
                    remove_run(Path(spec["run_dir"]))  # only a directory compare made
                active.append(_Run(spec))
            time.sleep(0.5)
            for run in [r for r in active if r.p.poll() is not None]:
                active.remove(run)
                r = run.result()
                results[(r["entry"], r["seed"])] = r
                what = f"{r['entry']} (seed {r['seed']})"
                log(f"{what}: val loss {r['val_loss']:.4f}, {time.perf_counter() - run.t0:.0f} s" if r["status"] == "ok"
                    else f"{what}: FAILED: {r['error']}")
            done = len(results) * s.max_iters + sum(min(_steps_done(r.dir), s.max_iters) for r in active)
            bar.set_postfix_str(", ".join(f"{r.spec['entry']}/{r.spec['seed']}" for r in active), refresh=False)
            bar.update(max(0, done - bar.n))
    except BaseException:  # Ctrl-C: stop the runs too (each resumes next time)
        for run in active:
            run.kill()
        raise
    finally:
        bar.close()
    return results


def parents(s: CompareSettings, entries: list[Entry], runs: dict) -> dict[str, tuple[Optional[str], str, dict]]:
    """name -> (the parent's entry name if it is compared, the parent preset, its config at these sizes).
    A rung's parent is the rung it changes (presets.PARENT); a configuration's is its preset."""
    from llmlab.compare.runtime import preset_recorded
    from llmlab.presets import PARENT

    rungs = {e.name for e in entries if e.is_rung}
    out = {}
    for e in entries:
        p = e.preset if e.name != e.preset else PARENT.get(e.preset)
        first = runs[(e.name, s.seed)]
        if p is None or first["status"] != "ok":
            out[e.name] = (None, "", {})
            continue
        sizes = {k: getattr(s, k) for k in ("n_layer", "n_head", "n_embd", "block_size")}
        config = preset_recorded(p, vocab_size=first["config"]["vocab_size"], **sizes)
        out[e.name] = (p if p in rungs else None, p, config)
    return out


def _time_all(s: CompareSettings, out: Path, entries: list[Entry], runs: dict, log) -> dict[str, Any]:
    from tqdm import tqdm

    from llmlab.compare.timing import Contestant, time_round_robin

    contestants = []
    for e in entries:
        rs = [runs[(e.name, seed)] for seed in s.seed_list()]
        if all(r["status"] == "ok" for r in rs):
            contestants.append(Contestant(e.name, rs[0]["config"], s.contexts, s.decode_steps, s.batch_size,
                                          TRAIN_TIMING_STEPS, None, s.compile, s.threads, s.seed, rs[0]["device"]))
    key = {"settings": s.timing_key(), "contestants": {c.name: c.config for c in contestants}}
    old = load_json(out / TIMING)
    if old is not None and not s.fresh and old.get("key") == key:
        log(f"timing: reused ({out / TIMING})")
        return old["result"]
    log(f"timing: {len(contestants)} preset(s), a warm-up and {s.rounds} rounds round-robin, one process each")
    bar = tqdm(total=len(contestants) * (s.rounds + 1), disable=s.quiet, unit="turn", desc="compare: timing",
               dynamic_ncols=True)

    def progress(msg: str) -> None:
        bar.set_postfix_str(msg.removeprefix("timing: "), refresh=False)
        bar.update(1)

    try:
        result = time_round_robin(contestants, s.rounds, out / "timing", progress)
    finally:
        bar.close()
    for name, t in result["entries"].items():
        if t["error"]:
            log(f"{name}: timing FAILED: {t['error']}")
    atomic_write_json(out / TIMING, {"key": key, "result": result})
    return result


def run_compare(s: CompareSettings) -> tuple[dict[str, Any], dict[str, Path]]:
    """Train, time and report every entry (reusing finished runs); returns (the results.json
    document, {what: path written})."""
    from tqdm import tqdm

    from llmlab.compare.report import write_report
    from llmlab.compare.results import assemble

    s.validate()
    out = check_out(Path(s.out))
    entries = s.entries()
    reuse, todo = _plan(s, entries)
    claim(out)
    t0 = time.perf_counter()
    log = (lambda msg: None) if s.quiet else (lambda msg: tqdm.write(msg, file=sys.stderr))
    for (name, seed) in reuse:
        log(f"{name} (seed {seed}): finished earlier, reused")
    runs = reuse | _train_all(s, todo, log)
    timing = _time_all(s, out, entries, runs, log)
    doc = assemble(s, entries, runs, timing, parents(s, entries, runs), time.perf_counter() - t0)
    return doc, write_report(out, doc)
