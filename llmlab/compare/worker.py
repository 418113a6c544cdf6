"""One preset of a comparison, in a process of its own: train it through llmlab's train() into its
run directory, then measure it, and write the numbers to RUN_DIR/compare.json.

    python -m llmlab.compare.worker SPEC.json

A process per preset keeps presets from touching each other (thread pools, compiled graphs,
allocator state) and makes its peak memory its own: on a CPU the process's peak resident set
(ru_maxrss), on CUDA torch.cuda.max_memory_allocated. Whatever goes wrong, the result file says so
in one line ({"status": "failed", "error": ...}) and the process exits 1; the parent goes on.
"""
from __future__ import annotations

import json
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from llmlab.compare.runner import RESULT, WARMUP_STEPS


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
    """([[step, val_loss], ...] from the run's eval lines, median train tokens/s past the warm-up)."""
    from llmlab.plot import read_metrics

    recs = read_metrics(run_dir)
    curve = [[r["step"], round(r["val_loss"], 4)] for r in recs if "val_loss" in r]
    speeds = [r["tokens_per_s"] for r in recs if "tokens_per_s" in r and r["step"] >= WARMUP_STEPS]
    speeds = speeds or [r["tokens_per_s"] for r in recs if "tokens_per_s" in r]
    return curve, statistics.median(speeds) if speeds else float("nan")


def whole_val_loss(model, run_dir: Path, data, device: str, max_tokens) -> tuple[float, int]:
    """mean_loss (the one evaluation) over every consecutive block of the validation split (or
    its first max_tokens)."""
    from llmlab.data import encode_corpus, load_text, split_ids
    from llmlab.tokenizer import load_tokenizer
    from llmlab.training.evaluate import consecutive_windows, mean_loss

    _, text = load_text(data)
    _, val = split_ids(encode_corpus(text, load_tokenizer(run_dir / "last")))
    n, batches = consecutive_windows(val, model.config.block_size, max_tokens, device=device)
    return mean_loss(model, batches, device), n


def decode_variants(model, steps: int, compile: bool) -> tuple[str, dict[str, tuple[dict, int]]]:
    """(the rung's own decode path, variants for bench.measure_contexts). Each rung decodes as it
    ships (stream()'s default: basic/flash recompute, later rungs cache); the compiled step
    applies only to a cache torch.compile can fuse (a paged cache decodes through its own kernel)."""
    rt = model.runtime
    path = {"none": "recompute", "dense": "cache", "paged": "paged cache"}[rt.cache]
    if rt.attention == "flash_mla":
        path = "paged kernel"
    variants = {"decode": ({}, steps)}
    if compile and rt.uses_cache:
        variants["compiled"] = ({"compile": True}, steps)
    return path, variants


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    from llmlab.bench import cache_bytes_entry, measure_contexts
    from llmlab.checkpoint import load
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
    train(args)
    train_s = time.perf_counter() - t0
    peak = peak_memory_mib(device)  # training's peak: measured before decoding adds its own buffers
    curve, train_tps = read_curve(run_dir)
    model = load(run_dir / "last", device=device)  # the final weights, which the last eval measured
    full_val, val_tokens = whole_val_loss(model, run_dir, args.data, device, m["val_tokens"])
    path, variants = decode_variants(model, m["decode_steps"], m["compile"])
    with torch.inference_mode():
        model.eval()
        ctx = measure_contexts(model, m["contexts"], m["repeats"], variants, spec["seed"])
        cache = cache_bytes_entry(spec["preset"], model, model.config.block_size) if model.runtime.uses_cache else None
    return {
        "preset": spec["preset"], "status": "ok", "settings": spec["settings"],
        "params": model.num_params(), "val_loss": curve[-1][1] if curve else None,
        "val_loss_whole": round(full_val, 4), "val_tokens": int(val_tokens),
        "train_tokens_per_s": round(train_tps), "peak_mem_mib": round(peak, 1), "decode_path": path,
        "decode": [{"context": r["context"], "prefill_tokens_per_s": round(r["prefill_tokens_per_s"]),
                    "tokens_per_s": round(r["decode_tokens_per_s"]["decode"]),
                    "compiled_tokens_per_s": (round(r["decode_tokens_per_s"]["compiled"])
                                              if "compiled" in r["decode_tokens_per_s"] else None)}
                   for r in ctx],
        "cache_bytes_per_token": cache["measured"] if cache else None,
        "cache_formula": f"n_layer * ({cache['formula_text']}) * {cache['dtype'].replace('torch.', '')}"
                         if cache else None,
        "val_curve": curve, "train_s": round(train_s, 1), "wall_s": round(time.perf_counter() - t0, 1),
        "device": device, "measured_at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


def main(argv: list[str]) -> int:
    from llmlab.checkpoint import write_json_atomically

    spec = json.loads(Path(argv[0]).read_text())
    out = Path(spec["run_dir"]) / RESULT
    try:
        result = measure(spec)
        code = 0
    except BaseException as e:  # noqa: BLE001 - every failure becomes the preset's one-line reason
        if isinstance(e, KeyboardInterrupt):
            raise
        traceback.print_exc()  # the whole story goes to the preset's log; the report gets one line
        result = {"preset": spec["preset"], "status": "failed", "settings": spec["settings"], "error": one_line(e)}
        code = 1
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomically(out, result)
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
