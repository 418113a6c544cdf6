"""Continuous batching (Orca's iteration-level scheduling over vLLM's paged cache).

One loop, an asyncio task on the server's event loop, owns the engine. Between two steps it drops
cancelled requests, hands out the text of the last step, releases finished requests' rows and
blocks, and admits waiting requests (first come, first served) while a row is free and the pool
can hold what each may ever need; then it runs one engine step (prefill of the newcomers, decode
of all) on its one worker thread, so the event loop keeps serving HTTP meanwhile. Everything the
loop decides happens between steps, on the event loop, so nothing here needs a lock.

Admission reserves a request's worst case (prompt + max_tokens, in blocks) against the pool, so
a running request never waits for a block and nothing is ever preempted; blocks are still taken
from the pool only as the sequence grows, and /metrics shows the pool's real free blocks.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

from llmlab.serve.engine import Engine, Sequence
from llmlab.serve.metrics import Metrics
from llmlab.serve.protocol import ApiError
from llmlab.serve.text import TextStream

log = logging.getLogger("llmlab.serve")
RETRY_AFTER_S = 1


class Request:
    """A request as the scheduler sees it: its engine sequence, its text stream and a queue of
    events for the HTTP handler: (text delta, finish_reason or None)."""

    def __init__(self, seq: Sequence, text: TextStream):
        self.seq, self.text = seq, text
        self.events: asyncio.Queue = asyncio.Queue()
        self.arrived = time.monotonic()
        self.last_token: Optional[float] = None
        self.blocks = 0  # reserved at admission
        self.seen = 0  # tokens already handed out
        self.cancelled = False
        self.finish_reason: Optional[str] = None

    @property
    def completion_tokens(self) -> int:
        return len(self.seq.tokens)


class Scheduler:
    def __init__(self, engine: Engine, max_queue: int):
        self.engine, self.max_queue = engine, max_queue
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.committed = 0  # blocks reserved by running requests
        self.metrics = Metrics(self)
        self.draining = self.stopping = False
        self._wake = asyncio.Event()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="llmlab-engine")
        self._task: Optional[asyncio.Task] = None

    # ---- from the HTTP handlers ------------------------------------------------------------
    def blocks_needed(self, prompt_len: int, max_tokens: int) -> int:
        return self.engine.blocks_for(prompt_len + max_tokens)

    def submit(self, req: Request) -> None:
        """Queue `req`, or raise ApiError: 503 while shutting down, 429 when the queue is full."""
        if self.draining:
            self.metrics.rejected.labels("503").inc()
            raise ApiError(503, "the server is shutting down", type="server_error", code="shutting_down")
        if len(self.waiting) >= self.max_queue:
            self.metrics.rejected.labels("429").inc()
            raise ApiError(429, f"the queue is full ({self.max_queue} requests waiting); retry later",
                           type="rate_limit_error", code="queue_full", headers={"Retry-After": str(RETRY_AFTER_S)})
        req.blocks = self.blocks_needed(len(req.seq.prompt), req.seq.max_tokens)
        self.waiting.append(req)
        self._wake.set()

    def cancel(self, req: Request) -> None:
        """The client went away: free its row and blocks at the next step boundary."""
        if req.finish_reason is None:
            req.cancelled = True
            self._wake.set()

    # ---- life ------------------------------------------------------------------------------
    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop())

    def drain(self) -> None:
        """SIGTERM: refuse new requests; the accepted ones go on."""
        self.draining = True

    async def stop(self) -> None:
        """Cancel what is left, end the loop and the worker thread."""
        self.draining = self.stopping = True
        for req in [*self.waiting, *self.running]:
            req.cancelled = True
        self._wake.set()
        if self._task is not None:
            await self._task
        self._executor.shutdown(wait=True)

    # ---- the loop ----------------------------------------------------------------------------
    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self._drop_cancelled()
            newcomers = self._admit()
            if not newcomers and not self.running:
                if self.stopping:
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            try:
                await loop.run_in_executor(self._executor, self.engine.step,
                                           [r.seq for r in newcomers], [r.seq for r in self.running])
            except Exception as e:  # noqa: BLE001 - the model failed: those requests end, the server goes on
                log.error("engine step failed (%s: %s); ending %d request(s)", type(e).__name__,
                          " ".join(str(e).split())[:300], len(self.running) + len(newcomers))
                for req in [*self.running, *newcomers]:
                    self._finish(req, "error")
                self.running = []
                continue
            self.metrics.prompt_tokens.inc(sum(len(r.seq.prompt) for r in newcomers))
            if self.engine.decoded:
                self.metrics.batch.observe(self.engine.decoded)
            self.running += newcomers
            self._hand_out(time.monotonic())

    def _drop_cancelled(self) -> None:
        for req in [r for r in self.waiting if r.cancelled]:
            self.waiting.remove(req)
            self._finish(req, "cancelled")
        for req in [r for r in self.running if r.cancelled]:
            self._finish(req, "cancelled")
        self.running = [r for r in self.running if r.finish_reason is None]

    def _admit(self) -> list[Request]:
        new = []
        engine = self.engine
        while self.waiting and engine.free_rows and self.committed + self.waiting[0].blocks <= engine.total_blocks \
                and not self.stopping:
            req = self.waiting.popleft()
            engine.attach(req.seq)
            self.committed += req.blocks
            new.append(req)
        return new

    def _hand_out(self, now: float) -> None:
        """Each running request's new text after a step; finished ones leave the batch."""
        made = 0
        for req in self.running:
            seq = req.seq
            made += len(seq.tokens) - req.seen
            req.seen = len(seq.tokens)
            if req.last_token is None:
                self.metrics.ttft.observe(now - req.arrived)
            else:
                self.metrics.itl.observe(now - req.last_token)
            req.last_token = now
            by_token = seq.done and seq.finish_reason == "stop"  # the stop token is not text
            delta = req.text.feed(seq.tokens[:-1] if by_token else seq.tokens, final=seq.done)
            if req.text.stopped:
                seq.done = True
            if delta or seq.done:
                reason = None if not seq.done else "stop" if req.text.stopped else seq.finish_reason
                req.events.put_nowait((delta, reason))
                if reason:
                    self._finish(req, reason)
        self.metrics.tokens(made, now)
        self.running = [r for r in self.running if r.finish_reason is None]

    def _finish(self, req: Request, reason: str) -> None:
        req.finish_reason = reason
        if req.seq.row is not None:
            self.engine.release(req.seq)
            self.committed -= req.blocks
        self.metrics.finished.labels(reason).inc()
        if reason in ("cancelled", "error"):
            req.events.put_nowait(("", reason))
