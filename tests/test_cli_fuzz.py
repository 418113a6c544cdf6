"""Fuzzing the sample / eval / convert / plot flags with bad values: never a traceback, never exit 0,
always exactly one `error: ...` line. In-process through llmlab.cli.main; a few seconds in all."""
from __future__ import annotations

import re

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import llmlab
from llmlab.checkpoint import save_checkpoint
from llmlab.cli import main
from llmlab.tokenizer import ByteTokenizer

from conftest import tiny, tiny_model

FUZZ = settings(max_examples=40, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    run = root / "run"
    save_checkpoint(run / "last", tiny_model(vocab_size=256, block_size=16).eval(), ByteTokenizer())
    (run / "metrics.jsonl").write_text('{"step": 0, "loss": 5.5}\n')
    (root / "file").write_text("x")
    return {"run": str(run), "file": str(root / "file"), "root": root}


def usable_device(name: str) -> bool:
    name = name.strip()
    if name in ("auto", "cpu") or re.fullmatch(r"cpu:\d+", name):
        return True
    return name.startswith("cuda") and torch.cuda.is_available()


NOT_FLOAT = st.sampled_from(["nan", "inf", "-inf", "abc", "", "1e400", "0x10", "1,5"])
NOT_INT = st.sampled_from(["abc", "", "1.5", "1e12", "1e20", "nan", "0x10"]) | st.text(max_size=6).filter(
    lambda t: not re.fullmatch(r"\s*[-+]?\d+(_\d+)*\s*", t))
BAD_DEVICE = st.text(max_size=10).filter(lambda d: not usable_device(d))
SAMPLE_BAD = st.one_of(
    st.tuples(st.just("--temperature"), NOT_FLOAT | st.sampled_from(["-1", "-1e-9"])),
    st.tuples(st.just("--top-p"), NOT_FLOAT | st.sampled_from(["0", "-0.5", "1.0001", "7"])),
    st.tuples(st.just("--top-k"), NOT_INT | st.integers(-10**6, 0).map(str)),
    st.tuples(st.just("--max-new-tokens"), NOT_INT | st.integers(-10**9, -1).map(str)),
    st.tuples(st.just("--seed"), NOT_INT | st.integers(2**63, 2**80).map(str) | st.integers(-10**20, -1).map(str)),
    st.tuples(st.just("--device"), BAD_DEVICE),
)


def assert_one_error_line(capsys, argv):
    code = main(argv)
    out, err = capsys.readouterr()
    assert code != 0, (argv, out)
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), (argv, err)


@FUZZ
@given(bad=SAMPLE_BAD)
def test_sample_bad_values(capsys, paths, bad):
    assert_one_error_line(capsys, ["sample", paths["run"], "--max-new-tokens", "2", "--seed", "0", *bad])


@FUZZ
@given(bad=st.one_of(st.tuples(st.just("--device"), BAD_DEVICE),
                     st.tuples(st.just("--max-tokens"), NOT_INT | st.integers(-10**6, 0).map(str))))
def test_eval_bad_values(capsys, paths, bad):
    assert_one_error_line(capsys, ["eval", paths["run"], *bad])


def bad_out(paths):
    """Output paths that can never be written: empty, a file, under a file, with a NUL byte."""
    return st.sampled_from(["", paths["file"], paths["file"] + "/sub", paths["file"] + "/a/b", "bad\0name"])


@FUZZ
@given(data=st.data())
def test_convert_bad_values(capsys, paths, data):
    out = data.draw(bad_out(paths))
    src = data.draw(st.sampled_from([paths["file"], str(paths["root"] / "missing"), paths["run"], ""]))
    argv = data.draw(st.sampled_from([
        ["convert", paths["run"], "--to-hf", out],
        ["convert", "--from-hf", src, "--out", str(paths["root"] / "new")],
        ["convert", "--from-hf", src, "--out", out],
        ["convert", paths["run"]],
        ["convert", "--to-hf", out],
    ]))
    assert_one_error_line(capsys, argv)
    assert not (paths["root"] / "new").exists()


@FUZZ
@given(data=st.data())
def test_plot_bad_values(capsys, paths, data):
    out = data.draw(bad_out(paths).filter(lambda o: o != paths["file"]))  # an existing file is a fine PNG path
    run = data.draw(st.sampled_from([paths["run"], paths["file"], str(paths["root"] / "missing")]))
    assert_one_error_line(capsys, ["plot", run, "--out", out])


# ---- train: every flag derived from TrainArgs, and the same keys in a TOML file --------------------
def _train_bad_values():
    """(flag, bad value) for every TrainArgs field: wrong type for all, out of range where a range
    exists. Only values that must be refused (a valid one would start training and exit 0)."""
    import dataclasses
    import typing

    from llmlab.settings import base_type, flag_name
    from llmlab.training.args import TrainArgs

    positive = {"batch_size", "grad_accum", "eval_interval", "eval_iters", "batch_threads", "lr_decay_iters",
                "n_layer", "n_head", "n_kv_head", "n_embd", "block_size", "kv_lora_rank"}
    non_negative = {"max_iters", "warmup_iters", "sample_tokens"}
    float_ranges = {"lr": ["0", "-1e-3"], "min_lr": ["-1"], "weight_decay": ["-1"], "grad_clip": ["-1"],
                    "beta1": ["1", "5", "-0.1"], "beta2": ["1.5", "-1"], "dropout": ["1", "-0.5", "2"]}
    hints = typing.get_type_hints(TrainArgs)
    cases = []
    for f in dataclasses.fields(TrainArgs):
        tp, _ = base_type(hints[f.name])
        flag = flag_name(f.name)
        if tp is bool:
            cases.append(st.tuples(st.just(flag), st.just("maybe")))  # a bool flag takes no value
        elif tp is int:
            bad = NOT_INT
            if f.name in positive:
                bad = bad | st.integers(-10**6, 0).map(str)
            elif f.name in non_negative:
                bad = bad | st.integers(-10**6, -1).map(str)
            cases.append(st.tuples(st.just(flag), bad))
        elif tp is float:
            cases.append(st.tuples(st.just(flag), NOT_FLOAT | st.sampled_from(float_ranges.get(f.name, ["nan"]))))
        elif "choices" in f.metadata:
            cases.append(st.tuples(st.just(flag), st.text(max_size=8).filter(lambda t, c=f.metadata["choices"]: t not in c)))
        elif f.name == "device":
            cases.append(st.tuples(st.just(flag), BAD_DEVICE))
        elif f.name in ("attention", "position", "norm", "mlp"):  # a kind: any name not registered
            import llmlab.model  # noqa: F401 - fills the registry
            from llmlab.registry import names

            cases.append(st.tuples(st.just(flag), st.text(max_size=8).filter(lambda t, k=names(f.name): t not in k)))
    return st.one_of(cases)


@FUZZ
@given(bad=_train_bad_values())
def test_train_bad_flag_values(capsys, paths, bad):
    out = paths["root"] / "train-run"
    assert_one_error_line(capsys, ["train", "--out", str(out), "--max-iters", "1", "--quiet", *bad])
    assert not (out / "last").exists()


TOML_WRONG = st.sampled_from(['"abc"', "[1, 2]", "{ a = 1 }", "1979-05-27", "nan"])


@FUZZ
@given(data=st.data())
def test_train_bad_toml_values(capsys, paths, data):
    """Each TrainArgs key given a value of the wrong type (or a non-finite number) in a TOML file."""
    import dataclasses

    from llmlab.training.args import TrainArgs

    key = data.draw(st.sampled_from([f.name for f in dataclasses.fields(TrainArgs)]))
    value = data.draw(TOML_WRONG)
    if value == "nan" and key in ("data", "out", "device", "preset", "tokenizer", "parallel"):
        value = "[1]"  # nan is only wrong for numbers; a string key needs a non-string
    if value == '"abc"' and key in ("data", "out", "device"):
        value = "[1]"  # any string is a path or a device name to check later: use a non-string
    cfg = paths["root"] / "bad.toml"
    cfg.write_text(f"{key} = {value}\nmax_iters = 1\n")
    out = paths["root"] / "toml-run"
    assert_one_error_line(capsys, ["train", "--config", str(cfg), "--out", str(out), "--quiet"])
    assert not (out / "last").exists()
