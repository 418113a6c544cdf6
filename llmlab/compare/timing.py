"""Speeds, timed side by side: one process per contestant, turns alternating round-robin.

Every contestant (a preset of the comparison, or a benchmark's model) gets a process of its own
(its threads, compiled graphs and allocator untouched by the others). The parent starts them one
by one (each warms up: builds its models, compiles, runs one untimed round, then says "ready"),
then runs `rounds` rounds; in each, every process in turn times one round while the others wait
on their pipe. Background load therefore hits every contestant alike, and a result is the median
of the rounds with their min-max. The order of turns is recorded and returned.

One round of a contestant: `train_steps` training steps (forward, backward, AdamW: the step
train() runs) on a fixed batch of batch_size x block_size tokens, then, per context length C and
per decode variant, batch-1 greedy decoding through llmlab.stream of decode_steps tokens after a
prefill of C tokens. Variants (llmlab.compare.runtime says which apply):
    own            the rung's own path: recompute (basic, flash), cache, or paged kernel
    compiled       the cached one-token step through torch.compile (a rung that caches)
    decompressing  MLA without weight absorption: every cached latent is expanded into keys and
                   values at every step (the cost absorption removes)

Speed does not depend on the weights' values, so contestants are built from their config with
random weights; learned positions get a table as long as the longest context (one row is read per
token, so its length costs nothing at decode), so every rung is timed at every context.

    python -m llmlab.compare.timing SPEC.json   (the contestant's process: a line in, a JSON line out)
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Optional

RECOMPUTE_STEPS = 1  # a recomputing rung runs the whole context for each token: one says enough
VARIANTS = ("own", "compiled", "decompressing")


@dataclass
class Contestant:
    name: str
    config: dict[str, Any]  # a ModelConfig's fields
    contexts: list[int]
    decode_steps: int = 16
    batch_size: int = 8
    train_steps: int = 3  # 0: no training timing
    variants: Optional[list[str]] = None  # None: every variant that applies
    compile: bool = True
    threads: int = 1
    seed: int = 0
    device: str = "cpu"


# ---- the contestant's process ---------------------------------------------------------------------
class Bench:
    """A contestant's models, inputs and timed round."""

    def __init__(self, c: Contestant):
        import torch

        from llmlab.compare.runtime import DENSE, NONE, build, cache_kind, set_absorbed

        self.c = c
        torch.manual_seed(c.seed)
        self.train_model = build(c.config).to(c.device)
        longest = max(c.contexts) + c.decode_steps + 1
        limit = self.train_model.pos.max_positions
        self.model = self.train_model if limit is None or limit >= longest else \
            build(c.config | {"block_size": longest}).to(c.device)
        self.model.eval()
        # RoPE/sinusoidal tables at their longest from the start: a table grown between contexts
        # would make the compiled step recompile mid-timing (its graph is guarded on the table's size)
        self.model.pos.ensure_length(longest)
        self.kind = cache_kind(self.model)
        self.has_mla = set_absorbed(self.model, True)
        gen = torch.Generator().manual_seed(c.seed + 1)
        v, t = c.config["vocab_size"], c.config["block_size"]
        self.ids = {n: torch.randint(0, v, (1, n), generator=gen).to(c.device) for n in c.contexts}
        self.batch = (torch.randint(0, v, (c.batch_size, t), generator=gen).to(c.device),
                      torch.randint(0, v, (c.batch_size, t), generator=gen).to(c.device))
        steps = RECOMPUTE_STEPS if self.kind == NONE else c.decode_steps
        applies = {"own": True, "compiled": c.compile and self.kind != NONE,
                   "decompressing": self.has_mla and self.kind == DENSE}
        wanted = c.variants or list(VARIANTS)
        self.variants = {name: (dict(compile=True) if name == "compiled" else {}, steps)
                         for name in wanted if applies.get(name)}
        self.set_absorbed = set_absorbed
        self.step = None
        if c.train_steps:
            from llmlab.training.step import StepConfig, TrainStep, make_optimizer

            opt = make_optimizer(self.train_model, 0.1, (0.9, 0.99), 1e-5)
            self.step = TrainStep(self.train_model, opt, StepConfig(device=c.device))

    def round(self) -> dict[str, Any]:
        import time

        from llmlab.bench import _sync, stream_timed

        out: dict[str, Any] = {"decode": {name: {} for name in self.variants}}
        if self.step is not None:
            import torch

            self.train_model.train()
            dev = torch.device(self.c.device)
            _sync(dev)
            t0 = time.perf_counter()
            for _ in range(self.c.train_steps):
                self.step(lambda: self.batch, 1e-5)
            _sync(dev)
            out["train_tokens_per_s"] = self.c.train_steps * self.batch[0].numel() / (time.perf_counter() - t0)
            self.train_model.eval()
        for n, ids in self.ids.items():
            for name, (kw, steps) in self.variants.items():
                self.set_absorbed(self.model, name != "decompressing")
                _, dec, _ = stream_timed(self.model, ids, steps, **kw)
                out["decode"][name][str(n)] = steps / dec
        self.set_absorbed(self.model, True)
        return out


def main(argv: list[str]) -> int:
    from llmlab.compare.proc import die_with_parent

    die_with_parent()
    # the pipe carries only this protocol: anything else printed (warnings, compile logs) goes to stderr
    proto = os.fdopen(os.dup(sys.stdout.fileno()), "w")
    sys.stdout = sys.stderr
    import torch

    c = Contestant(**json.loads(Path(argv[0]).read_text()))
    if c.threads > 0:
        torch.set_num_threads(c.threads)
    bench = Bench(c)
    bench.round()  # warm-up: first calls, allocations, compiling; not counted
    say = lambda obj: (proto.write(json.dumps(obj) + "\n"), proto.flush())  # noqa: E731
    from llmlab.bench import cache_bytes_entry

    say({"ready": True, "variants": list(bench.variants), "cache_kind": bench.kind,
         "params": bench.train_model.num_params(),
         "cache_bytes_per_token": cache_bytes_entry(c.name, bench.model)["measured"]})
    trim()
    for line in sys.stdin:
        if line.strip() != "round":
            break
        say(bench.round())
        trim()
    return 0


def trim() -> None:
    """Give freed memory back to the OS while this process waits for its turn: a long prefill
    allocates hundreds of MB once, and glibc would keep them, times one process per contestant."""
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):  # not glibc (musl): nothing to trim
            pass


# ---- the parent ------------------------------------------------------------------------------------
def _tail(path: Path) -> str:
    try:
        lines = [ln.strip() for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        lines = []
    return lines[-1][:300] if lines else "the timing process ended without a reason"


class _Proc:
    def __init__(self, c: Contestant, folder: Path):
        from llmlab.compare.proc import spawn
        from llmlab.fsutil import atomic_write_json

        self.name, self.log = c.name, folder / f"{c.name}.log"
        spec = folder / f"{c.name}.json"
        atomic_write_json(spec, asdict(c))
        self.fh = open(self.log, "w")
        self.p = spawn("llmlab.compare.timing", str(spec), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                       stderr=self.fh)
        self.error: Optional[str] = None

    def ask(self, line: Optional[str]) -> Optional[dict[str, Any]]:
        """Send a line (None: only read) and read the JSON answer; None (and .error) if the process died."""
        try:
            if line is not None:
                self.p.stdin.write(line + "\n")
                self.p.stdin.flush()
            answer = self.p.stdout.readline()
            if answer:
                return json.loads(answer)
        except (OSError, ValueError):
            pass
        self.p.wait()
        self.fh.flush()
        self.error = _tail(self.log)
        return None

    def close(self) -> None:
        if self.p.poll() is None:
            try:
                self.p.stdin.close()
                self.p.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                self.p.kill()
                self.p.wait()
        self.fh.close()


def time_round_robin(contestants: list[Contestant], rounds: int, folder: Path,
                     progress: Callable[[str], None] = lambda msg: None) -> dict[str, Any]:
    """Time every contestant `rounds` times, round-robin. Returns {"order": [[round, name], ...],
    "entries": {name: {"ready": {...}, "rounds": [round result, ...], "error": None or one line}}}."""
    folder.mkdir(parents=True, exist_ok=True)
    procs: list[_Proc] = []
    result: dict[str, Any] = {"order": [], "entries": {}}
    try:
        for c in contestants:  # one warm-up at a time: compiling is heavy, and nothing is timed yet
            progress(f"timing: warming up {c.name}")
            p = _Proc(c, folder)
            procs.append(p)
            ready = p.ask(None)
            result["entries"][c.name] = {"ready": ready, "rounds": [], "error": p.error}
        for r in range(rounds):
            for p in procs:
                if p.error is not None:
                    continue
                progress(f"timing: round {r + 1}/{rounds}, {p.name}")
                answer = p.ask("round")
                entry = result["entries"][p.name]
                if answer is None:
                    entry["error"] = p.error
                    continue
                entry["rounds"].append(answer)
                result["order"].append([r, p.name])
    finally:
        for p in procs:
            p.close()
    return result


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
