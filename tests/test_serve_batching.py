"""Continuous batching seen from outside: no lost or mixed tokens (32 concurrent streams, each equal
to the same request served alone), seeded sampling alone = in a batch, cancellation frees blocks,
admission waits for blocks, a full queue is a 429, the API key, SIGTERM drains and exits 0."""
from __future__ import annotations

import http.client
import json
import os
import signal
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from serving import Server, post, tiny_run

pytest.importorskip("fastapi", reason="llmlab serve needs the serve extra: pip install -e '.[serve]'")


def stream(url: str, body: dict, timeout: float = 120) -> tuple[str, str, list[str]]:
    """(text, finish_reason, raw events) of one streamed completion, read line by line."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    conn.request("POST", "/v1/completions", json.dumps({**body, "stream": True}),
                 {"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200, resp.read()
    text, reason, events = [], None, []
    for line in resp:
        line = line.decode().strip()
        if not line.startswith("data: "):
            continue
        events.append(line[6:])
        if line == "data: [DONE]":
            break
        choice = json.loads(line[6:])["choices"][0]
        text.append(choice["text"])
        reason = choice["finish_reason"] or reason
    conn.close()
    return "".join(text), reason, events


def requests(n: int, seed: int = 0, **extra) -> list[dict]:
    """n prompts of different lengths (2..~90 bytes, across cache blocks) and max_tokens (3..~40)."""
    words = "the of and to in is was he for it with as his on be at by had are but from".split()
    out = []
    for i in range(n):
        prompt = " ".join(words[(i * 7 + k + seed) % len(words)] for k in range(1 + (i * 5) % 17))
        out.append({"model": "r", "prompt": prompt, "max_tokens": 3 + (i * 11) % 38, "temperature": 0, **extra})
    return out


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    base = tmp_path_factory.mktemp("serve-batch")
    run = tiny_run(base / "r", block_size=1024)  # long enough for a stream still running when dropped
    s = Server(run, "--max-batch", "8", "--block-size", "16", log=base / "server.log")
    yield s
    assert s.stop() == 0, s.output()
    assert "Traceback" not in s.output()


@pytest.mark.slow
def test_32_concurrent_greedy_streams_each_equal_it_served_alone(server):
    reqs = requests(32)
    alone = [stream(server.url, r) for r in reqs]
    m0 = server.metrics()
    with ThreadPoolExecutor(32) as pool:
        together = list(pool.map(lambda r: stream(server.url, r), reqs))
    for r, a, t in zip(reqs, alone, together):
        assert t[:2] == a[:2], r
        assert a[1] == "length" and a[2][-1] == "[DONE]"
    m = server.metrics()  # they ran batched: mostly full batches of 8 rows
    steps, seqs = (m[f"llmlab_decode_batch_size_{k}"] - m0[f"llmlab_decode_batch_size_{k}"] for k in ("count", "sum"))
    assert seqs == sum(r["max_tokens"] - 1 for r in reqs)  # the first token of each comes from its prefill
    assert seqs > 4 * steps, (seqs, steps)
    assert m["llmlab_cache_free_blocks"] == m["llmlab_cache_blocks"]


def test_seeded_sampling_is_the_same_alone_and_in_a_batch(server):
    reqs = requests(10, seed=3, temperature=1.0, top_k=50, top_p=0.9)
    for i, r in enumerate(reqs):
        r["seed"] = 1000 + i
    alone = [stream(server.url, r)[0] for r in reqs]
    with ThreadPoolExecutor(10) as pool:
        together = list(pool.map(lambda r: stream(server.url, r)[0], reqs))
    assert together == alone
    assert stream(server.url, {**reqs[0], "seed": 7})[0] != alone[0]  # the seed matters


def test_a_client_that_disconnects_is_cancelled_and_its_blocks_freed(server):
    start = server.metrics()
    assert start["llmlab_cache_free_blocks"] == start["llmlab_cache_blocks"]
    host, port = server.url.removeprefix("http://").split(":")
    conns = []
    for i in range(3):  # long streams, each read for a few events, then dropped
        conn = http.client.HTTPConnection(host, int(port), timeout=30)
        conn.request("POST", "/v1/completions", json.dumps({"model": "r", "prompt": "x" * (20 + 30 * i),
                                                           "max_tokens": 900, "stream": True, "temperature": 0}),
                     {"Content-Type": "application/json"})
        resp = conn.getresponse()
        for _ in range(3):
            resp.readline()
        conns.append((conn, resp))
    busy = server.metrics()
    assert busy["llmlab_cache_free_blocks"] < start["llmlab_cache_free_blocks"]
    assert busy["llmlab_requests_running"] == 3
    for conn, resp in conns:
        resp.close()
        conn.close()
    end = server.wait_metric("llmlab_cache_free_blocks", start["llmlab_cache_free_blocks"])
    assert end["llmlab_cache_free_blocks"] == start["llmlab_cache_free_blocks"]
    assert end["llmlab_requests_running"] == 0
    assert end["llmlab_requests_finished_total{reason=cancelled}"] >= 3
    # a non-streamed request whose client gives up is cancelled too
    with pytest.raises(TimeoutError):
        post(server.url + "/v1/completions", {"model": "r", "prompt": "y", "max_tokens": 900, "temperature": 0},
             timeout=0.3)
    end = server.wait_metric("llmlab_requests_running", 0)
    assert end["llmlab_requests_finished_total{reason=cancelled}"] >= 4
    assert end["llmlab_cache_free_blocks"] == start["llmlab_cache_free_blocks"]


def test_admission_waits_for_blocks_and_a_full_queue_is_429(tmp_path):
    """A pool of 60 blocks of 16: a request needing 40 blocks runs, the next (40 more) waits although
    a row is free, a third fills the queue (--max-queue 1), a fourth is a 429 with Retry-After.
    Each runs for seconds (600 tokens), so the waiting is seen whatever the machine's speed."""
    run = tiny_run(tmp_path / "r", block_size=1024)
    s = Server(run, "--max-batch", "4", "--max-queue", "1", "--block-size", "16", "--cache-blocks", "60",
               log=tmp_path / "server.log")
    try:
        long = {"model": "r", "prompt": "a" * 30, "max_tokens": 600, "temperature": 0}  # 630 tokens: 40 blocks
        status, out, _ = post(s.url + "/v1/completions", {**long, "max_tokens": 994})  # 1024 tokens: 64 blocks
        assert status == 400 and "need 64 cache blocks; the server's pool has 60" in out["error"]["message"]
        results = {}
        first = threading.Thread(target=lambda: results.setdefault("a", stream(s.url, long)))
        first.start()
        s.wait_metric("llmlab_requests_running", 1)
        second = threading.Thread(target=lambda: results.setdefault("b", stream(s.url, long)))
        second.start()
        m = s.wait_metric("llmlab_requests_waiting", 1)
        assert (m["llmlab_requests_running"], m["llmlab_requests_waiting"]) == (1, 1)
        status, out, headers = post(s.url + "/v1/completions", long)
        assert status == 429 and headers["retry-after"] == "1" and out["error"]["type"] == "rate_limit_error"
        first.join(120)
        second.join(120)
        assert results["a"][:2] == results["b"][:2] and results["a"][1] == "length"
    finally:
        assert s.stop() == 0, s.output()


def test_the_api_key_guards_every_endpoint_but_health_and_the_page(tmp_path):
    run = tiny_run(tmp_path / "r")
    s = Server(run, log=tmp_path / "server.log", env={"LLMLAB_API_KEY": "sesame"})
    body = {"model": "r", "prompt": "a", "max_tokens": 2}
    try:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sesame"}):
            status, out, _ = post(s.url + "/v1/completions", body, headers)
            assert status == 401 and out["error"]["code"] == "invalid_api_key", headers
        assert post(s.url + "/v1/completions", body, {"Authorization": "Bearer sesame"})[0] == 200
        for path in ("/v1/models", "/metrics"):
            with pytest.raises(urllib.error.HTTPError, match="401"):
                urllib.request.urlopen(s.url + path, timeout=10)
        assert s.metrics({"Authorization": "Bearer sesame"})["llmlab_requests_running"] == 0
        for path in ("/health", "/"):
            with urllib.request.urlopen(s.url + path, timeout=10) as r:
                assert r.status == 200
    finally:
        assert s.stop() == 0


def test_sigterm_finishes_the_streams_in_flight_refuses_new_ones_and_exits_0(tmp_path):
    run = tiny_run(tmp_path / "r", block_size=1024)
    s = Server(run, log=tmp_path / "server.log")
    body = {"model": "r", "prompt": "drain", "max_tokens": 600, "temperature": 0}  # seconds of streaming
    want = stream(s.url, body)
    results = {}
    t = threading.Thread(target=lambda: results.setdefault("in flight", stream(s.url, body)))
    t.start()
    assert s.wait_metric("llmlab_requests_running", 1)["llmlab_requests_running"] == 1
    # a request whose headers arrive before SIGTERM and whose body after it: uvicorn keeps a
    # connection with a request under way, so this one is answered inside the drain, with a 503
    late = json.dumps(body).encode()
    conn = http.client.HTTPConnection("127.0.0.1", s.port, timeout=30)
    conn.putrequest("POST", "/v1/completions")
    conn.putheader("Content-Type", "application/json")
    conn.putheader("Content-Length", str(len(late)))
    conn.endheaders()
    time.sleep(0.5)  # the server has read the headers
    s.proc.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    conn.send(late)
    resp = conn.getresponse()
    assert resp.status == 503 and json.loads(resp.read())["error"]["code"] == "shutting_down"
    conn.close()
    # a new connection: refused once the listener is closed; until then, a 503 and never served
    deadline = time.monotonic() + 10
    while True:
        try:
            status = post(s.url + "/v1/completions", body, timeout=5)[0]
        except urllib.error.URLError as e:
            assert isinstance(e.reason, ConnectionRefusedError), e
            break
        except ConnectionRefusedError:
            break
        assert status == 503 and time.monotonic() < deadline
        time.sleep(0.1)
    t.join(60)
    got = results["in flight"]
    assert got[:2] == want[:2] and got[1] == "length" and got[2][-1] == "[DONE]"  # finished whole
    assert s.proc.wait(30) == 0
    assert "Traceback" not in s.output()


def _engines(pid: int) -> list[int]:
    """PIDs of the multiprocessing children `pid` spawned (Linux /proc; multiprocessing's resource
    tracker, a child too, is left out)."""
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                stat = open(f"/proc/{d}/stat").read()
                cmdline = open(f"/proc/{d}/cmdline", "rb").read()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid and b"spawn_main" in cmdline:
                out.append(int(d))
    return out


def _gone(pid: int, timeout: float) -> bool:
    """Whether `pid` ended (or is a zombie nobody reaps) within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] == "Z":
                return True
        except OSError:
            return True
        time.sleep(0.1)
    return False


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="reads processes from Linux's /proc")
def test_the_engine_process_ends_with_the_server_even_when_it_is_killed(tmp_path):
    """The model runs in a child process of the server's; SIGKILL of the server (no drain, no
    goodbye) ends it too: the pipe's end is its signal, no orphan keeps the model's memory."""
    s = Server(tiny_run(tmp_path / "r"), log=tmp_path / "server.log")
    try:
        engines = _engines(s.proc.pid)
        assert len(engines) == 1, engines
        assert post(s.url + "/v1/completions", {"model": "r", "prompt": "a", "max_tokens": 3})[0] == 200
    finally:
        s.stop(signal.SIGKILL)
    assert _gone(engines[0], 20)


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="reads processes from Linux's /proc")
def test_an_engine_that_dies_ends_its_streams_with_an_error_and_health_says_so(tmp_path):
    run = tiny_run(tmp_path / "r", block_size=1024)
    s = Server(run, log=tmp_path / "server.log")
    try:
        (engine,) = _engines(s.proc.pid)
        conn = http.client.HTTPConnection("127.0.0.1", s.port, timeout=30)
        conn.request("POST", "/v1/completions", json.dumps({"model": "r", "prompt": "x", "max_tokens": 900,
                                                           "stream": True, "temperature": 0}),
                     {"Content-Type": "application/json"})
        resp = conn.getresponse()
        assert resp.readline().startswith(b"data: {")  # streaming
        os.kill(engine, signal.SIGKILL)
        events = [line[6:].strip() for line in resp if line.startswith(b"data: ")]  # to the stream's end
        assert json.loads(events[-2])["error"]["type"] == "server_error" and events[-1] == b"[DONE]"
        conn.close()
        with pytest.raises(urllib.error.HTTPError, match="503"):
            urllib.request.urlopen(s.url + "/health", timeout=10)
        status, out, _ = post(s.url + "/v1/completions", {"model": "r", "prompt": "a", "max_tokens": 3})
        assert status == 503 and "engine stopped" in out["error"]["message"]
    finally:
        assert s.stop() == 0, s.output()
    assert "the engine process stopped" in s.output() and "Traceback" not in s.output()


@pytest.mark.slow
def test_the_load_benchmark_runs_and_the_server_replies_are_generates(tmp_path):
    """benchmarks/serve_load.py at a tiny size: the server (running rows) against llmlab.generate
    and the engine alone; its last line is JSON with every contestant, and its table says each
    server reply was llmlab.generate's greedy text."""
    import subprocess
    import sys

    from conftest import REPO

    pytest.importorskip("transformers", reason="the benchmark shares its weights with transformers: pip install -e '.[hf]'")
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "serve_load.py"), "--requests", "4",
                           "--new-tokens", "8", "--clients", "1,2", "--rounds", "1", "--modes", "rows", "--no-hf"],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    results = json.loads(lines[-1])["results"]
    assert set(results) == {"serve (rows), 1 client", "serve (rows), 2 clients", "llmlab.generate(), one at a time",
                            "engine alone (rows), 1 client", "engine alone (rows), 2 clients"}
    assert all(r["tokens"] == 4 * 8 for r in results.values())
    served = [line for line in lines if line.startswith("| serve (rows)")]
    assert len(served) == 2 and all(line.split("|")[6].strip() == "True" for line in served), served
