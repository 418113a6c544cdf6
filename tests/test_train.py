"""Training: loss goes down, resume is exact (also after SIGKILL), checkpoints survive crashes."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import llmlab
from llmlab import LlmlabError, checkpoint
from llmlab.train import TrainArgs, train

TINY = dict(n_layer=2, n_head=2, n_embd=32, block_size=32, batch_size=4, eval_iters=2, lr=3e-3,
            warmup_iters=5, sample_tokens=0, quiet=True, dropout=0.1)


def args(out, **kw):
    return TrainArgs(out=str(out), **{**TINY, **kw})


def losses(run: Path) -> dict[int, float]:
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in recs if "loss" in r}


def val_losses(run: Path) -> dict[int, float]:
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["val_loss"] for r in recs if "val_loss" in r}


def test_short_run_lowers_val_loss(tmp_path):
    summary = train(args(tmp_path / "run", max_iters=80, eval_interval=40, eval_iters=8, dropout=0.0))
    vals = val_losses(tmp_path / "run")
    assert vals[80] < vals[0] - 1.0, vals  # from ~ln(256)=5.5 down by more than a nat
    assert summary["best_val_loss"] == min(vals.values())
    model = llmlab.load(tmp_path / "run")  # best/ checkpoint loads into the same config
    assert model.config.n_embd == 32


@pytest.mark.parametrize("extra", [{}, {"dropout": 0.0, "batch_threads": 2}], ids=["dropout", "batch-threads"])
def test_resume_equals_uninterrupted(tmp_path, monkeypatch, extra):
    def args(out, **kw):
        return TrainArgs(out=str(out), **{**TINY, **extra, **kw})

    train(args(tmp_path / "full", max_iters=30, eval_interval=10))
    reference = losses(tmp_path / "full")

    from llmlab import train as train_mod

    real_write = train_mod.MetricsLog.write

    def crash_at_step_24(self, **rec):
        if rec.get("step") == 24 and "loss" in rec:
            raise KeyboardInterrupt  # the process "dies" between checkpoints (last one: step 20)
        real_write(self, **rec)

    monkeypatch.setattr(train_mod.MetricsLog, "write", crash_at_step_24)
    with pytest.raises(KeyboardInterrupt):
        train(args(tmp_path / "resumed", max_iters=30, eval_interval=10))
    monkeypatch.setattr(train_mod.MetricsLog, "write", real_write)
    train(args(tmp_path / "resumed", max_iters=30, eval_interval=10, resume=True))
    assert losses(tmp_path / "resumed") == reference  # bit-for-bit, dropout included
    assert val_losses(tmp_path / "resumed") == val_losses(tmp_path / "full")


@pytest.mark.slow
def test_resume_after_sigkill_equals_uninterrupted(tmp_path):
    cli = [sys.executable, "-m", "llmlab.cli", "train", "--n-layer", "2", "--n-head", "2", "--n-embd", "32",
           "--block-size", "32", "--batch-size", "4", "--eval-iters", "2", "--max-iters", "200",
           "--eval-interval", "40", "--sample-tokens", "0", "--quiet", "--dropout", "0.1"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src"), "OMP_NUM_THREADS": "1"}
    subprocess.run(cli + ["--out", str(tmp_path / "full")], check=True, env=env, timeout=300)
    proc = subprocess.Popen(cli + ["--out", str(tmp_path / "killed")], env=env)
    metrics = tmp_path / "killed" / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline:  # wait until it is past the step-80 checkpoint
        if metrics.exists() and any(json.loads(x).get("step", 0) >= 100 for x in metrics.read_text().splitlines()
                                    if x.endswith("}")):
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (tmp_path / "killed" / "metrics.jsonl").read_text().count('"step": 199')
    subprocess.run(cli + ["--out", str(tmp_path / "killed"), "--resume"], check=True, env=env, timeout=300)
    assert losses(tmp_path / "killed") == losses(tmp_path / "full")


def test_crash_mid_checkpoint_write_keeps_previous(tmp_path, monkeypatch):
    run = tmp_path / "run"
    train(args(run, max_iters=10, eval_interval=10))
    before = llmlab.load(run / "last").state_dict()

    def torn_write(model, filename, *a, **k):
        Path(filename).write_bytes(b"\x00" * 100)  # half a file, then the machine dies
        raise OSError("disk gone")

    monkeypatch.setattr(checkpoint, "save_model", torn_write)
    with pytest.raises(LlmlabError, match="training stopped: disk gone.*--resume"):  # one line, not a traceback
        train(args(run, max_iters=20, eval_interval=10, resume=True))
    after = llmlab.load(run / "last").state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert checkpoint.read_meta(run / "last")["state"]["step"] == 10


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    from llmlab.model import Transformer

    real_loss = Transformer.loss
    calls = {"n": 0}

    def poisoned(self, x, y):
        loss = real_loss(self, x, y)
        if self.training:
            calls["n"] += 1
            if calls["n"] > 15:
                return loss * float("nan")
        return loss

    monkeypatch.setattr(Transformer, "loss", poisoned)
    with pytest.raises(LlmlabError, match="training loss became nan at step 15.*last good checkpoint"):
        train(args(tmp_path / "run", max_iters=30, eval_interval=10))
    meta = checkpoint.read_meta(tmp_path / "run" / "last")
    assert meta["state"]["step"] == 10
    model = llmlab.load(tmp_path / "run" / "last")
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_truncated_checkpoint_is_a_clear_error(tmp_path):
    run = tmp_path / "run"
    train(args(run, max_iters=5, eval_interval=5))
    f = run / "last" / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(LlmlabError, match="truncated or corrupt"):
        llmlab.load(run / "last")
    with pytest.raises(LlmlabError, match="truncated or corrupt"):  # resuming it, too
        train(args(run, max_iters=10, eval_interval=5, resume=True))


def test_batch_threads_train_like_one_thread(tmp_path):
    """Shards on two threads compute the batch's gradient: the losses follow a one-thread run (up to
    float summation order), repeat bit for bit, and torch's thread count is restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(3)  # a count the shards' one-thread setting cannot be mistaken for
    one = dict(dropout=0.0, batch_size=5, max_iters=25, eval_interval=25)  # 5 rows: uneven shards 3 + 2
    train(args(tmp_path / "one", **one))
    train(args(tmp_path / "two", batch_threads=2, **one))
    train(args(tmp_path / "again", batch_threads=2, **one))
    ref, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert ref.keys() == two.keys()
    assert max(abs(ref[k] - two[k]) for k in ref) < 1e-4, (ref, two)
    assert losses(tmp_path / "again") == two
    assert torch.get_num_threads() == 3
    torch.set_num_threads(threads)


def test_compile_refused_at_setup_trains_eagerly(tmp_path, monkeypatch):
    """torch.compile raising at once (not at the first call) falls back to eager too, with shards on."""
    def refuse(*a, **k):
        raise RuntimeError("dynamo does not support this Python")

    monkeypatch.setattr(torch, "compile", refuse)
    threads = torch.get_num_threads()
    one = dict(dropout=0.0, max_iters=5, eval_interval=5)
    train(args(tmp_path / "eager", **one))
    with pytest.warns(RuntimeWarning, match="torch.compile of the training loss failed.*dynamo does not support"):
        train(args(tmp_path / "compiled", compile=True, batch_threads=2, **one))
    assert max(abs(a - b) for a, b in zip(losses(tmp_path / "eager").values(),
                                          losses(tmp_path / "compiled").values())) < 1e-4
    assert torch.get_num_threads() == threads


def test_batch_shards_gradient_equals_full_batch():
    from llmlab.model import Transformer
    from llmlab.presets import preset_config
    from llmlab.shards import BatchShards

    model = Transformer(preset_config("flash", vocab_size=50, n_layer=2, n_head=2, n_embd=16, block_size=8))
    x, y = torch.randint(50, (7, 8)), torch.randint(50, (7, 8))
    (model.loss(x, y) * 0.5).backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    with BatchShards(model.parameters(), 3) as shards:  # rows 3 + 2 + 2, each shard on its own thread
        for _ in range(2):  # the second call runs concurrently (the first is the compile-safe warm-up)
            loss = shards.backward(model.loss, x, y, scale=0.25)  # twice a quarter: accumulates to 0.5
    assert loss == pytest.approx(0.25 * model.loss(x, y).item(), rel=1e-5)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref[n], rtol=1e-5, atol=1e-7, msg=n)


@pytest.mark.parametrize("kw, words", [
    (dict(batch_threads=2, dropout=0.1), "--batch-threads needs dropout 0 and this model has dropout 0.1"),
    (dict(batch_threads=5, batch_size=4, dropout=0.0), "needs --batch-size >= 5"),
    (dict(batch_threads=0), "--batch-threads must be >= 1"),
])
def test_batch_threads_bad_input(tmp_path, kw, words):
    with pytest.raises(LlmlabError, match=words):
        train(args(tmp_path / "run", max_iters=2, **kw))
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_compiled_sharded_training_follows_eager(tmp_path):
    """--compile (inductor's C++ wrapper on CPU) together with --batch-threads 2: the same losses as
    the plain eager step, up to compiled float rounding (one compile: tens of seconds cold)."""
    one = dict(dropout=0.0, max_iters=8, eval_interval=8)
    train(args(tmp_path / "eager", **one))
    train(args(tmp_path / "compiled", compile=True, batch_threads=2, **one))
    ref, got = losses(tmp_path / "eager"), losses(tmp_path / "compiled")
    assert ref.keys() == got.keys()
    assert max(abs(ref[k] - got[k]) for k in ref) < 1e-3, (ref, got)
