"""Issue 16's training and run-folder items, each pinned against an independent value: links in a
run folder, off-grid resume, data saved absolute with its sha256, the global batch across ranks,
Ctrl-C's message, a resume from Python with only `out`."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from llmlab import LlmlabError
from llmlab.cli import main
from llmlab.training import TrainArgs, train

TINY = dict(n_layer=1, n_head=2, n_embd=16, block_size=16, batch_size=4, eval_iters=1, sample_tokens=0,
            quiet=True, dropout=0.0, warmup_iters=2, lr=3e-3)


def records(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def losses(run: Path, key: str = "loss") -> dict[int, float]:
    return {r["step"]: r[key] for r in records(run) if key in r}


@pytest.mark.parametrize("name", [".lock", "metrics.jsonl"])
def test_links_in_a_run_folder_are_never_written_through(tmp_path, capsys, name):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    run = tmp_path / "run"
    run.mkdir()
    (run / name).symlink_to(victim)
    code = main(["train", "--out", str(run), "--max-iters", "2", "--eval-interval", "2", "--quiet", "--sample-tokens",
                 "0", "--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--block-size", "16"])
    err = capsys.readouterr().err
    assert code == 2 and "symbolic link" in err and err.count("\n") == 1
    assert victim.read_text() == "precious"


@pytest.mark.parametrize("first, then", [(20, 30), (20, 150)])
def test_off_grid_resume_evaluates_and_saves_where_an_uninterrupted_run_does(tmp_path, first, then):
    """max_iters 20 then --resume --max-iters N: the evals and checkpoints of a run that went to N
    at once after its step-20 stop (step 100 on the grid, and the last step), and a summary."""
    run = tmp_path / "run"
    train(TrainArgs(out=str(run), max_iters=first, eval_interval=100, **TINY))
    summary = train(TrainArgs(out=str(run), max_iters=then, eval_interval=100, resume=True, **TINY))
    assert summary["step"] == then and summary["val_loss"] is not None
    want = sorted({0, first, then} | set(range(0, then + 1, 100)))
    assert [r["step"] for r in records(run) if "val_loss" in r] == want  # each eval once, in order
    assert json.loads((run / "last" / "config.json").read_text())["state"]["step"] == then


def test_data_is_saved_absolute_with_its_sha256_and_eval_says_what_is_missing(tmp_path, capsys, monkeypatch):
    import hashlib

    from llmlab.data import stdlib_corpus_text

    text = stdlib_corpus_text(60_000)
    (tmp_path / "corpus.txt").write_text(text)
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "run"
    train(TrainArgs(out=str(run), data="corpus.txt", max_iters=2, eval_interval=2, **TINY))
    meta = json.loads((run / "last" / "config.json").read_text())
    assert meta["train"]["data"] == str(tmp_path / "corpus.txt")
    assert meta["state"]["data_sha256"] == hashlib.sha256(text.encode()).hexdigest()
    monkeypatch.chdir(tmp_path.parent)  # another folder: the saved path still finds it
    assert main(["eval", str(run), "--max-tokens", "64"]) == 0
    (tmp_path / "corpus.txt").rename(tmp_path / "moved.txt")
    assert main(["eval", str(run)]) == 2
    err = capsys.readouterr().err
    assert f"trained on {tmp_path / 'corpus.txt'} (sha256 {meta['state']['data_sha256']}), which is missing" in err
    (tmp_path / "moved.txt").write_text(text + "changed")
    with pytest.raises(LlmlabError, match="is not what .* was trained on"):
        train(TrainArgs(out=str(run), data=str(tmp_path / "moved.txt"), max_iters=4, eval_interval=2, resume=True,
                        **TINY))


def test_resume_from_python_with_only_out_continues_exactly(tmp_path):
    """Issue 18: `train(TrainArgs(out=R, resume=True))` takes the run's own settings (data,
    sizes, lr, batch...), so it ends with the losses of the uninterrupted run."""
    settings = dict(TINY, max_iters=6, lr_decay_iters=6, eval_interval=3, lr=1e-2, batch_size=3, seed=7,
                    tokenizer="char")
    train(TrainArgs(out=str(tmp_path / "ref"), **settings))
    train(TrainArgs(out=str(tmp_path / "run"), **{**settings, "max_iters": 3}))
    args = TrainArgs(out=str(tmp_path / "run"), resume=True, max_iters=6)
    before = dict(vars(args))
    train(args)
    assert vars(args) == before  # train() never changes its input
    for key in ("loss", "val_loss"):
        assert losses(tmp_path / "run", key) == losses(tmp_path / "ref", key)


def test_ctrl_c_says_the_step_the_last_checkpoint_and_how_to_resume(tmp_path, capsys, monkeypatch):
    from llmlab.training import step as step_mod

    real, calls = step_mod.TrainStep.__call__, []

    def interrupt_at_step_3(self, *a, **k):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real(self, *a, **k)

    monkeypatch.setattr(step_mod.TrainStep, "__call__", interrupt_at_step_3)
    run = tmp_path / "run"
    code = main(["train", "--out", str(run), "--max-iters", "6", "--eval-interval", "2", "--quiet",
                 "--sample-tokens", "0", "--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--block-size", "16"])
    err = capsys.readouterr().err.strip()
    assert code == 130
    assert err == (f"interrupted: training stopped at step 3; last checkpoint: {run / 'last'} (step 2); "
                   f"`llmlab train --out {run} --resume` continues from it")


def test_resume_on_another_number_of_ranks_keeps_the_global_batch_or_refuses(tmp_path):
    from llmlab.training import plan_run

    run = tmp_path / "run"
    train(TrainArgs(out=str(run), max_iters=2, eval_interval=2, **{**TINY, "batch_size": 6}))
    path = run / "last" / "config.json"
    meta = json.loads(path.read_text())
    assert meta["state"]["world"] == 1
    plan = plan_run(TrainArgs(out=str(run), resume=True, max_iters=4), world=3)
    assert (plan.args.batch_size, plan.global_batch) == (2, 6)
    assert plan_run(TrainArgs(out=str(run), resume=True, max_iters=4, batch_size=5), world=3).args.batch_size == 5
    with pytest.raises(LlmlabError, match="global batch of 6 rows, which 4 ranks cannot split evenly"):
        plan_run(TrainArgs(out=str(run), resume=True, max_iters=4), world=4)
