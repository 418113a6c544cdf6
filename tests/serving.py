"""Helpers of the serve tests: a tiny run on disk, and `llmlab serve` started in a process of its
own on 127.0.0.1 (a free port), waited for with a deadline, stopped by its PID."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Optional

import torch

START_TIMEOUT_S = 90  # importing torch + FastAPI on a busy 2-core machine
STOP_TIMEOUT_S = 30


def tiny_run(directory: Path, seed: int = 0, block_size: int = 128) -> Path:
    """A llama-shaped model of random weights with the byte tokenizer (any text encodes)."""
    from llmlab.checkpoint import save_checkpoint
    from llmlab.model import Transformer
    from llmlab.presets import preset_config
    from llmlab.runtime import Runtime
    from llmlab.tokenizer import ByteTokenizer

    torch.manual_seed(seed)
    config = preset_config("llama", vocab_size=256, block_size=block_size, n_layer=2, n_head=4, n_embd=64)
    save_checkpoint(directory, Transformer(config, Runtime(cache="paged", block_size=16)), ByteTokenizer())
    return directory


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`python -m llmlab serve RUN --port P *flags`, its output in `log`; `url` once /health answers."""

    def __init__(self, run: Path, *flags: str, log: Path, env: Optional[dict] = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        cmd = [sys.executable, "-m", "llmlab", "serve", str(run), "--port", str(self.port), *flags]
        full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
        with open(log, "wb") as fh:
            self.proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=full_env)
        self._wait_ready()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        last: object = "no answer"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"llmlab serve exited with {self.proc.returncode}:\n{self.output()}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return
                    last = f"/health answered {r.status}"
            except (urllib.error.URLError, ConnectionError, TimeoutError) as e:
                last = e  # not listening yet; said below if it never does
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"llmlab serve did not answer /health within {START_TIMEOUT_S} s (last: {last}):\n"
                           f"{self.output()}")

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def metrics(self, headers: Optional[dict] = None) -> dict[str, float]:
        """/metrics as {sample name with labels: value}, parsed by prometheus_client's parser."""
        from prometheus_client.parser import text_string_to_metric_families

        req = urllib.request.Request(self.url + "/metrics", headers=headers or {})
        with urllib.request.urlopen(req, timeout=10) as r:
            text = r.read().decode()
        out = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
                out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
        return out

    def wait_metric(self, name: str, value: float, timeout: float = 15.0) -> dict[str, float]:
        deadline = time.monotonic() + timeout
        while True:
            m = self.metrics()
            if m.get(name) == value or time.monotonic() > deadline:
                return m
            time.sleep(0.05)

    def stop(self, sig: int = signal.SIGTERM) -> int:
        """Signal the server by its PID and wait for it (killed past STOP_TIMEOUT_S): its exit status."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, sig)
            try:
                self.proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(STOP_TIMEOUT_S)
        return self.proc.returncode


def post(url: str, body, headers: Optional[dict] = None, timeout: float = 60.0) -> tuple[int, dict, dict]:
    """(status, JSON body, headers with lower-case names) of a POST with a raw body (bytes) or a JSON-able object."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read() or b"null"), {k.lower(): v for k, v in r.headers.items()}
    except urllib.error.HTTPError as e:
        raw = e.read()
        try:
            parsed = json.loads(raw)
        except ValueError:
            parsed = {"raw": raw.decode(errors="replace")}
        return e.code, parsed, {k.lower(): v for k, v in e.headers.items()}
