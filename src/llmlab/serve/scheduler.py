"""Continuous batching (Orca's iteration-level scheduling over vLLM's paged cache), in the engine
process (llmlab.serve.core).

Between two steps the scheduler drops aborted requests (the client went away, a stop string ended
the text), releases finished ones' rows and blocks, and admits waiting requests (first come, first
served) while a row is free and the pool can hold what each may ever need; then one step prefills
the newcomers (their first tokens go out at once, so the time to the first token holds no decode)
and decodes every running sequence once. Plain Python, no threads, no I/O: `emit` is the only way
out, so the whole policy is tested in-process.

Admission reserves a request's worst case (prompt + max_tokens, in blocks) against the pool, so
a running request never waits for a block and nothing is ever preempted; blocks are still taken
from the pool only as the sequence grows, and /metrics shows the pool's real free blocks.
"""
from __future__ import annotations

import logging
from collections import deque
from typing import Callable, NamedTuple, Optional

from llmlab.serve.engine import Engine, Sequence

log = logging.getLogger("llmlab.serve")


class Output(NamedTuple):
    """A request's new tokens after a step; `reason` once it ends: stop (a stop id, the last of
    `tokens`), length (max_tokens) or error (the model failed)."""
    ident: int
    tokens: list[int]
    reason: Optional[str]


Emit = Callable[[list[Output], int], None]  # (outputs, sequences decoded: 0 after a prefill)


class Scheduler:
    def __init__(self, engine: Engine):
        self.engine = engine
        self.waiting: deque[tuple[int, Sequence, int]] = deque()  # (ident, sequence, blocks reserved)
        self.running: dict[int, tuple[Sequence, int]] = {}  # in admission order
        self.committed = 0  # blocks reserved by running requests

    @property
    def busy(self) -> bool:
        return bool(self.waiting or self.running)

    def blocks_needed(self, seq: Sequence) -> int:
        return self.engine.blocks_for(len(seq.prompt) + seq.max_tokens)

    def add(self, ident: int, seq: Sequence) -> None:
        """Queue a request (the HTTP side checked it fits the pool and the queue)."""
        self.waiting.append((ident, seq, self.blocks_needed(seq)))

    def abort(self, ident: int) -> None:
        """Drop a request, waiting or running (its row and blocks go back); unknown ids are ignored:
        it may have finished meanwhile."""
        if ident in self.running:
            self._release(ident)
        else:
            self.waiting = deque(w for w in self.waiting if w[0] != ident)

    def abort_all(self) -> None:
        self.waiting.clear()
        for ident in list(self.running):
            self._release(ident)

    def _release(self, ident: int) -> None:
        seq, blocks = self.running.pop(ident)
        self.engine.release(seq)
        self.committed -= blocks

    def _admit(self) -> list[tuple[int, Sequence]]:
        new, engine = [], self.engine
        while self.waiting and engine.free_rows and self.committed + self.waiting[0][2] <= engine.total_blocks:
            ident, seq, blocks = self.waiting.popleft()
            engine.attach(seq)
            self.committed += blocks
            self.running[ident] = (seq, blocks)
            new.append((ident, seq))
        return new

    def step(self, emit: Emit) -> None:
        """Admit, prefill the newcomers (emitting their first tokens), decode the rest of the batch
        (emitting one token each), release what finished."""
        newcomers = self._admit()
        try:
            if newcomers:
                self.engine.prefill([seq for _, seq in newcomers])
                self._emit(emit, newcomers, 0)
            decoding = [(ident, seq) for ident, (seq, _) in self.running.items() if not seq.done]
            self.engine.decode([seq for _, seq in decoding])
            self._emit(emit, decoding, len(decoding))
        except Exception as e:  # noqa: BLE001 - the model failed: those requests end, the server goes on
            log.error("engine step failed (%s: %s); ending %d request(s)", type(e).__name__,
                      " ".join(str(e).split())[:300], len(self.running))
            failed = list(self.running)
            self.abort_all()
            emit([Output(ident, [], "error") for ident in failed], 0)

    def _emit(self, emit: Emit, seqs: list[tuple[int, Sequence]], decoded: int) -> None:
        """Each sequence's token of this step; the finished ones leave the batch."""
        out = []
        for ident, seq in seqs:
            out.append(Output(ident, seq.tokens[-1:], seq.finish_reason if seq.done else None))
            if seq.done:
                self._release(ident)
        if out:
            emit(out, decoded)
