"""One run of a comparison (a preset, or a named configuration of one, at one seed), in a process
of its own: train it through llmlab's train() into its run directory, then measure what does not
depend on timing, and write the numbers to RUN_DIR/compare.json.

    python -m llmlab.compare.worker SPEC.json

Measured here: val loss (last eval, and over the whole validation split), the parameter count,
the cache's bytes per token, the process's peak memory (on a CPU its peak resident set, on CUDA
torch.cuda.max_memory_allocated), and the greedy tokens of a fixed prompt on the rung's own decode
path. Speeds are not: they are timed after every run has finished, round-robin across the presets'
processes (llmlab.compare.timing), so background load hits every preset alike.

Whatever goes wrong, the result file says so in one line ({"status": "failed", "error": ...}) and
the process exits 1; the parent goes on. The process dies with the comparison (proc.die_with_parent).
"""
from __future__ import annotations

import json
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from llmlab.compare.proc import die_with_parent
from llmlab.compare.settings import RESULT

WARMUP_STEPS = 5  # train steps whose logged tokens/s are left out of the median (allocation, first calls)
GREEDY_PROMPT, GREEDY_TOKENS = 16, 32  # the fixed prompt (start of the val split) and tokens generated from it


def one_line(e: BaseException) -> str:
    from llmlab.errors import LlmlabError

    msg = " ".join(str(e).split())[:300]
    return msg if isinstance(e, LlmlabError) and msg else f"{type(e).__name__}: {msg}"


def peak_memory_mib(device: str) -> float:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    import resource

    # Linux reports kilobytes, macOS bytes
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (2**20 if sys.platform == "darwin" else 2**10)


def read_curve(run_dir: Path) -> tuple[list[list[float]], float]:
    """([[step, val_loss], ...] from the run's eval lines, median logged train tokens/s past the warm-up)."""
    from llmlab.plot import read_metrics

    recs = read_metrics(run_dir)
    curve = [[r["step"], round(r["val_loss"], 4)] for r in recs if "val_loss" in r]
    speeds = [r["tokens_per_s"] for r in recs if "tokens_per_s" in r and r["step"] >= WARMUP_STEPS]
    speeds = speeds or [r["tokens_per_s"] for r in recs if "tokens_per_s" in r]
    return curve, statistics.median(speeds) if speeds else float("nan")


def whole_val(model, run_dir: Path, data, device: str, max_tokens):
    """(mean_loss over every consecutive block of the validation split (or its first max_tokens),
    tokens evaluated, the split's ids)."""
    from llmlab.data import encode_corpus, load_text, split_ids
    from llmlab.tokenizer import load_tokenizer
    from llmlab.training.evaluate import consecutive_windows, mean_loss

    _, text = load_text(data)
    _, val = split_ids(encode_corpus(text, load_tokenizer(run_dir / "last")))
    n, batches = consecutive_windows(val, model.config.block_size, max_tokens, device=device)
    return mean_loss(model, batches, device), n, val


def _trained(last: Path, max_iters: int) -> bool:
    """Whether the run's last checkpoint already holds every step (then only the measuring is left)."""
    from llmlab import checkpoint as ckpt

    if not last.is_dir():
        return False
    return ckpt.saved_step(ckpt.read_meta(last), last) >= max_iters


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    from llmlab.bench import cache_bytes_entry
    from llmlab.checkpoint import load
    from llmlab.compare.runtime import NONE, cache_kind, decode_path, recorded_config
    from llmlab.generation import generate
    from llmlab.training import TrainArgs, train
    from llmlab.training.device import pick_device

    m = spec["measure"]
    if m["threads"] > 0:
        torch.set_num_threads(m["threads"])
    run_dir = Path(spec["run_dir"])
    t0 = time.perf_counter()
    # a run cut short (the comparison was interrupted) continues where it stopped
    args = TrainArgs(**spec["train"], out=str(run_dir), resume=(run_dir / "last").is_dir(), quiet=True,
                     sample_tokens=0)
    device = pick_device(args.device)
    trains = not _trained(run_dir / "last", args.max_iters)  # else: killed after its last step, before its result
    if trains:
        train(args)
    # training's peak and time, before evaluation adds its own (unknown for a run that did not train here)
    train_s = round(time.perf_counter() - t0, 1) if trains else None
    peak = round(peak_memory_mib(device), 1) if trains else None
    curve, logged_tps = read_curve(run_dir)
    model = load(run_dir / "last", device=device)  # the final weights, which the last eval measured
    full_val, val_tokens, val_ids = whole_val(model, run_dir, args.data, device, m["val_tokens"])
    kind = cache_kind(model)
    with torch.inference_mode():
        model.eval()
        prompt = torch.tensor([[int(i) for i in val_ids[:GREEDY_PROMPT]]], device=device)
        greedy = generate(model, prompt, GREEDY_TOKENS, temperature=0)[0, GREEDY_PROMPT:].tolist()
        cache = cache_bytes_entry(spec["entry"], model, model.config.block_size) if kind != NONE else None
    return {
        "entry": spec["entry"], "preset": spec["preset"], "seed": spec["seed"], "status": "ok",
        "settings": spec["settings"], "config": recorded_config(model), "params": model.num_params(),
        "val_loss": curve[-1][1] if curve else None, "val_loss_whole": round(full_val, 4),
        "val_tokens": int(val_tokens), "val_curve": curve, "peak_mem_mib": peak,
        "cache_kind": kind, "decode_path": decode_path(model), "greedy_tokens": greedy,
        "cache_bytes_per_token": cache["measured"] if cache else None,
        "cache_formula": f"n_layer * ({cache['formula_text']}) * {cache['dtype'].replace('torch.', '')}"
                         if cache else None,
        # logged while training, possibly beside other runs (--jobs): the report times speed apart
        "train_tokens_per_s_logged": round(logged_tps), "train_s": train_s,
        "wall_s": round(time.perf_counter() - t0, 1), "device": device,
        "measured_at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


def main(argv: list[str]) -> int:
    die_with_parent()  # before anything slow: a killed comparison takes this run with it
    from llmlab.fsutil import atomic_write_json

    spec = json.loads(Path(argv[0]).read_text())
    out = Path(spec["run_dir"]) / RESULT
    try:
        result = measure(spec)
        code = 0
    except BaseException as e:  # noqa: BLE001 - every failure becomes the run's one-line reason
        if isinstance(e, KeyboardInterrupt):
            raise
        traceback.print_exc()  # the whole story goes to the run's log; the report gets one line
        result = {"entry": spec["entry"], "preset": spec["preset"], "seed": spec["seed"], "status": "failed",
                  "settings": spec["settings"], "error": one_line(e)}
        code = 1
    atomic_write_json(out, result)
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
