"""`llmlab train`'s settings come from one place (issue 9): every TrainArgs field is a flag with
help and its default shown, booleans have --no-X, TOML files are checked with the same types, and
out-of-range values are one `error:` line from flags and files alike, before anything is written."""
import argparse
import dataclasses
import json
import re

import pytest

from llmlab.cli import build_parser, main, train_args
from llmlab.settings import default_text, flag_name
from llmlab.training import TrainArgs

TINY = ["--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--block-size", "16", "--batch-size", "4",
        "--eval-iters", "1", "--sample-tokens", "0", "--quiet", "--max-iters", "2", "--eval-interval", "2"]


def train_parser() -> argparse.ArgumentParser:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices["train"]


def one_error_line(capsys, argv, *words):
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    for w in words:
        assert w in lines[0], (w, lines[0])


def test_every_field_is_a_flag_with_help_and_its_default():
    p = train_parser()
    flags = {s: a for a in p._actions for s in a.option_strings}
    text = " ".join(p.format_help().split())  # unwrapped
    for f in dataclasses.fields(TrainArgs):
        action = flags[flag_name(f.name)]
        assert action.help and f.metadata["help"] in action.help, f.name
        assert f"(default: {default_text(f)})" in action.help, f.name
        assert re.search(re.escape(f"(default: {default_text(f)})"), text), f.name
        if f.type in (bool, "bool"):
            assert "--no-" + f.name.replace("_", "-") in flags, f.name


def test_flags_override_toml_which_overrides_defaults_and_no_x_turns_off(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text("compile = true\nquiet = true\nlr = 1e-3\nbeta1 = 0.8\nmax-iters = 7\n")
    a = train_args(build_parser().parse_args(["train", "--config", str(cfg), "--no-compile", "--lr", "5e-4",
                                              "--beta2", "0.95"]))
    assert (a.compile, a.quiet, a.lr, a.beta1, a.beta2, a.max_iters) == (False, True, 5e-4, 0.8, 0.95, 7)
    assert a.batch_size == TrainArgs().batch_size  # neither gave it: the default
    a = train_args(build_parser().parse_args(["train", "--compile", "--bias"]))
    assert a.compile is True and a.bias is True


def test_betas_reach_the_optimizer(tmp_path):
    assert main(["train", *TINY, "--beta1", "0.5", "--beta2", "0.75", "--out", str(tmp_path / "r")]) == 0
    meta = json.loads((tmp_path / "r" / "last" / "config.json").read_text())
    assert meta["state"]["optimizer"]["param_groups"][0]["betas"] == [0.5, 0.75]
    assert meta["train"]["beta1"] == 0.5


@pytest.mark.parametrize("toml, words", [('beta1 = "high"', ["beta1", "float"]), ("resume = 1", ["resume", "bool"]),
                                         ('tokenizer = "words"', ["--tokenizer", "byte, char, bpe"]),
                                         ("grad_clip = -1", ["--grad-clip"]), ("beta2 = 1.0", ["--beta2"]),
                                         ('out = ""', ["--out"])])
def test_toml_value_of_wrong_type_or_range_is_one_line(capsys, tmp_path, toml, words):
    cfg = tmp_path / "c.toml"
    cfg.write_text(toml + "\n")
    out = [] if toml.startswith("out") else ["--out", tmp_path / "r"]  # a flag would win over the file
    one_error_line(capsys, ["train", "--config", cfg, *out], *words)
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("argv, words", [
    (["--beta1", "5"], ["--beta1 must be in [0, 1), got 5.0"]),
    (["--beta1", "-0.1"], ["--beta1"]),
    (["--beta2", "1"], ["--beta2 must be in [0, 1)"]),
    (["--sample-tokens", "-1"], ["--sample-tokens must be in [0, 100,000]"]),
    (["--sample-tokens", str(10**12)], ["--sample-tokens must be in [0, 100,000]"]),
    (["--out", "x" * 300], ["--out", "File name too long"]),
    (["--out", ""], ["--out is empty"]),
    (["--out", "  "], ["--out is empty"]),
    (["--grad-clip", "nan"], ["--grad-clip", "finite"]),
    (["--grad-clip", "-1"], ["--grad-clip must be a finite number >= 0"]),
    (["--weight-decay", "-1"], ["--weight-decay must be a finite number >= 0"]),
    (["--weight-decay", "inf"], ["--weight-decay", "finite"]),
    (["--lr", "inf"], ["--lr", "finite"]),
    (["--lr", "1e400"], ["--lr", "finite"]),
    (["--seed", str(2**64)], ["--seed must be in [0, 2^63)"]),
    (["--seed", "-1"], ["--seed must be in [0, 2^63)"]),
    (["--tokenizer", "bpe", "--vocab-size", str(10**9)], ["--vocab-size must be in [1, 1,048,576]"]),
    (["--data", ""], ["--data is empty"]),
    (["--batch-size", str(10**9)], ["training on batches of 1000000000", "needs about", "--batch-size"]),
    (["--min-lr", "0.1", "--lr", "0.01"], ["--min-lr 0.1 is above --lr 0.01"]),
    (["--device", "mps"], ["--device mps", "not available"]),
    (["--device", "tpu"], ["--device", "tpu"]),
    (["--device", "meta"], ["--device meta is not supported"]),
    (["--device", "xla"], ["--device", "xla"]),
    (["--device", ""], ["--device ''"]),
    (["--device", "gpu"], ["--device 'gpu' is not a device name"]),
    (["--compile", "yes"], ["unrecognized arguments: yes"]),
])
def test_refused_settings_are_one_line_and_write_nothing(capsys, tmp_path, argv, words):
    out = [] if "--out" in argv else ["--out", tmp_path / "r"]
    one_error_line(capsys, ["train", *TINY, *out, *argv], *words)
    assert not (tmp_path / "r").exists()


def test_out_that_is_a_file_or_under_one_and_a_model_too_large_are_one_line(capsys, tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    one_error_line(capsys, ["train", *TINY, "--out", f], "--out", "is a file, not a directory")
    one_error_line(capsys, ["train", *TINY, "--out", f / "sub"], "is under", "which is a file")
    assert f.read_text() == "x"
    # ~10 TB of weights, gradients and AdamW moments: refused before anything is allocated
    one_error_line(capsys, ["train", *TINY, "--out", tmp_path / "big", "--n-layer", "200", "--n-embd", "16384",
                            "--n-head", "16"], "needs about", "GiB", "free")


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has CUDA")
def test_train_device_cuda_without_cuda_is_one_line(capsys, tmp_path):
    one_error_line(capsys, ["train", *TINY, "--out", tmp_path / "r", "--device", "cuda"], "CUDA is not available")


def test_resume_of_a_run_without_a_checkpoint_starts_it(capsys, tmp_path):
    """A run that stopped before its first checkpoint (see test_fault_injection) has nothing to
    continue: --resume starts it from step 0 and says so, giving the uninterrupted run."""
    assert main(["train", *TINY, "--out", str(tmp_path / "ref")]) == 0
    run = tmp_path / "r"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 0, "val_loss": 9.0, "train_loss": 9.0, "perplexity": 1.0}\n')
    capsys.readouterr()
    loud = [x for x in TINY if x != "--quiet"]  # the note is a log line
    assert main(["train", *loud, "--out", str(run), "--resume"]) == 0
    assert "has no checkpoint (none was written yet): starting it from step 0" in capsys.readouterr().err

    def recs(d):
        return [{k: v for k, v in json.loads(x).items() if k != "tokens_per_s"}
                for x in (d / "metrics.jsonl").read_text().splitlines()]
    assert recs(run) == recs(tmp_path / "ref")


def test_readme_lists_every_train_flag():
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme[readme.index("### `llmlab train`"):readme.index("- Data: no `--data`")]
    for f in dataclasses.fields(TrainArgs):
        assert re.search(re.escape(flag_name(f.name)) + r"[ /`\n]", section), f.name


def test_kind_flags_build_that_model_and_a_resume_keeps_them(capsys, tmp_path):
    """--attention/--position/--norm/--mlp/--tie-embeddings/--kv-lora-rank change one part of a preset."""
    run = tmp_path / "r"
    assert main(["train", *TINY, "--preset", "kv_cache", "--norm", "rmsnorm", "--mlp", "swiglu", "--position",
                 "rope", "--no-tie-embeddings", "--out", str(run)]) == 0
    model = json.loads((run / "last" / "config.json").read_text())["model"]
    assert (model["norm"], model["mlp"], model["position"], model["tie_embeddings"]) == ("rmsnorm", "swiglu",
                                                                                         "rope", False)
    runtime = json.loads((run / "last" / "config.json").read_text())["runtime"]
    assert model["attention"] == "mha" and (runtime["attention"], runtime["cache"]) == ("sdpa", "dense")  # the preset's
    one_error_line(capsys, ["train", *TINY, "--out", run, "--resume", "--max-iters", "4", "--norm", "layernorm"],
                   "--norm layernorm differs from the run's rmsnorm")
    mla = tmp_path / "mla"
    assert main(["train", *TINY, "--preset", "kv_cache", "--attention", "mla", "--kv-lora-rank", "8",
                 "--out", str(mla)]) == 0
    model = json.loads((mla / "last" / "config.json").read_text())["model"]
    assert model["attention"] == "mla" and model["kv_lora_rank"] == 8


@pytest.mark.parametrize("argv, words", [(["--norm", "batchnorm"], ["unknown norm 'batchnorm'", "rmsnorm"]),
                                         (["--attention", "linear"], ["unknown attention", "mla"]),
                                         (["--kv-lora-rank", "8"], ["kv_lora_rank", "mla"]),
                                         (["--tie-embeddings", "no"], ["unrecognized arguments: no"])])
def test_bad_kinds_are_one_line(capsys, tmp_path, argv, words):
    one_error_line(capsys, ["train", *TINY, "--out", tmp_path / "r", *argv], *words)
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("field, value", [("lr", float("inf")), ("weight_decay", float("inf")),
                                          ("min_lr", float("nan")), ("seed", 2**64)])
def test_python_callers_get_the_same_range_checks(tmp_path, field, value):
    from llmlab import LlmlabError
    from llmlab.training import train

    with pytest.raises(LlmlabError, match="--" + field.replace("_", "-")):
        train(TrainArgs(out=str(tmp_path / "r"), **{field: value}))
    assert not (tmp_path / "r").exists()


def test_min_lr_zero_stays_zero_and_beta1_zero_is_accepted(tmp_path):
    """An explicit --min-lr 0 is the cosine's floor (not the lr/10 default); beta1 0 is a valid AdamW."""
    run = tmp_path / "r"
    assert main(["train", *TINY, "--max-iters", "4", "--warmup-iters", "0", "--lr-decay-iters", "2", "--lr", "0.01",
                 "--min-lr", "0", "--beta1", "0", "--out", str(run)]) == 0
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    lrs = {r["step"]: r["lr"] for r in recs if "lr" in r}
    assert lrs[0] == 0.01 and lrs[2] == 0.0 and lrs[3] == 0.0  # past lr_decay_iters: exactly min_lr
    meta = json.loads((run / "last" / "config.json").read_text())
    assert meta["state"]["optimizer"]["param_groups"][0]["betas"][0] == 0.0
