"""What the engine process loads: the model (an llmlab run or checkpoint, or a Hugging Face
folder) with its tokenizer, stop ids and chat template, and the engine over a paged cache sized
by the server's settings."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from llmlab.errors import LlmlabError
from llmlab.serve.args import ServeArgs


def _is_hf_dir(path: Path) -> bool:
    cfg = path / "config.json"
    if not cfg.is_file():
        return False
    try:
        meta = json.loads(cfg.read_bytes().decode("utf-8"))
    except (OSError, ValueError):
        return False  # the checkpoint loader says what is wrong with it
    return isinstance(meta, dict) and "model_type" in meta and not str(meta.get("format", "")).startswith("llmlab")


def _hf_stop_ids(path: Path) -> set[int]:
    """End-of-text ids an HF folder names (config.json / generation_config.json eos_token_id)."""
    ids: set[int] = set()
    for name in ("config.json", "generation_config.json"):
        try:
            value = json.loads((path / name).read_text(encoding="utf-8")).get("eos_token_id")
        except (OSError, ValueError, AttributeError):
            continue
        for v in value if isinstance(value, list) else [value]:
            if isinstance(v, int) and not isinstance(v, bool) and v >= 0:
                ids.add(v)
    return ids


def load_served(path_or_run: str, device: str = "auto", runtime: Optional[dict] = None):
    """(model, tokenizer, chat template, stop ids, model folder) of an llmlab run/checkpoint or a
    Hugging Face folder, on the paged cache."""
    from llmlab.serve.chat import load_template
    from llmlab.tokenizer import TOKENIZER_FILE, load_tokenizer

    changes = {**(runtime or {}), "cache": "paged"}
    path = Path(path_or_run)
    if path.is_dir() and _is_hf_dir(path):
        from llmlab.device import resolve_device
        from llmlab.hf import from_hf

        dev = resolve_device(device)
        if not (path / TOKENIZER_FILE).is_file():
            raise LlmlabError(f"{path} has no {TOKENIZER_FILE}; the server needs the model's tokenizer")
        from llmlab.run_loader import check_usable

        tok = load_tokenizer(path)
        model = from_hf(path)
        check_usable(model, tok, path)
        model.use_runtime(model.runtime.changed(**changes))
        model.to(dev)
        if model.runtime.dtype:
            import torch

            model.to(getattr(torch, model.runtime.dtype))
        folder, stops = path, _hf_stop_ids(path)
    else:
        from llmlab.checkpoint import resolve_checkpoint
        from llmlab.run_loader import load_run

        model, tok = load_run(path_or_run, device, changes)
        folder, stops = resolve_checkpoint(path_or_run), set()
    if tok.eos_id is not None:
        stops.add(tok.eos_id)
    return model.eval(), tok, load_template(folder), frozenset(stops), folder


def _context(model, args: ServeArgs) -> int:
    limit = model.pos.max_positions  # learned positions end there
    max_len = args.max_len or model.config.block_size
    if limit is not None and max_len > limit:
        raise LlmlabError(f"--max-len {max_len} exceeds this model's {limit} learned positions")
    return max_len


def load_engine(path_or_run: str, args: ServeArgs, runtime: Optional[dict] = None):
    """(engine, tokenizer, stop ids, model folder, a one-line description) for serving `path_or_run`
    under `args`: the cache sized and checked against memory, the compiled step warmed up."""
    from llmlab import memory
    from llmlab.model.paged_cache import blocks_for
    from llmlab.serve.engine import Engine

    model, tok, _, stops, folder = load_served(path_or_run, args.device, runtime)
    max_len = _context(model, args)
    if args.block_size is not None:
        model.use_runtime(model.runtime.replace(block_size=args.block_size))
    blocks = args.cache_blocks or args.max_batch * blocks_for(max_len, model.runtime.block_size)
    weight = model.tok_emb.weight
    memory.check_fits(memory.cache_bytes(model.config, 1, blocks * model.runtime.block_size, weight.element_size()),
                      f"a paged cache of {blocks} blocks", "lower --max-batch, --max-len or --cache-blocks",
                      weight.device.type)
    engine = Engine(model, args.max_batch, max_len, num_blocks=blocks, batch_invariant=args.batch_invariant)
    if model.runtime.compile:
        print("compiling the decode step (seconds to a minute, once)...", flush=True)
        engine.warm_up()
    rt = model.runtime
    about = (f"{model.num_params() / 1e6:.2f}M params, {rt.attention}{', compiled' if rt.compile else ''}")
    return engine, tok, stops, folder, about
