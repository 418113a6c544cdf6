"""Load test of `llmlab serve`: aggregate generated tokens/s and p50/p99 time-to-first-token and
inter-token latency with 1, 4, 16 and 32 concurrent streaming clients, against the same requests
sent one at a time (1 client), and against Hugging Face `generate` and `llmlab.generate` run per
request.

    python benchmarks/serve_load.py [--requests 64] [--new-tokens 128] [--prompt-lens 16,64]
        [--clients 1,4,16,32] [--max-batch 32] [--threads 1] [--rounds 2] [--modes invariant,rows] [--compile]
        [--no-hf] [--no-engine]

Model: the Llama shape of `llmlab bench decode` (4 layers, d_model 256, 8 heads, 2 KV heads,
SwiGLU 688, RoPE, vocab 512), random weights shared with a `transformers.LlamaForCausalLM`, and a
tokenizer of 512 one-character tokens (so each streamed character is one token). Requests: prompts
of random ids with lengths spread over --prompt-lens, greedy, exactly --new-tokens each.

Contestants, each in a process of its own, turns alternating round after round: the server with
every row decoded each step (`invariant`, the default) and with only the running rows decoded
(`rows`, --no-batch-invariant), each at every client count (a client sends its next request when
its stream ends; c clients share the request list); HF `generate()` and `llmlab.generate()` (the
dense cache, batch 1) one request at a time; and the engine alone: the server's scheduler and
engine driven in-process by the same closed-loop clients, no HTTP and no second process (running
rows decoded), which is as fast as the server could be on this machine. Every process gets
--threads torch threads (a server is two: its HTTP process and its engine process; the
load-generating client runs in this process beside them). For each: tokens/s over the whole
list, TTFT (request sent -> first token) and the gaps between a request's tokens, medians over
rounds of the per-round percentiles, and whether every reply is llmlab.generate's greedy text.
Prints a table and, last, a JSON line. Target: at 16 clients >= 6x the one-at-a-time tokens/s,
with p99 inter-token latency under 4x one client's.
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
SRC = HERE.parent / "src"  # runnable as a plain script, installed or not
if str(SRC) not in sys.path:
    sys.path.insert(0, str(SRC))


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=64, help="requests per measurement (default 64)")
    p.add_argument("--new-tokens", type=int, default=128, help="tokens generated per request (default 128)")
    p.add_argument("--prompt-lens", default="16,64", help="prompt lengths, lowest,highest (default 16,64)")
    p.add_argument("--clients", default="1,4,16,32", help="concurrent clients (default 1,4,16,32)")
    p.add_argument("--max-batch", type=int, default=32, help="server --max-batch (default 32)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per contestant (default 1)")
    p.add_argument("--rounds", type=int, default=2, help="rounds of turns (default 2)")
    p.add_argument("--modes", default="invariant,rows", help="server modes (default invariant,rows)")
    p.add_argument("--compile", action="store_true", help="servers and llmlab.generate with the compiled decode step")
    p.add_argument("--no-hf", dest="hf", action="store_false", help="skip HF generate")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-engine", dest="engine", action="store_false",
                   help="skip the engine alone (the scheduler in-process, no HTTP)")
    p.add_argument("--worker", choices=["hf", "generate", "engine"], help=argparse.SUPPRESS)
    p.add_argument("--dir", help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ---- the model, the requests -----------------------------------------------------------------
def prepare(directory: Path, max_len: int, seed: int) -> None:
    """The shared weights as an llmlab run (+ tokenizer) and an HF folder."""
    from llmlab.bench import VOCAB, build_models
    from llmlab.checkpoint import save_checkpoint
    from llmlab.tokenizer import CharTokenizer

    hf, model, shared, note = build_models("llama", max_len, True, seed)
    if not shared:
        raise SystemExit(f"cannot share weights with transformers: {note}")
    save_checkpoint(directory / "run", model, CharTokenizer("".join(chr(0x100 + i) for i in range(VOCAB))))
    hf.save_pretrained(directory / "hf")


def make_requests(n: int, lens: tuple[int, int], vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(vocab) for _ in range(rng.randint(*lens))] for _ in range(n)]


def summary(times: list[list[float]], starts: list[float], wall: float) -> dict:
    """tokens/s, TTFT and inter-token percentiles from each request's token arrival times."""
    ttft = [t[0] - s for t, s in zip(times, starts) if t]
    gaps = [b - a for t in times for a, b in zip(t, t[1:])]
    pct = lambda xs, q: statistics.quantiles(xs, n=100, method="inclusive")[q - 1] if len(xs) > 1 else xs[0]  # noqa: E731
    return {"tokens": sum(map(len, times)), "tokens_per_s": sum(map(len, times)) / wall,
            "ttft_p50": pct(ttft, 50), "ttft_p99": pct(ttft, 99), "itl_p50": pct(gaps, 50), "itl_p99": pct(gaps, 99)}


# ---- in-process workers: one request at a time ----------------------------------------------------
def engine_alone(directory: Path, spec: dict) -> int:
    """The engine process's loop without its process or any HTTP: llmlab.serve's Scheduler driven
    in-process by c closed-loop "clients" (a finished request is replaced by the next), decoding
    the running rows: what the server could reach on this machine."""
    import llmlab
    from llmlab.serve.engine import Engine, Sampling, Sequence
    from llmlab.serve.scheduler import Scheduler

    model = llmlab.load(directory / "run", runtime={"cache": "paged", "compile": spec["compile"]})
    reqs, new, max_len = spec["requests"], spec["new_tokens"], spec["max_len"]
    out = {}
    for c in spec["clients"]:
        sched = Scheduler(Engine(model, spec["max_batch"], max_len, batch_invariant=False))
        if spec["compile"]:
            sched.engine.warm_up()
        todo, starts, times = list(range(len(reqs))), {}, {i: [] for i in range(len(reqs))}

        def send(i: int) -> None:
            starts[i] = time.perf_counter()
            sched.add(i, Sequence(reqs[i], new, Sampling(0)))

        def emit(outputs, _decoded) -> None:
            now = time.perf_counter()
            for o in outputs:
                times[o.ident] += [now] * len(o.tokens)
                if o.reason and todo:
                    send(todo.pop(0))
        t0 = time.perf_counter()
        for _ in range(min(c, len(todo))):
            send(todo.pop(0))
        while sched.busy:
            sched.step(emit)
        wall = time.perf_counter() - t0
        out[str(c)] = summary([times[i] for i in range(len(reqs))], [starts[i] for i in range(len(reqs))], wall)
    print(json.dumps(out))
    return 0


def worker(kind: str, directory: Path) -> int:
    import torch

    spec = json.loads((directory / "requests.json").read_text())
    new = spec["new_tokens"]
    if kind == "engine":
        with torch.no_grad():
            return engine_alone(directory, spec)
    if kind == "hf":
        import transformers

        model = transformers.LlamaForCausalLM.from_pretrained(directory / "hf").eval()

        class Clock(transformers.generation.streamers.BaseStreamer):
            def __init__(self):
                self.times, self.prompt_seen = [], False

            def put(self, value):
                if self.prompt_seen:
                    self.times.extend([time.perf_counter()] * value.numel())
                self.prompt_seen = True

            def end(self):
                pass

        def run(ids):
            clock = Clock()
            x = torch.tensor([ids])
            model.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=new,
                           min_new_tokens=new, pad_token_id=0, streamer=clock)
            return clock.times, None
    else:
        import llmlab
        from llmlab.generation import stream

        model = llmlab.load(directory / "run", runtime={"cache": "dense"})

        def run(ids):
            times, out = [], []
            for tok in stream(model, [ids], new, temperature=0, compile=spec["compile"]):
                times.append(time.perf_counter())
                out.append(int(tok[0]))
            return times, out
    with torch.no_grad():
        run(spec["requests"][0])  # warm-up
        starts, times, outs = [], [], []
        t0 = time.perf_counter()
        for ids in spec["requests"]:
            starts.append(time.perf_counter())
            t, out = run(ids)
            times.append(t)
            outs.append(out)
        wall = time.perf_counter() - t0
    print(json.dumps({**summary(times, starts, wall), "outputs": outs}))
    return 0


def run_worker(kind: str, directory: Path, threads: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.run([sys.executable, __file__, "--worker", kind, "--dir", str(directory)],
                          capture_output=True, text=True, env=env, timeout=3600)
    if proc.returncode:
        raise SystemExit(f"{kind} worker failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---- the server and its clients ---------------------------------------------------------------
class Server:
    def __init__(self, directory: Path, mode: str, max_batch: int, max_len: int, threads: int, compile: bool):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        flags = ["--max-batch", str(max_batch), "--max-len", str(max_len), "--max-queue", "1000",
                 "--model-name", "m", "--port", str(self.port)] + (["--no-batch-invariant"] if mode == "rows" else []) \
            + (["--compile"] if compile else [])
        self.log = open(directory / f"server-{mode}.log", "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "llmlab", "serve", str(directory / "run"), *flags],
                                     stdout=self.log, stderr=subprocess.STDOUT,
                                     env={**os.environ, "OMP_NUM_THREADS": str(threads),
                                          "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])})
        deadline = time.monotonic() + 600  # compiling takes a while on a small CPU
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2)
                return
            except OSError:
                if self.proc.poll() is not None:
                    break
                time.sleep(0.3)
        self.stop()
        raise SystemExit(f"llmlab serve did not start; see {self.log.name}")

    def stream(self, ids: list[int], new: int) -> tuple[float, list[float], str]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=600)
        body = {"model": "m", "prompt": ids, "max_tokens": new, "temperature": 0, "stream": True}
        start = time.perf_counter()
        conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
        resp = conn.getresponse()
        times, text = [], []
        for line in resp:
            if line.startswith(b"data: {"):
                piece = json.loads(line[6:])["choices"][0]["text"]
                now = time.perf_counter()
                times.extend([now] * len(piece))  # one character per token
                text.append(piece)
            elif line.startswith(b"data: [DONE]"):
                break
        conn.close()
        return start, times, "".join(text)

    def measure(self, requests: list[list[int]], new: int, clients: int) -> dict:
        todo = list(enumerate(requests))
        results: dict[int, tuple] = {}
        lock = threading.Lock()

        def client():
            while True:
                with lock:
                    if not todo:
                        return
                    i, ids = todo.pop(0)
                results[i] = self.stream(ids, new)
        t0, cpu0 = time.perf_counter(), time.process_time()
        pool = [threading.Thread(target=client) for _ in range(clients)]
        for t in pool:
            t.start()
        for t in pool:
            t.join()
        wall = time.perf_counter() - t0
        ordered = [results[i] for i in range(len(requests))]
        out = summary([r[1] for r in ordered], [r[0] for r in ordered], wall)
        # the clients' own share of a core (they run on the same machine as the server)
        return {**out, "client_cpu": (time.process_time() - cpu0) / wall, "outputs": [r[2] for r in ordered]}

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(60)
        self.log.close()


# ---- the run ----------------------------------------------------------------------------------------
def main(argv=None) -> int:
    a = parse_args(argv)
    if a.worker:
        return worker(a.worker, Path(a.dir))
    from llmlab.bench import VOCAB

    lens = tuple(int(x) for x in a.prompt_lens.split(","))
    clients = [int(c) for c in a.clients.split(",")]
    modes = [m for m in a.modes.split(",") if m]
    max_len = lens[1] + a.new_tokens
    with tempfile.TemporaryDirectory(prefix="serve-load-") as tmp:
        d = Path(tmp)
        prepare(d, max_len, a.seed)
        requests = make_requests(a.requests, lens, VOCAB, a.seed)
        (d / "requests.json").write_text(json.dumps({"requests": requests, "new_tokens": a.new_tokens,
                                                     "compile": a.compile, "clients": clients,
                                                     "max_batch": a.max_batch, "max_len": max_len}))
        servers = {m: Server(d, m, a.max_batch, max_len, a.threads, a.compile) for m in modes}
        try:
            for s in servers.values():  # warm-up (first-call allocations)
                s.measure(requests[:2], 4, 2)
            rounds: dict[str, list[dict]] = {}
            for r in range(a.rounds):
                for mode, s in servers.items():
                    for c in clients:
                        rounds.setdefault(f"serve ({mode}), {c} client{'s' * (c > 1)}", []).append(
                            s.measure(requests, a.new_tokens, c))
                        print(f"round {r + 1}: serve ({mode}) x{c} done", file=sys.stderr, flush=True)
                for kind in (["hf"] if a.hf else []) + ["generate"]:
                    name = "HF generate(), one at a time" if kind == "hf" else "llmlab.generate(), one at a time"
                    rounds.setdefault(name, []).append(run_worker(kind, d, a.threads))
                if a.engine:
                    for c, result in run_worker("engine", d, a.threads).items():
                        rounds.setdefault(f"engine alone (rows), {c} client{'s' * (int(c) > 1)}", []).append(result)
        finally:
            for s in servers.values():
                s.stop()
    report(rounds, clients, modes, a)
    return 0


def report(rounds: dict[str, list[dict]], clients: list[int], modes: list[str], a) -> None:
    med = {name: {k: statistics.median(r[k] for r in rs) for k in rs[0] if k != "outputs"} for name, rs in rounds.items()}
    print(f"llmlab serve load: Llama shape, {a.requests} requests x {a.new_tokens} tokens, prompts "
          f"{a.prompt_lens.replace(',', '-')} tokens, --max-batch {a.max_batch}, {a.threads} torch thread(s), "
          f"{'compiled' if a.compile else 'eager'}, "
          f"median of {a.rounds} round(s)")
    print("| contestant | tokens/s | vs 1 client | TTFT p50 / p99 (ms) | inter-token p50 / p99 (ms) "
          "| same as generate | client CPU |")
    print("|---|---|---|---|---|---|---|")
    # llmlab.generate's greedy tokens as the server's text (token i is the character U+0100 + i)
    gen = rounds.get("llmlab.generate(), one at a time")
    want = ["".join(chr(0x100 + t) for t in ids) for ids in gen[0]["outputs"]] if gen else None
    for name, m in med.items():
        kind = name.split(",")[0]  # "serve (rows)", "engine alone (rows)", ...
        one = med.get(f"{kind}, 1 client")
        ratio = f"{m['tokens_per_s'] / one['tokens_per_s']:.2f}x" if one else ""
        same = all(r["outputs"] == want for r in rounds[name]) if want and name.startswith("serve") else ""
        cpu = f"{m['client_cpu']:.0%}" if "client_cpu" in m else ""
        print(f"| {name} | {m['tokens_per_s']:,.0f} | {ratio} | {m['ttft_p50'] * 1e3:.1f} / {m['ttft_p99'] * 1e3:.1f} | "
              f"{m['itl_p50'] * 1e3:.1f} / {m['itl_p99'] * 1e3:.1f} | {same} | {cpu} |")
    targets = {}
    for mode in modes:
        one, sixteen = med.get(f"serve ({mode}), 1 client"), med.get(f"serve ({mode}), 16 clients")
        if one and sixteen:
            targets[mode] = {"speedup_16": sixteen["tokens_per_s"] / one["tokens_per_s"],
                             "itl_p99_ratio_16": sixteen["itl_p99"] / one["itl_p99"]}
            t = targets[mode]
            print(f"target ({mode}): 16 clients {t['speedup_16']:.2f}x one client's tokens/s (>= 6x: "
                  f"{'met' if t['speedup_16'] >= 6 else 'NOT met'}), p99 inter-token {t['itl_p99_ratio_16']:.2f}x "
                  f"(< 4x: {'met' if t['itl_p99_ratio_16'] < 4 else 'NOT met'})")
    print(json.dumps({"results": med, "targets": targets, "settings": vars(a)}))


if __name__ == "__main__":
    sys.exit(main())
