"""The server process's side of the engine (llmlab.serve.core runs the other): it starts the
engine process, sends it requests and aborts, and turns its outputs into each request's text
events and the metrics, on the event loop (the pipe is watched with `add_reader`: no thread).

A request is "pending" from its submission until its first token (queued, or being prefilled);
the queue limit (429) counts those. Text and stop strings live here: a stop string ends the
request at once for its client and aborts it in the engine, which may have made a token or two
more by then (never sent, never counted).
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import multiprocessing
import time
from typing import Optional

from llmlab.errors import LlmlabError
from llmlab.model.paged_cache import blocks_for
from llmlab.serve.args import ServeArgs
from llmlab.serve.core import Loaded, Stats
from llmlab.serve.engine import Sequence
from llmlab.serve.metrics import Metrics
from llmlab.serve.protocol import ApiError
from llmlab.serve.scheduler import Output
from llmlab.textstream import TextStream

log = logging.getLogger("llmlab.serve")
RETRY_AFTER_S = 1
STOP_TIMEOUT_S = 30
MESSAGES_PER_TURN = 32  # engine messages handled before the event loop's other work runs


class Request:
    """A request as the server sees it: what the engine runs (`seq`; its tokens as they arrive),
    its text stream and a queue of events for the HTTP handler: (text delta, finish_reason or None)."""

    def __init__(self, seq: Sequence, text: TextStream):
        self.seq, self.text = seq, text
        self.ident: Optional[int] = None
        self.events: asyncio.Queue = asyncio.Queue()
        self.arrived = time.monotonic()
        self.last_token: Optional[float] = None
        self.finish_reason: Optional[str] = None

    @property
    def completion_tokens(self) -> int:
        return len(self.seq.tokens)


class EngineClient:
    def __init__(self, path_or_run: str, args: ServeArgs, runtime: Optional[dict] = None):
        """Start the engine process and wait until it has loaded the model (or says why not)."""
        ctx = multiprocessing.get_context("spawn")  # a fresh interpreter: no forked threads or locks
        self.conn, child = ctx.Pipe()
        from llmlab.serve import core

        self.proc = ctx.Process(target=core.main, args=(child, path_or_run, args, runtime), name="llmlab-engine",
                                daemon=True)
        self.proc.start()
        child.close()  # ours is the only other end: the engine's exit reads as the pipe's end
        self.loaded: Loaded = self._wait_ready()
        self.max_queue = args.max_queue
        self.stats = Stats(0, 0, self.loaded.total_blocks, 0)
        self.requests: dict[int, Request] = {}
        self.pending = 0
        self.draining = self.dead = False
        self._ids = itertools.count()
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self.metrics = Metrics(self)

    def _wait_ready(self) -> Loaded:
        try:
            while not self.conn.poll(0.2):
                if not self.proc.is_alive():
                    raise LlmlabError(f"the engine process exited (code {self.proc.exitcode}) before the model loaded")
            kind, value = self.conn.recv()
        except (EOFError, OSError):
            self.proc.join(STOP_TIMEOUT_S)
            raise LlmlabError(f"the engine process exited (code {self.proc.exitcode}) before the model loaded") \
                from None
        except BaseException:  # Ctrl-C while loading: the engine goes too
            self.proc.kill()
            raise
        if kind == "error":
            self.proc.join(STOP_TIMEOUT_S)
            raise LlmlabError(value)
        return value

    # ---- from the HTTP handlers ------------------------------------------------------------
    @property
    def total_blocks(self) -> int:
        return self.loaded.total_blocks

    def blocks_needed(self, prompt_len: int, max_tokens: int) -> int:
        return blocks_for(prompt_len + max_tokens, self.loaded.block_size)

    def submit(self, req: Request) -> None:
        """Send `req` to the engine, or raise ApiError: 503 while shutting down, 429 when the queue is full."""
        if self.draining or self.dead:
            self.metrics.rejected.labels("503").inc()
            message = "the server is shutting down" if self.draining else "the engine stopped (see the server log)"
            raise ApiError(503, message, type="server_error", code="shutting_down" if self.draining else None)
        if self.pending >= self.max_queue:
            self.metrics.rejected.labels("429").inc()
            raise ApiError(429, f"the queue is full ({self.max_queue} requests waiting); retry later",
                           type="rate_limit_error", code="queue_full", headers={"Retry-After": str(RETRY_AFTER_S)})
        req.ident = next(self._ids)
        self.requests[req.ident] = req
        self.pending += 1
        self._send(("add", req.ident, req.seq))

    def cancel(self, req: Request) -> None:
        """The client went away: the engine frees its row and blocks between two steps."""
        if req.finish_reason is None:
            self._send(("abort", req.ident))
            self._finish(req, "cancelled")

    # ---- life ------------------------------------------------------------------------------
    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self.conn.fileno(), self._on_readable)

    def drain(self) -> None:
        """SIGTERM: refuse new requests; the accepted ones go on."""
        self.draining = True

    async def stop(self) -> None:
        """Cancel what is left, stop the engine process and wait for it."""
        self.draining = True
        for req in list(self.requests.values()):
            self._finish(req, "cancelled")
        self._send(("stop",))
        self._close_pipe()
        await asyncio.get_running_loop().run_in_executor(None, self.proc.join, STOP_TIMEOUT_S)
        if self.proc.is_alive():
            log.error("the engine process did not stop within %d s; killing it", STOP_TIMEOUT_S)
            self.proc.kill()
            self.proc.join()

    # ---- the engine's outputs ------------------------------------------------------------------
    def _send(self, message: tuple) -> None:
        if self.dead:
            return
        try:
            self.conn.send(message)
        except OSError:
            self._engine_gone()

    def _on_readable(self) -> None:
        try:
            for _ in range(MESSAGES_PER_TURN):  # then the loop's other work gets a turn: the rest waits
                if self.dead or not self.conn.poll():
                    break
                _, outputs, stats = self.conn.recv()
                self._hand_out(outputs, stats)
        except (EOFError, OSError):
            self._engine_gone()

    def _hand_out(self, outputs: list[Output], stats: Stats) -> None:
        """Each request's new text; finished ones leave."""
        now, made = time.monotonic(), 0
        self.stats = stats
        if stats.decoded:
            self.metrics.batch.observe(stats.decoded)
        for out in outputs:
            req = self.requests.get(out.ident)
            if req is None:  # ended here already (a stop string, a cancel): its late tokens are dropped
                continue
            if out.reason == "error":
                self._finish(req, "error")
                continue
            seq = req.seq
            if not seq.tokens:
                self.pending -= 1
                self.metrics.prompt_tokens.inc(len(seq.prompt))
                self.metrics.ttft.observe(now - req.arrived)
            else:
                self.metrics.itl.observe(now - req.last_token)
            req.last_token = now
            seq.tokens += out.tokens
            made += len(out.tokens)
            by_token = out.reason == "stop"  # the stop token is not text
            delta = req.text.feed(seq.tokens[:-1] if by_token else seq.tokens, final=out.reason is not None)
            reason = "stop" if req.text.stopped else out.reason
            if delta or reason:
                req.events.put_nowait((delta, reason))
            if reason:
                if out.reason is None:  # a stop string: the engine would go on
                    self._send(("abort", req.ident))
                self._finish(req, reason)
        self.metrics.tokens(made, now)

    def _finish(self, req: Request, reason: str) -> None:
        req.finish_reason = reason
        self.requests.pop(req.ident, None)
        if not req.seq.tokens:
            self.pending -= 1
        self.metrics.finished.labels(reason).inc()
        if reason in ("cancelled", "error"):
            req.events.put_nowait(("", reason))

    def _engine_gone(self) -> None:
        if self.dead:
            return
        self.dead = True
        if not self.draining:
            log.error("the engine process stopped (exit code %s); ending %d request(s)", self.proc.exitcode,
                      len(self.requests))
        for req in list(self.requests.values()):
            self._finish(req, "error")
        self._close_pipe()

    def _close_pipe(self) -> None:
        self.dead = True
        if self._loop is not None:
            self._loop.remove_reader(self.conn.fileno())
            self._loop = None
        self.conn.close()
