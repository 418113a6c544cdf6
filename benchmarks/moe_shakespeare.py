"""Dense vs MoE at the same active parameters, on nanoGPT's shakespeare_char CPU recipe.

    python benchmarks/moe_shakespeare.py [--data PATH] [--max-iters 2000] [--seeds 1337,42,1]
                                         [--contestants dense,moe,moe-nobias] [--bias-rate 0.001]
                                         [--compile/--no-compile] [--batch-threads N] [--threads N]

Contestants (the recipe's sizes: 4 layers, 4 heads, 128 wide, block 64, batch 12, 2000 steps; the
`moe` rung's GPT base: learned positions, LayerNorm, MHA):
* dense: a SwiGLU MLP of width 384 in every layer;
* moe: the `moe` rung, 1 shared + 8 routed experts of width 128, top-2 (sigmoid scores, normalised),
  so a token runs through 3 x 128 = 384 hidden units, as in the dense model (active parameters equal
  but for the router's 8 x 128 per layer), with the balancing bias updated by --bias-rate (gamma);
* moe-nobias: the same with gamma = 0 (no balancing at all).

Every (contestant, seed) trains in a process of its own through llmlab's `train()`; the contestants
take turns seed after seed. It prints a table: total and active parameters, the final eval's val loss
per seed with mean and spread (max - min), the loss over the whole validation split (mean), median
training tokens/s, and the expert load max/mean (worst layer, averaged over the last 10% of steps),
then a JSON line with the same numbers.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent
for path in (REPO / "src", HERE):  # runnable as a plain script; the recipe lives beside it
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from train_shakespeare_char import DEFAULT_DATA, full_val_loss, recipe, summarize  # noqa: E402

CONTESTANTS = {"dense": ("moe_dense", 0.0), "moe": ("moe", None), "moe-nobias": ("moe", 0.0)}


def register_dense() -> None:
    """The moe rung with a dense SwiGLU MLP: width ffn_size = 384 at n_embd 128 = (1 shared + top-2) x 128."""
    from llmlab.presets import PRESETS, register

    register("moe_dense", "the moe rung with a dense SwiGLU MLP of the experts' active width",
             **PRESETS["moe"].fields | dict(mlp="swiglu"))


def run_one(ns) -> int:
    """Train one contestant at one seed in this process; print one JSON line of its numbers."""
    import torch

    import llmlab
    from llmlab.training import train

    if ns.threads > 0:
        torch.set_num_threads(ns.threads)
    register_dense()
    preset, gamma = CONTESTANTS[ns.one]
    with tempfile.TemporaryDirectory(prefix="llmlab-moe-bench-") as tmp:
        out = Path(tmp) / "run"
        args = recipe(ns.data, ns.max_iters, "cpu", ns.eval_interval, ns.compile, str(out), ns.seed, preset,
                      ns.batch_threads)
        args.moe_bias_rate = ns.bias_rate if gamma is None else gamma
        summary = train(args)
        stats = summarize(out / "metrics.jsonl")
        full_val = full_val_loss(out, ns.data)
        model = llmlab.load(out)  # the trained model's own parameter counts
    tail = stats["train"][-max(1, len(stats["train"]) // 10):]
    loads = [r["expert_load"] for r in tail if "expert_load" in r]
    worst = max(statistics.mean(layer) for layer in zip(*loads)) if loads else None
    print(json.dumps({"contestant": ns.one, "seed": ns.seed, "val_loss": summary["val_loss"], "full_val": full_val,
                      "tokens_per_s": stats["median_tokens_per_s"], "params": model.num_params(),
                      "active_params": model.num_active_params(), "expert_load_end": worst}))
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=str(DEFAULT_DATA) if DEFAULT_DATA.is_file() else None)
    p.add_argument("--max-iters", type=int, default=2000)
    p.add_argument("--eval-interval", type=int, default=250)
    p.add_argument("--seeds", default="1337,42,1")
    p.add_argument("--contestants", default=",".join(CONTESTANTS))
    p.add_argument("--bias-rate", type=float, default=0.001, help="gamma of the moe contestant (default 0.001)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                   help="torch.compile the loss (default off: eager, as nanoGPT's CPU recipe)")
    p.add_argument("--batch-threads", type=int, default=1)
    p.add_argument("--threads", type=int, default=0, help="torch threads per process (0: torch's default)")
    p.add_argument("--one", choices=list(CONTESTANTS), help=argparse.SUPPRESS)  # the worker
    p.add_argument("--seed", type=int, default=1337, help=argparse.SUPPRESS)
    ns = p.parse_args(argv)
    if ns.data is None or not Path(ns.data).is_file():
        print(f"error: tiny Shakespeare not found at {ns.data or DEFAULT_DATA}; pass --data PATH", file=sys.stderr)
        return 2
    if ns.one:
        return run_one(ns)
    names = ns.contestants.split(",")
    unknown = [n for n in names if n not in CONTESTANTS]
    if unknown or not names:
        print(f"error: unknown contestant(s) {', '.join(unknown)}; choose from {', '.join(CONTESTANTS)}", file=sys.stderr)
        return 2
    seeds = [int(s) for s in ns.seeds.split(",")]
    results: dict[str, list[dict]] = {n: [] for n in names}
    t0 = time.perf_counter()
    for i, seed in enumerate(seeds):
        for name in names[i % len(names):] + names[:i % len(names)]:  # turns rotate seed after seed
            cmd = [sys.executable, __file__, "--one", name, "--seed", str(seed), "--data", ns.data,
                   "--max-iters", str(ns.max_iters), "--eval-interval", str(ns.eval_interval),
                   "--bias-rate", str(ns.bias_rate), "--batch-threads", str(ns.batch_threads),
                   "--threads", str(ns.threads), "--compile" if ns.compile else "--no-compile"]
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode != 0:
                print(f"error: {name} seed {seed} failed:\n{r.stderr[-2000:]}", file=sys.stderr)
                return 1
            results[name].append(json.loads(r.stdout.strip().splitlines()[-1]))
            print(f"  {name} seed {seed}: val {results[name][-1]['val_loss']:.4f} ({time.perf_counter() - t0:.0f} s)",
                  file=sys.stderr)
    print(f"dense vs moe, shakespeare_char recipe, {ns.max_iters} steps, seeds {ns.seeds}, "
          f"{'compiled' if ns.compile else 'eager'}, batch threads {ns.batch_threads}, gamma {ns.bias_rate}")
    print("| contestant | params (active) | val loss per seed | mean (spread) | whole val | tokens/s | load max/mean at end |")
    print("|---|---|---|---|---|---|---|")
    summary = {}
    for name, runs in results.items():
        vals = [r["val_loss"] for r in runs]
        load = [r["expert_load_end"] for r in runs if r["expert_load_end"] is not None]
        row = {"val_mean": statistics.mean(vals), "val_spread": max(vals) - min(vals),
               "full_val_mean": statistics.mean(r["full_val"] for r in runs),
               "tokens_per_s": statistics.median(r["tokens_per_s"] for r in runs),
               "expert_load_end": statistics.mean(load) if load else None,
               "params": runs[0]["params"], "active_params": runs[0]["active_params"]}
        summary[name] = row
        print(f"| {name} | {row['params'] / 1e6:.2f}M ({row['active_params'] / 1e6:.2f}M) | "
              + " ".join(f"{v:.4f}" for v in vals) + f" | {row['val_mean']:.4f} ({row['val_spread']:.4f}) | "
              f"{row['full_val_mean']:.4f} | {row['tokens_per_s']:,.0f} | "
              + ("-" if row["expert_load_end"] is None else f"{row['expert_load_end']:.2f}") + " |")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
