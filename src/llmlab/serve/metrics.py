"""Prometheus metrics of one server (prometheus_client, a registry of its own): requests running
and waiting, free cache blocks, tokens, tokens/s over the last 10 s, and histograms of the time to
the first token, between tokens and of how many sequences each decode step carried."""
from __future__ import annotations

import time
from collections import deque

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
RATE_WINDOW_S = 10.0


class Metrics:
    def __init__(self, client):
        """`client`: the EngineClient; the engine's counts are the last ones it sent."""
        self.registry = r = CollectorRegistry()
        c = client
        Gauge("llmlab_requests_running", "requests in the running batch", registry=r).set_function(
            lambda: c.stats.running)
        Gauge("llmlab_requests_waiting", "requests queued for a cache row", registry=r).set_function(
            lambda: c.stats.waiting)
        Gauge("llmlab_cache_free_blocks", "free blocks of the paged cache", registry=r).set_function(
            lambda: c.stats.free_blocks)
        Gauge("llmlab_cache_blocks", "blocks of the paged cache", registry=r).set(c.total_blocks)
        Gauge("llmlab_generation_tokens_per_second", f"tokens generated per second over the last {RATE_WINDOW_S:g} s",
              registry=r).set_function(self.tokens_per_s)
        self.prompt_tokens = Counter("llmlab_prompt_tokens", "prompt tokens prefilled", registry=r)
        self.generated_tokens = Counter("llmlab_generation_tokens", "tokens generated", registry=r)
        self.finished = Counter("llmlab_requests_finished", "requests finished, by reason", ["reason"], registry=r)
        self.rejected = Counter("llmlab_requests_rejected", "requests refused before running, by HTTP status",
                                ["status"], registry=r)
        self.ttft = Histogram("llmlab_time_to_first_token_seconds", "arrival to first generated token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("llmlab_inter_token_latency_seconds", "time between a request's tokens",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.batch = Histogram("llmlab_decode_batch_size", "sequences decoded together per step",
                               buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=r)
        self._recent: deque[tuple[float, int]] = deque()  # (time, tokens) per step

    def tokens(self, n: int, now: float) -> None:
        self.generated_tokens.inc(n)
        self._recent.append((now, n))
        self._trim(now)

    def _trim(self, now: float) -> None:
        while self._recent and self._recent[0][0] < now - RATE_WINDOW_S:
            self._recent.popleft()

    def tokens_per_s(self) -> float:
        now = time.monotonic()
        self._trim(now)
        return sum(n for _, n in self._recent) / RATE_WINDOW_S

    def text(self) -> bytes:
        return generate_latest(self.registry)
