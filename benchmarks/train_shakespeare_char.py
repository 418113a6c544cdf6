"""nanoGPT's shakespeare_char CPU recipe, trained by llmlab's own `train()`.

    python benchmarks/train_shakespeare_char.py [--data PATH] [--max-iters N] [--device D] [--threads N]
                                                [--no-compile] [--batch-threads N] [--preset P]
                                                [--seed S] [--no-full-val]

The recipe (nanoGPT config/train_shakespeare_char.py with its README's CPU overrides): character
tokenizer, n_layer 4, n_head 4, n_embd 128, block 64, batch 12, no bias, dropout 0, AdamW lr 1e-3
(beta2 0.99, weight decay 0.1, clip 1.0), 100 warmup iters then cosine to 1e-4 at iter 2000,
eval_iters 20. nanoGPT's model reaches val loss 1.89-1.93 this way, depending on the seed
(nanoGPT itself: 1.8857 on this machine).

By default it trains llmlab's best setting for the recipe: the `rope` rung, compiled, one batch
shard per core. `--preset flash --no-compile --batch-threads 1` is nanoGPT's own model and step.

Prints a short table, then as its LAST line a JSON object:
{"val_loss": final eval, "tokens_per_s": median per-step tokens/s (metrics.jsonl), "iters": steps}
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # runnable as a plain script from anywhere
    sys.path.insert(0, str(REPO / "src"))

DEFAULT_DATA = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"
RECIPE_ITERS = 2000  # nanoGPT: max_iters = lr_decay_iters = 2000


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=str(DEFAULT_DATA) if DEFAULT_DATA.is_file() else None,
                   help=f"tiny Shakespeare text file (default {DEFAULT_DATA})")
    p.add_argument("--max-iters", type=int, default=RECIPE_ITERS,
                   help="training steps (default 2000); the cosine lr decay spans them")
    p.add_argument("--device", default="cpu", help="cpu (the recipe), cuda, mps or auto")
    p.add_argument("--eval-interval", type=int, default=250)
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads (default: torch's choice, one per core). On a shared machine 1 "
                        "can be much faster: OpenMP threads spin-wait for a core another process holds")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                   help="TrainArgs(compile=...): torch.compile the loss (default on; ~40 s the first time)")
    p.add_argument("--batch-threads", type=int, default=None,
                   help="TrainArgs(batch_threads=N): each batch as N shards on N threads (default on a CPU: "
                        "one per torch thread, i.e. per core, at most 12; 1: torch's threads inside every op)")
    p.add_argument("--seed", type=int, default=1337, help="model init and batch order (default 1337)")
    p.add_argument("--preset", default="rope",
                   help="the rung trained on the recipe (default rope; flash is nanoGPT's own model)")
    p.add_argument("--no-full-val", action="store_true",
                   help="skip the extra loss over the whole validation split (a few seconds)")
    p.add_argument("--out", default=None, help="run directory (default: a temporary one, removed after)")
    return p.parse_args(argv)


def recipe(data: str, max_iters: int, device: str, eval_interval: int, compile: bool, out: str,
           seed: int = 1337, preset: str = "flash", batch_threads: int = 1):
    from llmlab.training import TrainArgs

    return TrainArgs(
        preset=preset, data=data, tokenizer="char",
        n_layer=4, n_head=4, n_embd=128, block_size=64, dropout=0.0, bias=False,
        batch_size=12, grad_accum=1, max_iters=max_iters,
        lr=1e-3, min_lr=1e-4, warmup_iters=min(100, max_iters), weight_decay=0.1,
        beta1=0.9, beta2=0.99, grad_clip=1.0,
        eval_interval=eval_interval, eval_iters=20,
        out=out, device=device, compile=compile, batch_threads=batch_threads, seed=seed,
        sample_tokens=0, quiet=True,
    )


def summarize(metrics_path: Path) -> dict:
    train_lines, evals = [], []
    for line in metrics_path.read_text().splitlines():
        if not line.strip():
            continue
        rec = json.loads(line)
        (evals if "val_loss" in rec else train_lines).append(rec)
    rates = [r["tokens_per_s"] for r in train_lines]
    return {"train": train_lines, "evals": evals,
            "median_tokens_per_s": statistics.median(rates) if rates else float("nan")}


def full_val_loss(out: Path, data: str) -> float:
    """Loss of the final weights over the whole validation split (consecutive block-long windows):
    the recipe's eval averages only 20 random batches, so it is noisy by a few hundredths."""
    import torch

    from llmlab import load
    from llmlab.data import encode_corpus, load_text, split_ids
    from llmlab.tokenizer import load_tokenizer
    from llmlab.training.evaluate import consecutive_windows, mean_loss

    model = load(out / "last").eval()
    _, text = load_text(data)
    _, val = split_ids(encode_corpus(text, load_tokenizer(out / "last")))
    with torch.inference_mode():
        return mean_loss(model, consecutive_windows(val, model.config.block_size, rows=64)[1])


def main(argv=None) -> int:
    ns = parse_args(argv)
    if ns.data is None or not Path(ns.data).is_file():
        where = ns.data if ns.data is not None else DEFAULT_DATA
        print(f"error: tiny Shakespeare not found at {where}; pass --data PATH/TO/input.txt", file=sys.stderr)
        return 2
    if ns.max_iters < 1:
        print(f"error: --max-iters must be >= 1, got {ns.max_iters}", file=sys.stderr)
        return 2

    import torch

    from llmlab.errors import LlmlabError
    from llmlab.training import train
    from llmlab.training.device import pick_device

    if ns.threads > 0:
        torch.set_num_threads(ns.threads)
    if ns.batch_threads is None:
        try:
            on_cpu = pick_device(ns.device).startswith("cpu")
        except LlmlabError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        ns.batch_threads = min(torch.get_num_threads(), 12) if on_cpu else 1  # one shard a core, batch 12
    with tempfile.TemporaryDirectory(prefix="llmlab-shakespeare-") as tmp:
        out = ns.out or str(Path(tmp) / "run")
        args = recipe(ns.data, ns.max_iters, ns.device, ns.eval_interval, ns.compile, out, ns.seed,
                      ns.preset, ns.batch_threads)
        t0 = time.perf_counter()
        try:
            summary = train(args)
        except LlmlabError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        wall = time.perf_counter() - t0
        stats = summarize(Path(out) / "metrics.jsonl")
        full_val = None if ns.no_full_val else full_val_loss(Path(out), ns.data)

    train_lines, evals = stats["train"], stats["evals"]
    tok_s = stats["median_tokens_per_s"]
    tokens_per_step = args.batch_size * args.block_size
    first_steps = [r["tokens_per_s"] for r in train_lines[:5]]
    print(f"shakespeare_char (nanoGPT CPU recipe) via llmlab.train, preset {ns.preset}: "
          f"{summary['params'] / 1e6:.2f}M params, device {ns.device}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads"
          f"{', compile' if ns.compile else ''}"
          f"{f', batch threads {ns.batch_threads}' if ns.batch_threads > 1 else ''}")
    print(f"{'step':>6}  {'train loss':>10}  {'val loss':>8}")
    for r in evals:
        print(f"{r['step']:>6}  {r['train_loss']:>10.4f}  {r['val_loss']:>8.4f}")
    print(f"median step: {1000 * tokens_per_step / tok_s:.1f} ms = {tok_s:,.0f} tokens/s "
          f"({tokens_per_step} tokens/step); first steps: "
          + ", ".join(f"{1000 * tokens_per_step / r:.0f} ms" for r in first_steps))
    print(f"final val loss {summary['val_loss']:.4f} (eval: 20 batches of {args.batch_size}x{args.block_size})"
          + ("" if full_val is None else f"; over the whole val split: {full_val:.4f}"))
    print(f"wall time {wall:.1f} s for {len(train_lines)} steps and {len(evals)} evals")
    print(json.dumps({"val_loss": round(summary["val_loss"], 4), "tokens_per_s": round(tok_s, 1),
                      "iters": summary["step"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
