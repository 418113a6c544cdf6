"""Training-step speed of llmlab beside a nanoGPT-equivalent step, measured in one process.

    python benchmarks/train_speed.py [--preset flash] [--rounds 20] [--steps 5]
                                     [--configs eager,compile,batch-threads,compile+batch-threads]

The shakespeare_char CPU recipe's shapes (vocab 65, 4 layers, 4 heads, 128 wide, block 64,
batch 12, AdamW, clip 1.0) on random tokens: the step time does not depend on the text. Every
contestant has its own model and optimizer from the same seed and trains on the same batches;
rounds alternate between them (`--steps` steps each), so a noisy machine slows all of them alike.
llmlab runs `llmlab.step.TrainStep`, the code `train()` runs. The nanoGPT stand-in
(benchmarks/nanogpt_reference.py) uses torch's default threads, as nanoGPT does; `batch-threads`
splits each batch across the cores (`--batch-threads`, one shard a core).

Prints a table of median ms/step, tokens/s and speed relative to nanoGPT, then as its LAST line
a JSON object {"nanogpt_ms": ..., "<config>_ms": ..., "<config>_x": ..., "<config>_shards": ...}.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
for path in (HERE.parent, HERE):  # llmlab and the nanoGPT stand-in, runnable from anywhere
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

CONFIGS = {  # name: (compile, batch_threads as a multiple of the cores: 0 = off)
    "eager": (False, 0), "compile": (True, 0), "batch-threads": (False, 1), "compile+batch-threads": (True, 1),
}
VOCAB, N_LAYER, N_HEAD, N_EMBD, BLOCK, BATCH = 65, 4, 4, 128, 64, 12


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="flash", help="llmlab rung to time (default flash: nanoGPT's model)")
    p.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated, of: {', '.join(CONFIGS)}")
    p.add_argument("--rounds", type=int, default=20, help="alternating rounds (default 20)")
    p.add_argument("--steps", type=int, default=5, help="steps per contestant per round (default 5)")
    p.add_argument("--threads", type=int, default=0,
                   help="CPU threads to use (default: torch's, one per core); batch-threads runs one shard "
                        "per thread, at most one per batch row")
    p.add_argument("--seed", type=int, default=1337)
    ns = p.parse_args(argv)
    ns.configs = [c.strip() for c in ns.configs.split(",") if c.strip()]
    bad = [c for c in ns.configs if c not in CONFIGS]
    if bad or not ns.configs:
        p.error(f"unknown config(s) {', '.join(bad) or '(none)'}; choose from {', '.join(CONFIGS)}")
    if ns.rounds < 1 or ns.steps < 1 or ns.threads < 0:
        p.error("--rounds and --steps must be >= 1, --threads >= 0")
    return ns


class Contestant:
    def __init__(self, name: str, threads: int, step, shards: int = 0):
        self.name, self.threads, self.step, self.shards, self.times = name, threads, step, shards, []

    def run(self, batches) -> None:
        import torch

        torch.set_num_threads(self.threads)  # the process-wide count this contestant trains with
        for x, y in batches:
            t0 = time.perf_counter()
            self.step(x, y)
            self.times.append(time.perf_counter() - t0)


def build(ns, cores: int, closers: list) -> list[Contestant]:
    import torch

    from llmlab.model import Transformer
    from llmlab.presets import preset_config
    from llmlab.step import TrainStep
    from llmlab.train import TrainArgs, make_optimizer
    from nanogpt_reference import NanoGPT, nanogpt_optimizer, nanogpt_step

    torch.manual_seed(ns.seed)
    ref = NanoGPT(VOCAB, BLOCK, N_LAYER, N_HEAD, N_EMBD)
    ref_opt = nanogpt_optimizer(ref, lr=1e-3)
    contestants = [Contestant("nanoGPT (stand-in)", cores, lambda x, y: nanogpt_step(ref, ref_opt, x, y))]
    for name in ns.configs:
        compile, shard = CONFIGS[name]
        a = TrainArgs(preset=ns.preset, n_layer=N_LAYER, n_head=N_HEAD, n_embd=N_EMBD, block_size=BLOCK,
                      dropout=0.0, bias=False, batch_size=BATCH, lr=1e-3, compile=compile,
                      batch_threads=min(cores, BATCH) if shard else 1)
        torch.set_num_threads(cores)
        torch.manual_seed(ns.seed)
        model = Transformer(preset_config(ns.preset, vocab_size=VOCAB, **a.model_overrides()))
        train_step = TrainStep(model, make_optimizer(model, a, "cpu"), a, "cpu")
        closers.append(train_step.close)
        shards = 0 if train_step.shards is None else train_step.shards.n
        contestants.append(Contestant(f"llmlab {ns.preset}, {name}", 1 if shards else cores,
                                      lambda x, y, s=train_step: s(lambda: (x, y), 1e-3), shards))
    return contestants


def main(argv=None) -> int:
    ns = parse_args(argv)
    import torch

    saved_threads = torch.get_num_threads()
    if ns.threads:
        torch.set_num_threads(ns.threads)
    cores = torch.get_num_threads()
    closers = []
    try:
        contestants = build(ns, cores, closers)
        warm_s = race(contestants, ns)
    finally:  # shards hold a thread pool and set torch to one thread: always give both back
        for close in closers:
            close()
        torch.set_num_threads(saved_threads)
    report(contestants, ns, cores, warm_s)
    return 0


def race(contestants: list[Contestant], ns) -> float:
    """Warm every contestant up (compiling), then alternate rounds; returns the warm-up seconds."""
    import torch

    gen = torch.Generator().manual_seed(ns.seed)

    def batches(n):
        return [tuple(torch.randint(VOCAB, (BATCH, BLOCK), generator=gen) for _ in "xy") for _ in range(n)]

    t0 = time.perf_counter()
    for c in contestants:  # warm-up (and compile) outside the timed rounds
        c.run(batches(3))
        c.times.clear()
    warm_s = time.perf_counter() - t0
    for _ in range(ns.rounds):
        work = batches(ns.steps)
        for c in contestants:
            c.run(work)
    return warm_s


def report(contestants: list[Contestant], ns, cores: int, warm_s: float) -> None:
    import torch

    tokens = BATCH * BLOCK
    ref_ms = 1000 * statistics.median(contestants[0].times)
    print(f"training step, recipe shapes ({N_LAYER} layers, {N_EMBD} wide, batch {BATCH}x{BLOCK}); torch "
          f"{torch.__version__}, {cores} cores; {ns.rounds} alternating rounds of {ns.steps} steps, "
          f"warm-up {warm_s:.0f} s")
    print(f"{'contestant':<40} {'ms/step':>8} {'tokens/s':>9} {'vs nanoGPT':>10}")
    result = {"nanogpt_ms": round(ref_ms, 2)}
    for c in contestants:
        ms = 1000 * statistics.median(c.times)
        print(f"{c.name:<40} {ms:>8.1f} {1000 * tokens / ms:>9,.0f} {ref_ms / ms:>9.2f}x")
        if c is not contestants[0]:
            key = c.name.split(", ", 1)[1].replace("+", "_").replace("-", "_")
            result[f"{key}_ms"], result[f"{key}_x"] = round(ms, 2), round(ref_ms / ms, 3)
            result[f"{key}_shards"] = c.shards
    print(json.dumps(result))


if __name__ == "__main__":
    sys.exit(main())
