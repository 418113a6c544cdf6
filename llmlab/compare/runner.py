"""The comparison: every chosen preset trained on the same data, tokenizer, seed, sizes and step
budget, each in its own process (llmlab.compare.worker), then one report.

DIR/runs/<preset>/ is a normal run directory (`llmlab sample DIR/runs/rope` works) that also holds
the preset's measurements (compare.json) and its process's log (compare.log). A preset whose
compare.json says "ok" with the same settings is not run again (a resumable comparison), unless
fresh=True; a failed one is retried from scratch; one cut short continues its training.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from llmlab.errors import LlmlabError

RESULT = "compare.json"  # a preset's measurements, in its run directory
WARMUP_STEPS = 5  # train steps whose tokens/s are left out of the median (allocation, first-call costs)

# Every setting of a comparison the presets share, with defaults sized for a 2-core CPU: all eleven
# rungs train and are measured in about 23 minutes on this project's shared 2 cores (docs/ladder.md).
TRAIN_KEYS = ("data", "tokenizer", "n_layer", "n_head", "n_embd", "block_size", "batch_size", "max_iters",
              "lr", "eval_interval", "eval_iters", "seed", "device")
MEASURE_KEYS = ("contexts", "decode_steps", "repeats", "compile", "val_tokens", "threads")
OVERRIDABLE = ("n_layer", "n_head", "n_kv_head", "n_embd", "block_size", "dropout", "bias", "lr", "batch_size")


@dataclass
class CompareSettings:
    presets: list[str]
    out: str
    data: Optional[str] = None  # None: the built-in corpus
    tokenizer: str = "byte"
    n_layer: int = 4  # the same sizes for every preset (the preset's defaults are these)
    n_head: int = 4
    n_embd: int = 128
    block_size: int = 128
    batch_size: int = 8
    max_iters: int = 300
    lr: float = 2e-3
    eval_interval: int = 50
    eval_iters: int = 10
    seed: int = 1337
    device: str = "auto"
    contexts: list[int] = field(default_factory=lambda: [32, 64, 96])
    decode_steps: int = 24  # decode tokens timed after each context
    repeats: int = 3
    compile: bool = True  # also time the compiled decode step where it applies
    val_tokens: Optional[int] = None  # the whole-split loss over at most this many tokens (None: all)
    # torch threads in each preset's process (0: torch's default). One by default: on a shared machine
    # two OpenMP threads spin-wait for a busy core and slow every op many times over, noisily
    threads: int = 1
    overrides: dict[str, dict[str, Any]] = field(default_factory=dict)  # preset -> {setting: value}
    fresh: bool = False
    quiet: bool = False

    def key(self) -> dict[str, Any]:
        """What a finished preset's numbers depend on: a result made with another key is stale."""
        return {k: getattr(self, k) for k in TRAIN_KEYS + MEASURE_KEYS}

    def validate(self) -> None:
        from llmlab.presets import PRESETS

        if not self.presets:
            raise LlmlabError("--presets names no preset")
        unknown = [p for p in self.presets if p not in PRESETS]
        if unknown:
            raise LlmlabError(f"unknown preset(s) {', '.join(unknown)}; choose from: {', '.join(PRESETS)} or all")
        if len(set(self.presets)) != len(self.presets):
            raise LlmlabError("--presets names a preset twice")
        for p in self.overrides:
            if p not in self.presets:
                raise LlmlabError(f"--set {p}:...: {p} is not among --presets")
        if not self.contexts or min(self.contexts) < 1:
            raise LlmlabError("--contexts must be comma-separated positive integers")
        for flag, v in (("--decode-steps", self.decode_steps), ("--repeats", self.repeats),
                        ("--max-iters", self.max_iters), ("--eval-interval", self.eval_interval)):
            if v < 1:
                raise LlmlabError(f"{flag} must be >= 1, got {v}")
        if self.val_tokens is not None and self.val_tokens < self.block_size:
            raise LlmlabError(f"--val-tokens {self.val_tokens} is shorter than --block-size {self.block_size}")
        # learned positions stop at block_size; past it generation re-feeds a rolling window,
        # which would time something else than decoding after a context of C tokens
        longest = max(self.contexts) + self.decode_steps + 1
        if longest > self.block_size:
            raise LlmlabError(f"the longest context + --decode-steps + 1 ({longest}) exceeds --block-size "
                              f"{self.block_size}: use shorter --contexts or fewer --decode-steps")
        out = Path(self.out)
        if out.exists() and not out.is_dir():
            raise LlmlabError(f"--out {out} is a file; pass a directory for the comparison")
        # never spread a comparison into a directory that holds something else (a run, a project)
        if out.is_dir() and any(out.iterdir()) and not ((out / "runs").is_dir() or (out / "results.json").exists()):
            raise LlmlabError(f"--out {out} holds other files, not a comparison; pass a new or empty directory")

    def spec(self, preset: str) -> dict[str, Any]:
        train = {k: getattr(self, k) for k in TRAIN_KEYS} | {"preset": preset}
        train.update(self.overrides.get(preset, {}))
        return {"preset": preset, "run_dir": str(Path(self.out) / "runs" / preset), "train": train,
                "seed": self.seed, "settings": self.key() | {"overrides": self.overrides.get(preset, {})},
                "measure": {k: getattr(self, k) for k in MEASURE_KEYS}}


def parse_overrides(items: list[str]) -> dict[str, dict[str, Any]]:
    """--set PRESET:KEY=VALUE (repeatable): one preset's own size or setting, e.g. gqa:n_kv_head=1."""
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        preset, _, assign = item.partition(":")
        k, eq, v = assign.partition("=")
        k = k.strip().replace("-", "_")
        if not preset or not eq or not k:
            raise LlmlabError(f"--set {item!r}: expected PRESET:KEY=VALUE, e.g. gqa:n_kv_head=1")
        if k not in OVERRIDABLE:
            raise LlmlabError(f"--set {item!r}: {k} cannot be set per preset; choose from {', '.join(OVERRIDABLE)}")
        try:
            value: Any = json.loads(v)  # numbers and true/false; anything else stays a string
        except ValueError:
            value = v
        out.setdefault(preset.strip(), {})[k] = value
    return out


def load_result(run_dir: Path) -> Optional[dict[str, Any]]:
    try:
        return json.loads((run_dir / RESULT).read_text())
    except (OSError, ValueError):
        return None


def _child_env() -> dict[str, str]:
    # the child imports this same llmlab, whether it is installed or run from a checkout
    root = str(Path(__file__).resolve().parents[2])
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": root + (os.pathsep + path if path else "")}


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


def run_preset(s: CompareSettings, preset: str, progress=lambda steps, phase: None) -> dict[str, Any]:
    """One preset's process; its result (a failed one when the process died without writing one).
    progress(steps trained, phase) is called about once a second while it runs."""
    spec = s.spec(preset)
    run_dir = Path(spec["run_dir"])
    run_dir.mkdir(parents=True, exist_ok=True)
    spec_path = run_dir / "compare_spec.json"
    spec_path.write_text(json.dumps(spec, indent=2))
    (run_dir / RESULT).unlink(missing_ok=True)
    with open(run_dir / "compare.log", "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "llmlab.compare.worker", str(spec_path)], stdout=log,
                                stderr=subprocess.STDOUT, env=_child_env())
        try:
            while proc.poll() is None:
                time.sleep(1.0)
                steps = _steps_done(run_dir)
                progress(steps, "measuring" if steps >= spec["train"]["max_iters"] else "training")
        except BaseException:  # Ctrl-C: stop the child too (its run resumes next time)
            proc.kill()
            proc.wait()
            raise
    result = load_result(run_dir)
    if result is None:  # killed, or crashed below Python: the log's last line is the reason
        lines = [ln for ln in (run_dir / "compare.log").read_text(errors="replace").splitlines() if ln.strip()]
        reason = lines[-1].strip()[:300] if lines else f"the preset's process exited with status {proc.returncode}"
        result = {"preset": preset, "status": "failed", "settings": spec["settings"], "error": reason}
    return result


def run_compare(s: CompareSettings) -> tuple[list[dict[str, Any]], dict[str, Path]]:
    """Train and measure every preset (reusing finished ones), write the report; returns
    (results in --presets order, {what: path written})."""
    from tqdm import tqdm

    from llmlab.compare.report import write_report

    s.validate()
    out = Path(s.out)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    # decide every preset first, so stale settings are refused before anything runs
    plan: dict[str, Optional[dict[str, Any]]] = {}  # preset -> its finished result to reuse, or None
    for preset in s.presets:
        run_dir = out / "runs" / preset
        old = load_result(run_dir)
        if old is not None and not s.fresh and old.get("status") == "ok" and old.get("settings") != s.spec(preset)["settings"]:
            raise LlmlabError(f"{run_dir} was measured with other settings; pass --fresh to redo the comparison "
                              "or choose another --out")
        plan[preset] = old if old is not None and not s.fresh and old.get("status") == "ok" else None
    t0 = time.perf_counter()
    results: list[dict[str, Any]] = []
    log = (lambda msg: None) if s.quiet else (lambda msg: tqdm.write(msg, file=sys.stderr))
    # one bar over the whole comparison: each preset counts its training steps, plus one for measuring
    per = s.max_iters + 1
    bar = tqdm(total=len(s.presets) * per, disable=s.quiet, unit="step", desc="compare", dynamic_ncols=True)
    for i, (preset, old) in enumerate(plan.items()):
        run_dir = out / "runs" / preset
        if old is not None:
            results.append(old | {"reused": True})
            log(f"{preset}: finished earlier, reused ({run_dir / RESULT})")
            bar.update(per * (i + 1) - bar.n)
            continue
        if s.fresh or load_result(run_dir) is not None:  # --fresh, or a failed result: start over
            shutil.rmtree(run_dir, ignore_errors=True)

        def progress(steps: int, phase: str, i=i, preset=preset) -> None:
            bar.set_postfix_str(f"{preset} ({i + 1}/{len(s.presets)}) {phase}", refresh=False)
            bar.update(per * i + min(steps, s.max_iters) - bar.n)

        progress(0, "starting")
        r = run_preset(s, preset, progress)
        results.append(r)
        if r["status"] == "ok":
            log(f"{preset}: val loss {r['val_loss']:.4f}, {r['train_tokens_per_s']:,} train tokens/s, "
                f"{r['wall_s']:.0f} s")
        else:
            log(f"{preset}: FAILED: {r['error']}")
        bar.update(per * (i + 1) - bar.n)
    bar.close()
    paths = write_report(out, results, s, time.perf_counter() - t0)
    return results, paths
