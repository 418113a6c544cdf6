"""`llmlab serve RUN_OR_HF_DIR`: start the engine process (it loads the model and sizes its paged
cache: llmlab.serve.core), then run the app on uvicorn in this one.

SIGTERM (or Ctrl-C): new requests get 503 and /health says so, uvicorn stops accepting
connections and waits up to --drain-s for the in-flight ones to finish, then whatever is left is
cancelled, the engine process stops and this one exits 0 (130 after Ctrl-C, as every llmlab command).
"""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Optional

from llmlab.errors import LlmlabError
from llmlab.serve.args import API_KEY_ENV, ServeArgs


def build(path_or_run: str, args: ServeArgs, runtime: Optional[dict] = None):
    """(the ASGI app, the engine client, a one-line description) for serving `path_or_run`; the
    engine process is started and has loaded the model when this returns."""
    try:
        import fastapi  # noqa: F401
        import jinja2  # noqa: F401
        import prometheus_client  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise LlmlabError(f"llmlab serve needs {e.name}: pip install -e '.[serve]'") from None
    from llmlab.serve.app import Served, build_app
    from llmlab.serve.chat import load_template
    from llmlab.serve.client import EngineClient

    args.validate()
    engine = EngineClient(path_or_run, args, runtime)
    try:
        got = engine.loaded
        folder = Path(got.folder)
        template = load_template(folder)
        name = args.model_name or (folder.parent.name if folder.name in ("best", "last") else folder.name)
        served = Served(name, got.tokenizer, template, got.stop_ids, got.max_len, got.vocab_size, int(time.time()))
    except BaseException:
        engine.proc.kill()
        raise
    app = build_app(served, engine, args.api_key, args.max_body)
    decode = "every row decoded each step" if args.batch_invariant else "running rows decoded"
    about = (f"serving {name} ({got.about}): {got.rows} rows of up to {got.max_len} tokens, "
             f"{got.total_blocks} blocks of {got.block_size}, {decode}, chat template: "
             f"{'the model' if template.source else 'default'}{', API key required' if args.api_key else ''}")
    return app, engine, about


def serve(path_or_run: str, args: ServeArgs, runtime: Optional[dict] = None) -> int:
    import uvicorn

    if args.api_key is None and os.environ.get(API_KEY_ENV):
        args.api_key = os.environ[API_KEY_ENV]
    app, engine, about = build(path_or_run, args, runtime)

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):  # SIGTERM / Ctrl-C: refuse new work, let uvicorn drain
            engine.drain()
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
        if engine.proc.is_alive():  # uvicorn never started the app (a port in use, ...)
            engine.proc.kill()
            engine.proc.join()
    return 0
