"""Fine-tune a small GPT-2-shaped model on tiny Shakespeare, full and LoRA, against training the
same model from scratch for the same steps (nanoGPT's finetune_shakespeare, at CPU scale).

    python benchmarks/finetune_shakespeare.py [--data ../shared/data/tinyshakespeare.txt] [--out DIR]
        [--pretrain-iters 1200] [--max-iters 500] [--lora-rank 8] [--lora-targets all-linear]
        [--lr-scratch 2e-3] [--lr-full 6e-4] [--lr-lora 4e-3] [--seeds 1337] [--threads N] [--tiny]

No download: the model is pretrained here first, on llmlab's built-in corpus (the running Python's
standard-library sources: English in docstrings and comments, and code), with the byte tokenizer, as a
GPT-2 shape (`flash` preset: learned positions, LayerNorm, GELU, biases, tied head; 4 layers, 4 heads,
128 wide, context 128; `llmlab convert --to-hf` exports it as a GPT2LMHeadModel). Then three
contestants train on tiny Shakespeare with the same steps, batch, schedule shape and seed:
* scratch: the same shape from random weights;
* full: `--init-from` the pretrained run, every weight trained;
* lora: `--init-from` it with `--lora-rank R --lora-targets T`: only the adapters trained.

Every run (pretraining included) is a `train()` in a process of its own; with several seeds the
contestants take turns seed after seed. It prints a table (trainable parameters, AdamW state bytes
as saved in last/train_state.safetensors, val loss at a few steps and at the end per seed, the
loss over the whole validation split, median tokens/s, minutes) and a JSON line, and writes the val
loss curves to OUT/val_loss.png. `--tiny` runs it at toy sizes (1 layer, 32 wide, a few steps): a
check that the recipe works, not a result.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent
for path in (REPO, HERE):  # runnable as a plain script; the recipe's helpers live beside it
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from train_shakespeare_char import DEFAULT_DATA, full_val_loss, summarize  # noqa: E402

CONTESTANTS = ("scratch", "full", "lora")
SHAPE = dict(n_layer=4, n_head=4, n_embd=128, block_size=128)
TINY = dict(n_layer=1, n_head=2, n_embd=32, block_size=32)


def settings(ns, name: str, seed: int, out: Path):
    """The TrainArgs of one run: the pretraining (`pretrain`) or a contestant."""
    from llmlab.training import TrainArgs

    shape = TINY if ns.tiny else SHAPE
    common = dict(dropout=0.0, batch_size=4 if ns.tiny else 16, eval_iters=2 if ns.tiny else 20, weight_decay=0.1,
                  beta1=0.9, beta2=0.99, grad_clip=1.0, out=str(out), device="cpu", seed=seed, sample_tokens=0,
                  quiet=True)
    if name == "pretrain":  # the built-in corpus (data None), byte tokenizer
        return TrainArgs(preset="flash", tokenizer="byte", bias=True, **shape, max_iters=ns.pretrain_iters,
                         eval_interval=max(1, ns.pretrain_iters // 4), lr=2e-3,
                         warmup_iters=min(100, ns.pretrain_iters // 10), **common)
    run = dict(data=ns.data, max_iters=ns.max_iters, eval_interval=ns.eval_interval,
               warmup_iters=min(50, ns.max_iters // 10), **common)
    if name == "scratch":
        return TrainArgs(preset="flash", tokenizer="byte", bias=True, **shape, lr=ns.lr_scratch, **run)
    source = str(Path(ns.out) / f"pretrain-{seed}")
    if name == "full":
        return TrainArgs(init_from=source, lr=ns.lr_full, **run)
    return TrainArgs(init_from=source, lora_rank=ns.lora_rank, lora_targets=ns.lora_targets, lr=ns.lr_lora, **run)


def run_one(ns) -> int:
    """Train one run in this process; print one JSON line of its numbers."""
    import torch
    from safetensors.torch import load_file

    from llmlab.training import train

    if ns.threads > 0:
        torch.set_num_threads(ns.threads)
    name = "pretrain" if ns.one == "pretrain" else ns.one
    out = Path(ns.out) / f"{name}-{ns.seed}"
    t0 = time.perf_counter()
    summary = train(settings(ns, name, ns.seed, out))
    minutes = (time.perf_counter() - t0) / 60
    stats = summarize(out / "metrics.jsonl")
    state = load_file(str(out / "last" / "train_state.safetensors"))  # AdamW's moments (and steps), as saved
    opt_bytes = sum(t.numel() * t.element_size() for k, t in state.items() if k.startswith("opt."))
    from llmlab import load, lora

    model = load(out / "last", merge_lora=False)
    print(json.dumps({"run": name, "seed": ns.seed, "val_loss": summary["val_loss"],
                      "curve": {str(r["step"]): r["val_loss"] for r in stats["evals"]},
                      "full_val": None if name == "pretrain" else full_val_loss(out, ns.data),
                      "tokens_per_s": stats["median_tokens_per_s"], "minutes": minutes,
                      "params": model.num_params(), "trainable": lora.trainable_params(model),
                      "optimizer_bytes": opt_bytes}))
    return 0


def _worker(ns, one: str, seed: int) -> dict:
    cmd = [sys.executable, __file__, "--one", one, "--seed", str(seed), "--data", ns.data, "--out", ns.out,
           "--pretrain-iters", str(ns.pretrain_iters), "--max-iters", str(ns.max_iters),
           "--eval-interval", str(ns.eval_interval), "--lora-rank", str(ns.lora_rank),
           "--lora-targets", ns.lora_targets, "--lr-scratch", str(ns.lr_scratch), "--lr-full", str(ns.lr_full),
           "--lr-lora", str(ns.lr_lora), "--threads", str(ns.threads)] + (["--tiny"] if ns.tiny else [])
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"error: {one} (seed {seed}) failed:\n{r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def plot(results: dict[str, list[dict]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, runs in results.items():
        for i, r in enumerate(runs):
            steps = sorted(int(s) for s in r["curve"])
            ax.plot(steps, [r["curve"][str(s)] for s in steps],
                    label=f"{name} ({r['trainable']:,} trainable)" if i == 0 else None,
                    color={"scratch": "tab:gray", "full": "tab:blue", "lora": "tab:orange"}[name], alpha=0.9)
    ax.set_xlabel("step")
    ax.set_ylabel("val loss (tiny Shakespeare, byte tokens)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=str(DEFAULT_DATA) if DEFAULT_DATA.is_file() else None,
                   help=f"tiny Shakespeare text file (default {DEFAULT_DATA})")
    p.add_argument("--out", default="runs/finetune_shakespeare", help="a new directory for the runs and the PNG")
    p.add_argument("--pretrain-iters", type=int, default=1200, help="steps of pretraining on the built-in corpus")
    p.add_argument("--max-iters", type=int, default=500, help="steps of each contestant on Shakespeare")
    p.add_argument("--eval-interval", type=int, default=50)
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--lora-targets", default="all-linear")
    p.add_argument("--lr-scratch", type=float, default=2e-3)
    p.add_argument("--lr-full", type=float, default=6e-4)
    p.add_argument("--lr-lora", type=float, default=4e-3)
    p.add_argument("--seeds", default="1337")
    p.add_argument("--threads", type=int, default=0, help="torch threads per process (0: torch's default)")
    p.add_argument("--tiny", action="store_true", help="toy sizes and steps: checks the recipe runs")
    p.add_argument("--one", choices=("pretrain",) + CONTESTANTS, help=argparse.SUPPRESS)  # the worker
    p.add_argument("--seed", type=int, default=1337, help=argparse.SUPPRESS)
    ns = p.parse_args(argv)
    if ns.data is None or not Path(ns.data).is_file():
        print(f"error: tiny Shakespeare not found at {ns.data or DEFAULT_DATA}; pass --data PATH "
              "(or set LLMLAB_SHAKESPEARE for the tests)", file=sys.stderr)
        return 2
    if ns.one:
        return run_one(ns)
    out = Path(ns.out)
    if out.exists() and any(out.iterdir()):
        print(f"error: --out {out} already exists and is not empty; pass a new directory", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    seeds = [int(s) for s in ns.seeds.split(",")]
    results: dict[str, list[dict]] = {n: [] for n in CONTESTANTS}
    t0 = time.perf_counter()
    for i, seed in enumerate(seeds):
        pre = _worker(ns, "pretrain", seed)
        print(f"  pretrain seed {seed}: val {pre['val_loss']:.4f} on the built-in corpus "
              f"({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
        for name in CONTESTANTS[i % 3:] + CONTESTANTS[:i % 3]:  # turns rotate seed after seed
            results[name].append(_worker(ns, name, seed))
            print(f"  {name} seed {seed}: val {results[name][-1]['val_loss']:.4f} ({time.perf_counter() - t0:.0f} s)",
                  file=sys.stderr)
    steps = sorted(int(s) for s in results["scratch"][0]["curve"])
    shown = sorted({steps[0], steps[len(steps) // 4], steps[len(steps) // 2], steps[-1]})
    title = (f"fine-tuning on tiny Shakespeare: {ns.max_iters} steps after {ns.pretrain_iters} of pretraining,\n"
             f"LoRA rank {ns.lora_rank} ({ns.lora_targets}), seeds {ns.seeds}" + (" [tiny]" if ns.tiny else ""))
    print(title.replace("\n", " "))
    print("| contestant | lr | trainable params | AdamW state | " + " | ".join(f"val @ {s}" for s in shown)
          + " | final val per seed (mean, spread) | whole val | tokens/s | minutes |")
    print("|---|---|---|---|" + "---|" * len(shown) + "---|---|---|---|")
    lrs = {"scratch": ns.lr_scratch, "full": ns.lr_full, "lora": ns.lr_lora}
    summary = {}
    for name, runs in results.items():
        vals = [r["val_loss"] for r in runs]
        row = {"lr": lrs[name], "params": runs[0]["params"], "trainable": runs[0]["trainable"],
               "optimizer_bytes": runs[0]["optimizer_bytes"],
               "curve": {s: statistics.mean(r["curve"][str(s)] for r in runs) for s in steps},
               "val": vals, "val_mean": statistics.mean(vals), "val_spread": max(vals) - min(vals),
               "full_val_mean": statistics.mean(r["full_val"] for r in runs),
               "tokens_per_s": statistics.median(r["tokens_per_s"] for r in runs),
               "minutes": statistics.mean(r["minutes"] for r in runs)}
        summary[name] = row
        print(f"| {name} | {row['lr']:g} | {row['trainable']:,} of {row['params']:,} | "
              f"{row['optimizer_bytes'] / 1024:,.1f} KiB | " + " | ".join(f"{row['curve'][s]:.4f}" for s in shown)
              + f" | {' '.join(f'{v:.4f}' for v in vals)} ({row['val_mean']:.4f}, {row['val_spread']:.4f}) | "
              f"{row['full_val_mean']:.4f} | {row['tokens_per_s']:,.0f} | {row['minutes']:.1f} |")
    png = out / "val_loss.png"
    plot(results, png, title)
    print(json.dumps({"summary": summary, "png": str(png), "minutes": (time.perf_counter() - t0) / 60}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
