"""The engine process (vLLM's engine core): the model, its paged cache and the scheduler, in a
process of their own beside the HTTP server's.

Why a process. Python runs one thread at a time per process: with the engine on a thread of the
server's process, every token's server-sent event (about 0.2-0.3 ms of the event loop's work)
took turns with the model on the interpreter lock, and 16 streaming clients held the server near
one core. Here the model steps back to back on its own interpreter and never waits for HTTP; the
server process turns tokens into text and events meanwhile, on another core.

The two talk over one private pipe (multiprocessing's Connection: its own child, pickled Python
objects; no file and no socket anyone else can reach):
  server -> engine  ("add", ident, Sequence) | ("abort", ident) | ("stop",)
  engine -> server  ("ready", Loaded) or ("error", message) once at start, then
                    ("out", [Output, ...], Stats) after each prefill and each decode (and after
                    messages that changed the queue, so /metrics sees an abort's freed blocks)
The engine process ignores SIGINT and SIGTERM: the server drains and then says "stop"; if the
server dies, the pipe's end ends the engine.
"""
from __future__ import annotations

import logging
import signal
from dataclasses import dataclass
from typing import NamedTuple, Optional

from llmlab.errors import LlmlabError
from llmlab.serve.args import ServeArgs
from llmlab.serve.scheduler import Output, Scheduler

log = logging.getLogger("llmlab.serve")


class Stats(NamedTuple):
    running: int
    waiting: int
    free_blocks: int
    decoded: int  # sequences in the last decode forward (0 for a prefill or no step)


@dataclass
class Loaded:
    """What the server needs of the loaded model, sent once the engine is ready."""
    tokenizer: object
    stop_ids: frozenset
    folder: str
    about: str
    max_len: int
    vocab_size: int
    block_size: int
    total_blocks: int
    rows: int


def main(conn, path_or_run: str, args: ServeArgs, runtime: Optional[dict]) -> None:
    """The engine process's entry (multiprocessing, spawn): load, say ready, serve until told to stop."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group: the server decides
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(format="%(levelname)s:     %(message)s")
    from llmlab.threads import use_free_cores

    use_free_cores(leave=1)  # the server's process streams the tokens on a core of its own
    try:
        from llmlab.serve.loading import load_engine

        engine, tok, stops, folder, about = load_engine(path_or_run, args, runtime)
    except (LlmlabError, OSError) as e:  # one line, said by the server
        conn.send(("error", f"{type(e).__name__}: {e}" if isinstance(e, OSError) else str(e)))
        return
    except BaseException as e:  # noqa: BLE001 - an unexpected failure: its traceback here, a line there
        conn.send(("error", f"the engine failed to start ({type(e).__name__}: {e})"))
        raise
    conn.send(("ready", Loaded(tok, frozenset(stops), str(folder), about, engine.max_len,
                               engine.model.config.vocab_size, engine.block_size, engine.total_blocks,
                               engine.max_batch)))
    Core(Scheduler(engine), conn).run()


class Core:
    def __init__(self, scheduler: Scheduler, conn):
        self.scheduler, self.conn = scheduler, conn

    def run(self) -> None:
        sched = self.scheduler
        while True:
            try:
                # idle: sleep until the server writes; busy: take what arrived and step on
                changed = self._receive(block=not sched.busy)
            except _Stop:
                sched.abort_all()
                return
            if sched.busy:
                sched.step(self._send)
            elif changed:
                self._send([])

    def _receive(self, block: bool) -> bool:
        """Apply every waiting message (waiting for one when `block`); whether any arrived."""
        changed = False
        try:
            while self.conn.poll(None if block and not changed else 0):
                msg = self.conn.recv()
                changed = True
                if msg[0] == "add":
                    self.scheduler.add(msg[1], msg[2])
                elif msg[0] == "abort":
                    self.scheduler.abort(msg[1])
                else:
                    raise _Stop
        except (EOFError, OSError):  # the server is gone
            raise _Stop from None
        return changed

    def _send(self, outputs: list[Output], decoded: int = 0) -> None:
        s = self.scheduler
        stats = Stats(len(s.running), len(s.waiting), s.engine.cache.num_free_blocks, decoded)
        try:
            self.conn.send(("out", outputs, stats))
        except OSError:  # the server is gone; the next receive ends the loop
            pass


class _Stop(Exception):
    pass
