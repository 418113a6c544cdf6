"""Training and infrastructure behaviour pinned against independent values (issue 16, "tests that
notice"): one-line bugs here (a lost 1/accum, a tokens/s that forgets accumulation, a best/ that
a resume overwrites, an RNG a sharded write disturbs, an off-by-one evaluation window, a cache
check that lets an out-of-vocabulary id through, a split character, a file mode) each fail one."""
from __future__ import annotations

import json
import os
import stat
import types
from pathlib import Path

import numpy as np
import pytest
import torch

import llmlab
from llmlab.training import TrainArgs, train

from conftest import tiny, tiny_model

TINY = dict(n_layer=1, n_head=2, n_embd=16, block_size=16, eval_iters=2, sample_tokens=0, quiet=True,
            warmup_iters=2, lr=3e-3)


def records(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def losses(run: Path, key: str = "loss") -> dict[int, float]:
    return {r["step"]: r[key] for r in records(run) if key in r}


def test_batch_threads_with_accumulation_log_the_one_thread_losses(tmp_path):
    common = dict(TINY, batch_size=4, grad_accum=2, max_iters=4, eval_interval=4, dropout=0.0)
    train(TrainArgs(out=str(tmp_path / "one"), **common))
    train(TrainArgs(out=str(tmp_path / "two"), batch_threads=2, **common))
    a, b = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert a.keys() == b.keys() and max(abs(a[k] - b[k]) for k in a) < 1e-5, (a, b)
    assert 4.0 < a[0] < 6.5  # ~ln(256) = 5.5 at the start: a lost 1/accum would log twice that


def test_tokens_per_second_counts_every_micro_batch(tmp_path, monkeypatch):
    """A clock that advances 1 s a reading: each step's tokens/s is exactly its tokens."""
    from llmlab.training import loop

    ticks = iter(range(10**6))
    monkeypatch.setattr(loop, "time", types.SimpleNamespace(perf_counter=lambda: float(next(ticks)),
                                                            strftime=loop.time.strftime))
    run = tmp_path / "run"
    train(TrainArgs(out=str(run), batch_size=3, grad_accum=2, max_iters=2, eval_interval=2, **TINY))
    assert {r["tokens_per_s"] for r in records(run) if "tokens_per_s" in r} == {3 * 2 * 16}


def test_best_survives_a_resume_whose_evals_get_worse(tmp_path):
    run = tmp_path / "run"
    train(TrainArgs(out=str(run), batch_size=4, max_iters=20, eval_interval=10, **TINY))
    best_before = json.loads((run / "best" / "config.json").read_text())["state"]["val_loss"]
    weights_before = (run / "best" / "model.safetensors").read_bytes()
    # a far too high learning rate (AdamW moves every weight by ~lr a step): the evals get worse
    train(TrainArgs(out=str(run), resume=True, max_iters=26, eval_interval=3, lr=1.0, min_lr=1.0))
    vals = losses(run, "val_loss")
    assert min(vals[21], vals[24], vals[26]) > best_before, vals
    assert json.loads((run / "best" / "config.json").read_text())["state"]["val_loss"] == best_before
    assert (run / "best" / "model.safetensors").read_bytes() == weights_before


def test_one_process_sharded_run_with_dropout_logs_the_plain_losses(tmp_path):
    """The sharded best/ write builds a model on rank 0: it must not draw from the RNG dropout uses."""
    common = dict(TINY, batch_size=4, max_iters=6, eval_interval=2, dropout=0.2)
    train(TrainArgs(out=str(tmp_path / "plain"), **common))
    train(TrainArgs(out=str(tmp_path / "fsdp"), parallel="fsdp", **common))
    for key in ("loss", "val_loss"):
        a, b = losses(tmp_path / "plain", key), losses(tmp_path / "fsdp", key)
        assert a.keys() == b.keys() and max(abs(a[k] - b[k]) for k in a) < 1e-5, (key, a, b)


@pytest.mark.parametrize("extra", [0, 1, 5])
def test_evaluation_windows_predict_every_token_once(extra):
    """Split lengths k*block + extra (extra 1: exactly k full windows of targets): the windows are
    floor((n - 1) / block) consecutive blocks, and the loss is the mean over exactly their tokens."""
    from llmlab.training.evaluate import consecutive_windows, mean_loss

    block, k = 8, 5
    ids = np.arange(k * block + extra) % 50
    n, batches = consecutive_windows(ids, block, rows=2)
    batches = list(batches)
    want_windows = (len(ids) - 1) // block
    assert n == want_windows * block and sum(x.shape[0] for x, _ in batches) == want_windows
    flat_x = torch.cat([x.reshape(-1) for x, _ in batches])
    flat_y = torch.cat([y.reshape(-1) for _, y in batches])
    assert torch.equal(flat_x, torch.as_tensor(ids[:n])) and torch.equal(flat_y, torch.as_tensor(ids[1:n + 1]))
    model = tiny_model(vocab_size=50, block_size=block).eval()
    with torch.no_grad():
        want = sum(model.loss(x, y).item() * y.numel() for x, y in batches) / n
    assert mean_loss(model, batches) == pytest.approx(want, rel=1e-6)


def test_ragged_batch_whose_window_rolls_equals_each_prompt_alone():
    """Learned positions end at block_size 32: a 30-token and a 5-token prompt each get 12 tokens,
    so both windows roll; each row equals generating that prompt alone."""
    model = tiny_model(preset="kv_cache").eval()
    prompts = [list(range(1, 31)), [3, 1, 4, 1, 5]]
    batched = llmlab.generate(model, prompts, 12, temperature=0)
    for p, row in zip(prompts, batched):
        assert torch.equal(row, llmlab.generate(model, torch.tensor([p]), 12, temperature=0)[0])


def test_padded_row_whose_window_rolls_has_the_recomputed_logits():
    """Logits, not only greedy tokens (a tiny model's argmax can hide a wrong mask): a 5-token row
    left-padded beside a 30-token one, window 32, so it rolls 10 times; at every step each row's
    logits equal recomputing that row alone (its padding shrinks as the window moves left)."""
    from llmlab.generation import _cached_logits, _recomputed_logits

    model = tiny_model(preset="kv_cache").eval()
    idx = torch.tensor([list(range(1, 31)), [0] * 25 + [3, 1, 4, 1, 5]])
    pad = torch.tensor([0, 25])
    fed = torch.randint(1, model.config.vocab_size, (12, 2), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        cached, recomputed = _cached_logits(model, idx, pad, 13), _recomputed_logits(model, idx, pad)
        got, want = next(cached), next(recomputed)
        for tok in fed:
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
            got, want = cached.send(tok), recomputed.send(tok)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_streamed_text_never_splits_a_multibyte_character(monkeypatch):
    from llmlab import sample
    from llmlab.tokenizer import ByteTokenizer

    text = "aé€😀b"
    ids = list(text.encode("utf-8"))
    monkeypatch.setattr(sample, "stream", lambda *a, **k: iter(torch.tensor([[i]]) for i in ids))
    pieces = list(sample.stream_text(None, ByteTokenizer(), "x", len(ids)))
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces) and len(pieces) == 5


def test_token_cache_with_an_id_past_the_vocabulary_is_reencoded(tmp_path):
    """An id equal to the vocabulary size, with the record's size and sha256 rewritten to match:
    the cache is not trusted (it would index past the embedding), the text is encoded again."""
    import hashlib

    from llmlab.data import encode_corpus
    from llmlab.tokenizer import CharTokenizer

    text = "hello world, " * 50
    tok = CharTokenizer(text)
    first = np.array(encode_corpus(text, tok, cache=tmp_path))
    path = next(p for p in tmp_path.iterdir() if not p.name.endswith(".json"))
    bad = np.array(first)
    bad[3] = tok.vocab_size
    path.write_bytes(bad.tobytes())
    record = path.with_name(path.name + ".json")
    rec = json.loads(record.read_text())
    rec.update(bytes=len(bad.tobytes()), sha256=hashlib.sha256(bad.tobytes()).hexdigest())
    record.write_text(json.dumps(rec))
    again = np.array(encode_corpus(text, tok, cache=tmp_path))
    assert np.array_equal(again, first) and again.max() < tok.vocab_size


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_single_file_writes_honour_the_umask(tmp_path, mask):
    from llmlab.fsutil import atomic_write_bytes, atomic_write_json

    old = os.umask(mask)
    try:
        atomic_write_bytes(tmp_path / "a.bin", b"x")
        atomic_write_json(tmp_path / "b.json", {"a": 1})
    finally:
        os.umask(old)
    for name in ("a.bin", "b.json"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o666 & ~mask, name


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads the kernel's VmHWM from /proc (Linux)")
def test_compare_peak_memory_is_in_mib():
    """Against the kernel's own peak resident size (VmHWM in /proc, in kB), not the same formula."""
    from llmlab.compare.worker import peak_memory_mib

    status = Path("/proc/self/status").read_text()
    kb = int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:")))
    assert 50 < peak_memory_mib("cpu") == pytest.approx(kb / 1024, rel=0.05)


def test_bench_no_cache_rate_divides_its_own_step_count(monkeypatch):
    """A clock that advances 1 s a reading: each variant's decode tokens/s is its own step count."""
    from llmlab import bench
    from llmlab.bench import measure

    ticks = iter(range(10**6))
    monkeypatch.setattr(measure, "time", types.SimpleNamespace(perf_counter=lambda: float(next(ticks))))
    model = tiny_model(preset="kv_cache").eval()
    variants = bench.bench_variants(decode_steps=7, compile=False)
    got = bench.measure_contexts(model, [4], repeats=1, variants=variants, seed=0)[0]["decode_tokens_per_s"]
    assert got == {"cache": 7.0, "no cache": float(bench.UNCACHED_STEPS)}


def test_a_non_finite_step_leaves_weights_and_optimizer_untouched():
    from llmlab.training.step import StepConfig, TrainStep, make_optimizer

    model = llmlab.Transformer(tiny()).train()
    opt = make_optimizer(model, 0.1, (0.9, 0.99), 1e-2)
    x = torch.randint(0, 97, (2, 8))
    step = TrainStep(model, opt, StepConfig(), loss_fn=lambda a, b: model.loss(a, b) * float("nan"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert step(lambda: (x, x), 1e-2) != step(lambda: (x, x), 1e-2)  # NaN
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert not opt.state and all(p.grad is None for p in model.parameters())


def test_metrics_after_a_crash_and_resume_hold_each_step_once(tmp_path, monkeypatch):
    """Killed after step 4's train line (its checkpoint is step 3's): the resumed log equals the
    uninterrupted one line for line (the crashed run's step-3 and step-4 lines are dropped and redone)."""
    from llmlab.training import checkpoints

    common = dict(TINY, batch_size=4, max_iters=6, eval_interval=3)
    train(TrainArgs(out=str(tmp_path / "ref"), **common))
    real = checkpoints.MetricsLog.write

    def crash_after_step_4(self, **rec):
        real(self, **rec)
        if rec.get("step") == 4 and "loss" in rec:
            raise KeyboardInterrupt

    monkeypatch.setattr(checkpoints.MetricsLog, "write", crash_after_step_4)
    with pytest.raises(KeyboardInterrupt):
        train(TrainArgs(out=str(tmp_path / "run"), **common))
    monkeypatch.setattr(checkpoints.MetricsLog, "write", real)
    train(TrainArgs(out=str(tmp_path / "run"), resume=True))

    def lines(run):
        return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in records(run) if "resumed_at" not in r]
    assert lines(tmp_path / "run") == lines(tmp_path / "ref")
