"""Training-step speed of llmlab beside a nanoGPT-equivalent step on the same machine.

    python benchmarks/train_speed.py [--preset flash] [--rounds 3] [--seconds 15] [--threads N]
                                     [--configs eager,compile,batch-threads,compile+batch-threads]

The shakespeare_char CPU recipe's shapes (vocab 65, 4 layers, 4 heads, 128 wide, block 64,
batch 12, AdamW, clip 1.0) on random tokens: the step time does not depend on the text. Each
contestant trains in a process of its own (so no thread pool, OpenMP team or cache state of one
touches another) for `--seconds` after a warm-up, and the contestants take turns, round after
round, so a noisy machine slows all of them alike; a contestant's speed-up is the median over
rounds of nanoGPT's ms/step divided by its own in the same round. llmlab runs
`llmlab.training.step.TrainStep`, the code `train()` runs. The nanoGPT stand-in
(benchmarks/nanogpt_reference.py) uses torch's default threads, as nanoGPT does; `batch-threads`
splits each batch across the cores (`--batch-threads`, one shard a core).

Prints a table of median ms/step, tokens/s and speed relative to nanoGPT, then as its LAST line
a JSON object {"nanogpt_ms": ..., "<config>_ms": ..., "<config>_x": ..., "<config>_shards": ...}.
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
for path in (HERE.parent / "src", HERE):  # llmlab and the nanoGPT stand-in, runnable from anywhere
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

CONFIGS = {  # name: (compile, batch shards: one per thread)
    "eager": (False, 0), "compile": (True, 0), "batch-threads": (False, 1), "compile+batch-threads": (True, 1),
}
VOCAB, N_LAYER, N_HEAD, N_EMBD, BLOCK, BATCH = 65, 4, 4, 128, 64, 12


NANOGPT = "nanogpt"


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="flash", help="llmlab rung to time (default flash: nanoGPT's model)")
    p.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated, of: {', '.join(CONFIGS)}")
    p.add_argument("--rounds", type=int, default=3, help="turns each contestant takes (default 3)")
    p.add_argument("--seconds", type=float, default=15.0, help="timed seconds per turn (default 15)")
    p.add_argument("--threads", type=int, default=0,
                   help="CPU threads to use (default: torch's, one per core); batch-threads runs one shard "
                        "per thread, at most one per batch row")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: time one contestant
    ns = p.parse_args(argv)
    ns.configs = [c.strip() for c in ns.configs.split(",") if c.strip()]
    bad = [c for c in ns.configs if c not in CONFIGS]
    if bad or not ns.configs:
        p.error(f"unknown config(s) {', '.join(bad) or '(none)'}; choose from {', '.join(CONFIGS)}")
    if ns.rounds < 1 or ns.seconds <= 0 or ns.threads < 0:
        p.error("--rounds must be >= 1, --seconds > 0, --threads >= 0")
    return ns


def build_step(name: str, preset: str, threads: int, seed: int):
    """(step(x, y), batch shards) of one contestant; torch's thread count already set."""
    import torch

    torch.manual_seed(seed)
    if name == NANOGPT:
        from nanogpt_reference import NanoGPT, nanogpt_optimizer, nanogpt_step

        ref = NanoGPT(VOCAB, BLOCK, N_LAYER, N_HEAD, N_EMBD)
        opt = nanogpt_optimizer(ref, lr=1e-3)
        return (lambda x, y: nanogpt_step(ref, opt, x, y)), 0
    from llmlab.model import Transformer
    from llmlab.presets import preset_config
    from llmlab.training.step import StepConfig, TrainStep, make_optimizer
    from train_shakespeare_char import recipe  # the recipe's hyperparameters, from the one place

    compile, shard = CONFIGS[name]
    a = recipe(data=None, max_iters=2000, device="cpu", eval_interval=250, compile=compile, out=None,
               seed=seed, preset=preset, batch_threads=min(threads, BATCH) if shard else 1)
    model = Transformer(preset_config(preset, vocab_size=VOCAB, **a.model_overrides()))
    opt = make_optimizer(model, a.weight_decay, (a.beta1, a.beta2), a.lr)
    train_step = TrainStep(model, opt, StepConfig.of(a, "cpu"))  # closed when the process ends
    return (lambda x, y: train_step(lambda: (x, y), 1e-3)), (train_step.shards.n if train_step.shards else 0)


def worker(ns) -> int:
    """Time one contestant: warm up (and compile), then steps for ns.seconds; print one JSON line."""
    import torch

    if ns.threads:
        torch.set_num_threads(ns.threads)
    threads = torch.get_num_threads()
    step, shards = build_step(ns.worker, ns.preset, threads, ns.seed)
    gen = torch.Generator().manual_seed(ns.seed)
    batches = [tuple(torch.randint(VOCAB, (BATCH, BLOCK), generator=gen) for _ in "xy") for _ in range(16)]
    t0 = time.perf_counter()
    for x, y in batches[:3]:
        step(x, y)
    warm_s = time.perf_counter() - t0
    times, end = [], time.perf_counter() + ns.seconds
    while time.perf_counter() < end or not times:
        x, y = batches[len(times) % len(batches)]
        t0 = time.perf_counter()
        step(x, y)
        times.append(time.perf_counter() - t0)
    print(json.dumps({"ms": 1000 * statistics.median(times), "steps": len(times), "warm_s": warm_s,
                      "shards": shards, "threads": threads, "torch": torch.__version__}))
    return 0


def turn(ns, name: str) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", name, "--preset", ns.preset,
           "--seconds", str(ns.seconds), "--threads", str(ns.threads), "--seed", str(ns.seed)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        why = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"contestant {name} failed: {why}")
    return json.loads(lines[-1])


def main(argv=None) -> int:
    ns = parse_args(argv)
    if ns.worker is not None:
        return worker(ns)
    names = [NANOGPT, *ns.configs]
    runs: dict[str, list[dict]] = {n: [] for n in names}
    try:
        for _ in range(ns.rounds):
            for name in names:
                runs[name].append(turn(ns, name))
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    ref = [r["ms"] for r in runs[NANOGPT]]
    first = runs[NANOGPT][0]
    tokens = BATCH * BLOCK
    print(f"training step, recipe shapes ({N_LAYER} layers, {N_EMBD} wide, batch {BATCH}x{BLOCK}); torch "
          f"{first['torch']}, {first['threads']} threads; {ns.rounds} rounds of {ns.seconds:g} s per contestant, "
          f"each in its own process")
    print(f"{'contestant':<40} {'ms/step':>8} {'tokens/s':>9} {'vs nanoGPT':>10}  per round")
    result = {"nanogpt_ms": round(statistics.median(ref), 2)}
    for name in names:
        ms = statistics.median(r["ms"] for r in runs[name])
        ratios = [a / r["ms"] for a, r in zip(ref, runs[name])]
        label = "nanoGPT (stand-in)" if name == NANOGPT else f"llmlab {ns.preset}, {name}"
        print(f"{label:<40} {ms:>8.1f} {1000 * tokens / ms:>9,.0f} {statistics.median(ratios):>9.2f}x  "
              + " ".join(f"{x:.2f}" for x in ratios))
        if name != NANOGPT:
            key = name.replace("+", "_").replace("-", "_")
            result[f"{key}_ms"], result[f"{key}_x"] = round(ms, 2), round(statistics.median(ratios), 3)
            result[f"{key}_shards"] = runs[name][0]["shards"]
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
