"""A run directory survives kills and misuse (issue 9): interrupted checkpoint swaps are repaired
at start, one train per directory, finished runs and changed model flags are one-line errors,
and extending a run keeps its learning-rate schedule."""
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

import llmlab
from llmlab import LlmlabError
from llmlab.cli import main as cli
from llmlab.training import TrainArgs, train
from llmlab.training.rundir import RunLock

TINY = dict(n_layer=1, n_head=2, n_embd=16, block_size=16, batch_size=4, eval_iters=2, lr=3e-3,
            warmup_iters=2, sample_tokens=0, quiet=True, dropout=0.0)


def args(out, **kw):
    return TrainArgs(out=str(out), **{**TINY, **kw})


def records(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def snapshot(run: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def run10(tmp_path_factory):
    """A finished 10-step run with checkpoints at 5 and 10 (a copy of best/ at step 5 kept aside)."""
    base = tmp_path_factory.mktemp("run10")
    run = base / "run"
    train(args(run, max_iters=5, eval_interval=5, lr_decay_iters=10))
    shutil.copytree(run / "best", base / "best_at_5")
    train(args(run, max_iters=10, eval_interval=5, resume=True))
    return run


def fresh_copy(run10: Path, tmp_path: Path) -> Path:
    shutil.copytree(run10.parent, tmp_path / "copy")
    return tmp_path / "copy" / "run"


def test_resume_of_a_finished_run_is_one_line_and_writes_nothing(run10, tmp_path, capsys):
    run = fresh_copy(run10, tmp_path)
    before = snapshot(run)
    for extra in ([], ["--max-iters", "7"]):  # the run's own max_iters (10), and a smaller one
        code = cli(["train", "--out", str(run), "--resume", *extra])
        err = capsys.readouterr().err.strip()
        assert code == 2 and err.count("\n") == 0 and "Traceback" not in err
        assert err.startswith(f"error: {run} finished at step 10"), err
    assert snapshot(run) == before


def test_kill_between_the_renames_of_last_is_recovered(run10, tmp_path, capsys):
    """write_dir_atomically renames last/ to .last.old, then .last.tmp to last/: a kill between
    the two leaves no last/. The next start renames .last.old back and resumes from it."""
    run = fresh_copy(run10, tmp_path)
    os.replace(run / "last", run / ".last.old")
    shutil.copytree(run / ".last.old", run / ".last.tmp")  # the new one, complete or not: never used
    (run / ".last.tmp" / "model.safetensors").write_bytes(b"torn")
    # through the CLI, which reads the run's settings (model size, data...) from the checkpoint
    assert cli(["train", "--out", str(run), "--resume", "--max-iters", "12"]) == 0
    steps = [r["step"] for r in records(run) if "loss" in r]
    assert steps == list(range(12))
    assert not (run / ".last.old").exists() and not (run / ".last.tmp").exists()
    with pytest.raises(LlmlabError, match="already holds a run"):  # and a fresh start is still refused
        train(args(run, max_iters=3))


def test_kill_during_the_best_write_is_reconciled_at_start(run10, tmp_path):
    """last/ (step 10) records a better val loss than best/ holds (the step-5 weights, as if the
    step-10 best/ write was killed): the next start rebuilds best/ from last/."""
    run = fresh_copy(run10, tmp_path)
    last_state = json.loads((run / "last" / "config.json").read_text())["state"]
    best5 = run.parent / "best_at_5"
    assert last_state["val_loss"] == last_state["best_val_loss"]  # step 10 was the best so far
    assert json.loads((best5 / "config.json").read_text())["state"]["val_loss"] > last_state["val_loss"]
    shutil.rmtree(run / "best")
    shutil.copytree(best5, run / "best")
    with pytest.raises(LlmlabError, match="finished at step 10"):  # any start reconciles first
        train(args(run, max_iters=10, eval_interval=5, resume=True))
    best, last = llmlab.load(run / "best").state_dict(), llmlab.load(run / "last").state_dict()
    assert all(torch.equal(best[k], last[k]) for k in last)
    assert json.loads((run / "best" / "config.json").read_text())["state"]["val_loss"] == last_state["val_loss"]


def test_a_best_that_records_a_lower_loss_is_never_replaced_at_start(run10, tmp_path):
    """best/ recording a loss below last/'s (0.0 included: a number, not "unknown") is kept as it is."""
    run = fresh_copy(run10, tmp_path)
    for recorded in (0.0, 1e-3):
        cfg_path = run / "best" / "config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["state"]["val_loss"] = recorded
        cfg_path.write_text(json.dumps(cfg))
        before = {p.name: p.read_bytes() for p in (run / "best").iterdir() if p.is_file()}
        with pytest.raises(LlmlabError, match="finished at step 10"):  # any start reconciles first
            train(args(run, max_iters=10, eval_interval=5, resume=True))
        assert {p.name: p.read_bytes() for p in (run / "best").iterdir() if p.is_file()} == before


def test_second_train_on_the_same_out_is_refused_and_the_first_untouched(run10, tmp_path):
    run = fresh_copy(run10, tmp_path)
    first = RunLock(run)  # the first `llmlab train`, still running
    try:
        before = snapshot(run)
        with pytest.raises(LlmlabError, match=rf"{run} is in use by another `llmlab train` \(pid {os.getpid()}\)"):
            train(args(run, max_iters=20, eval_interval=5, resume=True))
        with pytest.raises(LlmlabError, match="is in use"):
            train(args(run, max_iters=20))
        assert snapshot(run) == before
    finally:
        first.release()
    train(args(run, max_iters=11, eval_interval=5, resume=True))  # free again once the first ends


def test_extending_a_run_keeps_its_schedule(tmp_path):
    """The cosine ends at the run's first max_iters (saved as lr_decay_iters); past it, min_lr."""
    run = tmp_path / "run"
    train(args(run, max_iters=6, eval_interval=3))
    train(args(run, max_iters=10, eval_interval=3, resume=True))
    lrs = {r["step"]: r["lr"] for r in records(run) if "lr" in r}
    assert lrs[5] > 3e-4 and all(lrs[s] == pytest.approx(3e-4) for s in range(6, 10)), lrs  # min_lr = lr / 10
    uninterrupted = tmp_path / "ref"
    train(args(uninterrupted, max_iters=10, eval_interval=3, lr_decay_iters=6))
    assert {r["step"]: r["lr"] for r in records(uninterrupted) if "lr" in r} == lrs


def test_lr_decay_iters_flag_ends_the_cosine_there(tmp_path, capsys):
    run = tmp_path / "run"
    assert cli(["train", "--out", str(run), "--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--block-size", "16",
                "--batch-size", "2", "--max-iters", "8", "--warmup-iters", "0", "--lr-decay-iters", "4",
                "--eval-interval", "8", "--eval-iters", "1", "--sample-tokens", "0", "--quiet"]) == 0
    lrs = [r["lr"] for r in records(run) if "lr" in r]
    assert lrs[2] > 2e-4 and lrs[4:] == [pytest.approx(2e-4)] * 4  # --lr 2e-3 by default, min lr / 10


@pytest.mark.parametrize("flag, value, saved", [("--n-layer", "2", "1"), ("--preset", "rope", "flash"),
                                               ("--tokenizer", "char", "byte")])
def test_resume_with_other_model_or_tokenizer_flags_is_one_line(run10, tmp_path, capsys, flag, value, saved):
    run = fresh_copy(run10, tmp_path)
    before = snapshot(run)
    code = cli(["train", "--out", str(run), "--resume", "--max-iters", "20", flag, value])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0
    assert err == f"error: {flag} {value} differs from the run's {saved}: a resumed run keeps its model and " \
                  "tokenizer; drop the flag"
    assert snapshot(run) == before
