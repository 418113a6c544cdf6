"""`llmlab serve RUN_OR_HF_DIR`: load the model, size its paged cache, run the app on uvicorn.

SIGTERM (or Ctrl-C): new requests get 503 and /health says so, uvicorn stops accepting
connections and waits up to --drain-s for the in-flight ones to finish, then the scheduler cancels
whatever is left and the process exits 0 (130 after Ctrl-C, as every llmlab command).
"""
from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Optional

from llmlab.errors import LlmlabError
from llmlab.serve.args import API_KEY_ENV, ServeArgs


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


def build(path_or_run: str, args: ServeArgs, runtime: Optional[dict] = None):
    """(the ASGI app, the scheduler, a one-line description) for serving `path_or_run`."""
    try:
        import fastapi  # noqa: F401
        import jinja2  # noqa: F401
        import prometheus_client  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise LlmlabError(f"llmlab serve needs {e.name}: pip install -e '.[serve]'") from None
    from llmlab import memory
    from llmlab.serve.app import Served, build_app
    from llmlab.serve.engine import Engine
    from llmlab.serve.scheduler import Scheduler

    args.validate()
    model, tok, template, stops, folder = load_served(path_or_run, args.device, runtime)
    max_len = _context(model, args)
    if args.block_size is not None:
        model.use_runtime(model.runtime.replace(block_size=args.block_size))
    per_row = -(-max_len // model.runtime.block_size)
    blocks = args.cache_blocks or args.max_batch * per_row
    weight = model.tok_emb.weight
    memory.check_fits(memory.cache_bytes(model.config, 1, blocks * model.runtime.block_size, weight.element_size()),
                      f"a paged cache of {blocks} blocks", "lower --max-batch, --max-len or --cache-blocks",
                      weight.device.type)
    engine = Engine(model, args.max_batch, max_len, num_blocks=blocks, batch_invariant=args.batch_invariant)
    if model.runtime.compile:
        print("compiling the decode step (seconds to a minute, once)...", flush=True)
        engine.warm_up()
    name = args.model_name or (folder.parent.name if folder.name in ("best", "last") else folder.name)
    served = Served(name, tok, template, stops, max_len, model.config.vocab_size, int(time.time()))
    scheduler = Scheduler(engine, args.max_queue)
    app = build_app(served, scheduler, args.api_key, args.max_body)
    rt = model.runtime
    decode = "every row decoded each step" if args.batch_invariant else "running rows decoded"
    about = (f"serving {name} ({model.num_params() / 1e6:.2f}M params, {rt.attention}"
             f"{', compiled' if rt.compile else ''}): {args.max_batch} rows of up to {max_len} tokens, "
             f"{blocks} blocks of {rt.block_size}, {decode}, chat template: "
             f"{'the model' if template.source else 'default'}{', API key required' if args.api_key else ''}")
    return app, scheduler, about


def serve(path_or_run: str, args: ServeArgs, runtime: Optional[dict] = None) -> int:
    import uvicorn

    if args.api_key is None and os.environ.get(API_KEY_ENV):
        args.api_key = os.environ[API_KEY_ENV]
    app, scheduler, about = build(path_or_run, args, runtime)

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):  # SIGTERM / Ctrl-C: refuse new work, let uvicorn drain
            scheduler.drain()
            super().handle_exit(sig, frame)

    config = uvicorn.Config(app, host=args.host, port=args.port, timeout_graceful_shutdown=args.drain_s,
                            log_level="info", lifespan="on")
    print(about, flush=True)
    # uvicorn re-raises the signal it caught once it has drained, under the handler it found: a
    # SIGTERM handler that does nothing makes that a clean exit 0
    previous = signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        Server(config).run()
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0
