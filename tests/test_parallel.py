"""torch.distributed training on CPU (gloo), 2 ranks started by torchrun: DDP and FSDP2 follow
one process with the same global batch, sharded checkpoints resume at another world size, and a
failing rank ends the job at once with its message."""
import json
import os
import pickle
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import llmlab
from llmlab.cli import main as cli
from llmlab import LlmlabError
from llmlab.training import TrainArgs, train

REPO = Path(__file__).resolve().parents[1]
# global batch 2 x 4 rows x 2 micro-batches; the reference is one process with 8 rows x 2
TINY = dict(n_layer=2, n_head=2, n_embd=32, block_size=16, eval_iters=2, lr=3e-3, warmup_iters=2,
            sample_tokens=0, quiet=True, dropout=0.0, grad_accum=2, max_iters=6, eval_interval=3)


def losses(run: Path, key: str = "loss") -> dict[int, float]:
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r[key] for r in recs if key in r}


def assert_same_losses(ref: Path, got: Path, tol=1e-5):
    for key in ("loss", "val_loss"):
        a, b = losses(ref, key), losses(got, key)
        assert a.keys() == b.keys(), (key, a, b)
        assert max(abs(a[k] - b[k]) for k in a) <= tol, (key, a, b)


def torchrun(spec: dict, nproc: int = 2, timeout: float = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(REPO / "tests" / "dist_worker.py"), json.dumps(spec)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def one_process(out: Path, **kw) -> Path:
    train(TrainArgs(out=str(out), **{**TINY, "batch_size": 8, **kw}))
    return out


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    """One-process runs with the global batch (8 rows), per preset: flash ties its embeddings."""
    base = tmp_path_factory.mktemp("one")
    return {p: one_process(base / p, preset=p) for p in ("flash", "llama")}


@pytest.mark.parametrize("parallel, preset", [
    ("ddp", "flash"), ("fsdp", "flash"),
    pytest.param("ddp", "llama", marks=pytest.mark.slow), pytest.param("fsdp", "llama", marks=pytest.mark.slow),
], ids=["ddp-tied", "fsdp-tied", "ddp-untied", "fsdp-untied"])
def test_two_ranks_train_like_one_process(tmp_path, references, parallel, preset):
    out = tmp_path / "run"
    r = torchrun({"train": {**TINY, "preset": preset, "batch_size": 4, "parallel": parallel, "out": str(out)}})
    assert r.returncode == 0, r.stderr[-3000:]
    assert_same_losses(references[preset], out)
    assert len(losses(out)) == TINY["max_iters"]
    assert (out / "last" / "dcp").is_dir() and (out / "best" / "model.safetensors").is_file()
    best = llmlab.load(out / "best")  # the gathered best/ loads like a one-process checkpoint
    ref = llmlab.load(references[preset] / "best")
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(best.state_dict()[k], v, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_sharded_checkpoint_resumes_at_another_world_size(tmp_path, references):
    """2 FSDP ranks stop after step 4 (checkpoint at 3) and 1 rank resumes; 1 rank stops and 2 DDP
    ranks resume: both follow the uninterrupted one-process run."""
    two_then_one = tmp_path / "two_then_one"
    r = torchrun({"train": {**TINY, "batch_size": 4, "parallel": "fsdp", "out": str(two_then_one)}, "stop_after": 4})
    assert r.returncode == 0, r.stderr[-3000:]
    assert max(losses(two_then_one)) == 4
    # only `out`: the run's settings, --parallel fsdp included, and its global batch (2 x 4 rows: 8 on one rank)
    train(TrainArgs(out=str(two_then_one), resume=True))
    assert_same_losses(references["flash"], two_then_one)

    one_then_two = tmp_path / "one_then_two"
    r = torchrun({"train": {**TINY, "batch_size": 8, "parallel": "fsdp", "out": str(one_then_two)}, "stop_after": 4},
                 nproc=1)
    assert r.returncode == 0, r.stderr[-3000:]
    r = torchrun({"train": {"parallel": "ddp", "out": str(one_then_two), "resume": True}})  # 8 rows: 4 a rank
    assert r.returncode == 0, r.stderr[-3000:]
    assert_same_losses(references["flash"], one_then_two)


def test_one_rank_fsdp_with_activation_checkpointing_trains_like_one_process(tmp_path, references):
    """--parallel in one process without torchrun (a group of one), blocks recomputed in backward."""
    run = tmp_path / "run"
    train(TrainArgs(**{**TINY, "batch_size": 8, "parallel": "fsdp", "activation_checkpointing": True,
                       "out": str(run)}))
    assert_same_losses(references["flash"], run)


def test_convert_sharded_checkpoint_to_single(tmp_path, references, capsys):
    run = tmp_path / "run"
    train(TrainArgs(**{**TINY, "batch_size": 8, "parallel": "fsdp", "out": str(run)}))  # one rank
    code = cli(["sample", str(run / "last"), "--max-new-tokens", "2"])
    err = capsys.readouterr().err
    assert code == 2 and "sharded" in err and "llmlab convert" in err and "Traceback" not in err
    assert cli(["convert", str(run / "last"), "--out", str(tmp_path / "single")]) == 0
    single = llmlab.load(tmp_path / "single")
    ref = llmlab.load(references["flash"] / "last")  # the one-process run's final weights
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(single.state_dict()[k], v, rtol=1e-4, atol=1e-5)
    assert cli(["sample", str(tmp_path / "single"), "--max-new-tokens", "2", "--seed", "0"]) == 0


def test_nan_on_one_rank_stops_every_rank_with_one_line(tmp_path):
    out = tmp_path / "run"
    cli = ["train", "--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--block-size", "16", "--batch-size", "2",
           "--eval-iters", "1", "--max-iters", "8", "--eval-interval", "4", "--sample-tokens", "0", "--quiet",
           "--parallel", "ddp", "--out", str(out)]
    t0 = time.time()
    r = torchrun({"cli": cli, "nan_rank": 1, "nan_from": 6})  # rank 1's 6th step
    assert time.time() - t0 < 120
    assert r.returncode != 0
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error")]
    assert errors == ["error: training loss became nan at step 5; stopped without saving. The last good "
                      f"checkpoint is in {out / 'last'} (try a lower --lr or --grad-clip)"], r.stderr[-3000:]
    assert json.loads((out / "last" / "config.json").read_text())["state"]["step"] == 4


def test_a_rank_that_raises_ends_the_job_with_its_message(tmp_path):
    t0 = time.time()
    r = torchrun({"train": {**TINY, "batch_size": 4, "parallel": "ddp", "out": str(tmp_path / "run")},
                  "raise_rank": 1})
    elapsed = time.time() - t0
    assert r.returncode != 0
    assert "rank 1 broke on purpose" in r.stderr
    assert elapsed < 60, elapsed  # rank 0, waiting in an all-reduce, is stopped by torchrun, not a timeout


def test_batch_threads_with_parallel_is_one_line(tmp_path, capsys):
    code = cli(["train", "--batch-threads", "2", "--parallel", "ddp", "--dropout", "0",
                            "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0
    assert err == "error: --batch-threads 2 cannot be combined with --parallel ddp: use one or the other"
    assert not (tmp_path / "run").exists()


def test_legacy_dcp_metadata_pickle_is_allow_listed(tmp_path):
    """DCP's .metadata is a pickle: a file that would run code is refused before anything runs."""
    from llmlab.training.dcp_legacy import read_metadata_pickle

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    (tmp_path / ".metadata").write_bytes(pickle.dumps(Evil()))
    with pytest.raises(LlmlabError, match="refusing posix.system|refusing os.system"):
        read_metadata_pickle(tmp_path / ".metadata")
    assert not (tmp_path / "pwned").exists()


def probe(name: str, **kw) -> dict:
    """A dist_worker probe in a process of its own (a process group of one), with a timeout."""
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, str(REPO / "tests" / "dist_worker.py"), json.dumps({"probe": name, **kw})],
                       env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("checkpointing, runs", [(False, 1), (True, 2)])
def test_activation_checkpointing_recomputes_blocks_in_backward(checkpointing, runs):
    got = probe("activation_checkpointing", checkpointing=checkpointing)
    assert got["block_forwards"] == runs * got["n_layer"]


@pytest.mark.parametrize("use_no_sync, reductions", [(True, 1), (False, 3)])
def test_ddp_reduces_gradients_once_per_step_with_accumulation(use_no_sync, reductions):
    """3 micro-batches: DDP's all-reduce runs for the last only (no_sync for the others)."""
    got = probe("ddp_reductions", use_no_sync=use_no_sync)
    assert got["calls"] == reductions * got["buckets"]


def test_compile_refused_under_parallel_trains_eagerly(tmp_path, references, monkeypatch):
    """--parallel --compile compiles each block; torch.compile failing falls back to eager."""
    def refuse(*a, **k):
        raise RuntimeError("dynamo does not support this Python")

    monkeypatch.setattr(torch, "compile", refuse)
    run = tmp_path / "run"
    with pytest.warns(RuntimeWarning, match="torch.compile of a transformer block failed"):
        train(TrainArgs(**{**TINY, "batch_size": 8, "parallel": "ddp", "compile": True, "out": str(run)}))
    assert_same_losses(references["flash"], run)


@pytest.mark.slow
def test_compiled_blocks_under_fsdp_follow_eager(tmp_path, references):
    """--parallel fsdp --compile (one rank; inductor on CPU: tens of seconds cold)."""
    import warnings

    run = tmp_path / "run"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(TrainArgs(**{**TINY, "batch_size": 8, "parallel": "fsdp", "compile": True, "out": str(run)}))
    assert not [w for w in caught if "torch.compile of" in str(w.message)]  # compiled, not the eager fallback
    assert_same_losses(references["flash"], run, tol=1e-3)
