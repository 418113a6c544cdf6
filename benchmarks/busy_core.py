"""Training and decoding beside a process that keeps one core busy, with torch's default threads,
with one thread, and with llmlab's mitigation (one thread per free core, llmlab.threads, which the
CLI applies at start).

    python benchmarks/busy_core.py [--rounds 3] [--seconds 5] [--conditions busy,idle]

Workloads: llmlab's training step (TrainStep) at the shakespeare_char recipe's shapes (flash,
4 layers, 128 wide, batch 12x64, AdamW; eager) and greedy batch-1 decoding with the KV cache
(kv_cache preset, same size). In the `busy` condition a `while True: pass` process runs throughout; `idle` is the same
without it. Each contestant runs in a process of its own for --seconds after a warm-up, and the
contestants take turns round after round. Prints a table (median ms per step / per token and the
ratio to one thread, > 1 is faster) and, as its last line, a JSON summary. Target: the mitigation
is never worse than one thread, and uses every core when they are free.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE.parent / "src") not in sys.path:
    sys.path.insert(0, str(HERE.parent / "src"))

CONFIGS = ("default", "one", "free-cores")  # torch's default threads (one per core), 1, llmlab.threads
WORKLOADS = ("train", "decode")
VOCAB, N_LAYER, N_HEAD, N_EMBD, BLOCK, BATCH = 65, 4, 4, 128, 64, 12


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seconds", type=float, default=5.0, help="timed seconds per turn (default 5)")
    p.add_argument("--conditions", default="busy,idle", help="comma-separated: busy, idle")
    p.add_argument("--worker", nargs=2, default=None, help=argparse.SUPPRESS)  # internal: workload config
    ns = p.parse_args(argv)
    ns.conditions = [c for c in ns.conditions.split(",") if c]
    if ns.rounds < 1 or ns.seconds <= 0 or not set(ns.conditions) <= {"busy", "idle"} or not ns.conditions:
        p.error("--rounds >= 1, --seconds > 0, --conditions of busy, idle")
    return ns


def _workload(name: str):
    """A callable doing one unit of work (a training step, or one decoded token) and its unit."""
    import torch

    from llmlab.generation import stream
    from llmlab.model import Transformer
    from llmlab.presets import preset_config

    torch.manual_seed(0)
    sizes = dict(vocab_size=VOCAB, n_layer=N_LAYER, n_head=N_HEAD, n_embd=N_EMBD, block_size=256)
    if name == "train":  # the step train() runs (eager, one shard)
        from llmlab.training.step import StepConfig, TrainStep, make_optimizer

        model = Transformer(preset_config("flash", **sizes)).train()
        step = TrainStep(model, make_optimizer(model, 0.1, (0.9, 0.99), 1e-3), StepConfig())
        x = torch.randint(VOCAB, (BATCH, BLOCK))
        return lambda: step(lambda: (x, x), 1e-3)
    model = Transformer(preset_config("kv_cache", **sizes)).eval()
    tokens = iter(())

    def token():
        nonlocal tokens
        try:
            next(tokens)
        except StopIteration:  # a fresh generation of up to 200 tokens after a 16-token prompt
            tokens = stream(model, torch.randint(VOCAB, (1, 16)), 200, temperature=0)
            next(tokens)
    return token


def worker(workload: str, config: str, seconds: float) -> int:
    import torch

    if config == "one":
        torch.set_num_threads(1)
    elif config == "free-cores":
        from llmlab.threads import use_free_cores
        use_free_cores()
    threads = torch.get_num_threads()
    work = _workload(workload)
    with torch.inference_mode() if workload == "decode" else torch.enable_grad():
        for _ in range(5):
            work()
        times, end = [], time.perf_counter() + seconds
        while time.perf_counter() < end or len(times) < 3:
            t0 = time.perf_counter()
            work()
            times.append(time.perf_counter() - t0)
    print(json.dumps({"ms": 1000 * statistics.median(times), "threads": threads, "torch": torch.__version__}))
    return 0


def turn(workload: str, config: str, seconds: float) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", workload, config, "--seconds", str(seconds)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{workload}/{config} failed: {(proc.stderr.strip().splitlines() or ['no output'])[-1]}")
    return json.loads(lines[-1])


def main(argv=None) -> int:
    ns = parse_args(argv)
    if ns.worker is not None:
        return worker(ns.worker[0], ns.worker[1], ns.seconds)
    runs: dict[tuple[str, str, str], list[dict]] = {}
    for cond in ns.conditions:
        hog = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if cond == "busy" else None
        try:
            time.sleep(0.5 if hog else 0)
            for _ in range(ns.rounds):
                for w in WORKLOADS:
                    for c in CONFIGS:
                        runs.setdefault((cond, w, c), []).append(turn(w, c, ns.seconds))
        except RuntimeError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        finally:
            if hog:
                hog.kill()
                hog.wait()
    any_run = next(iter(runs.values()))[0]
    print(f"beside a busy core: torch {any_run['torch']}; {ns.rounds} rounds of {ns.seconds:g} s per contestant, "
          "each in its own process; ratio = one thread's ms / this ms (per round, median), > 1 is faster")
    print(f"{'condition':<10}{'workload':<9}{'threads':<22}{'ms':>9}  {'vs 1 thread':>11}  per round")
    summary = {}
    for (cond, w, c), rs in runs.items():
        ones = runs[(cond, w, "one")]
        ratios = [o["ms"] / r["ms"] for o, r in zip(ones, rs)]
        ms, x = statistics.median(r["ms"] for r in rs), statistics.median(ratios)
        label = f"{c} ({rs[0]['threads']})"
        unit = "ms/step" if w == "train" else "ms/token"
        print(f"{cond:<10}{w:<9}{label:<22}{ms:>9.2f}  {x:>10.2f}x  " + " ".join(f"{r:.2f}" for r in ratios)
              + f"  [{unit}]")
        summary[f"{cond}_{w}_{c.replace('-', '_')}_ms"] = round(ms, 3)
        summary[f"{cond}_{w}_{c.replace('-', '_')}_x"] = round(x, 3)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
