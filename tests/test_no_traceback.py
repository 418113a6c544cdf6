"""Bad input never ends in a traceback: each case below is one `error: ...` line and exit 2
(sample / eval / convert / plot, TOML settings, damaged runs). Each case once gave a traceback."""
from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

import llmlab
from llmlab.checkpoint import save_checkpoint
from llmlab.cli import main
from llmlab.tokenizer import ByteTokenizer, CharTokenizer

from conftest import tiny_model


def one_error_line(capsys, argv, *words) -> str:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert code == 2, (argv, out, err)
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    for w in words:
        assert w in err, (w, err)
    return err


@pytest.fixture
def run(tmp_path):
    """A tiny byte-level run (random weights) with a metrics file."""
    d = tmp_path / "run"
    save_checkpoint(d / "last", tiny_model(vocab_size=256, block_size=16).eval(), ByteTokenizer())
    (d / "metrics.jsonl").write_text('{"step": 0, "loss": 5.5}\n{"step": 0, "val_loss": 5.6, "train_loss": 5.5}\n')
    return d


def edit_config(run, fn):
    path = run / "last" / "config.json"
    meta = json.loads(path.read_text())
    fn(meta)
    path.write_text(json.dumps(meta))


@pytest.mark.parametrize("edit", [
    lambda m: m["model"].update(n_layer="2"),  # valid JSON, wrong type
    lambda m: m["model"].update(n_embd=None),
    lambda m: m["model"].update(position=3),
    lambda m: m["model"].update(dropout=[0.1]),
    lambda m: m.pop("model"),  # missing section
    lambda m: m.update(train=[1, 2]),
    lambda m: m["train"].update(data=7),
    lambda m: m.update(tokenizer={"kind": "byte"}),
], ids=["str-int", "null", "int-str", "list-float", "no-model", "train-list", "data-int", "tokenizer-dict"])
@pytest.mark.parametrize("command", ["sample", "eval"])
def test_config_with_wrong_types_or_missing_keys(capsys, run, edit, command):
    edit_config(run, edit)
    one_error_line(capsys, [command, run, "--max-new-tokens", "2"] if command == "sample" else [command, run],
                   "config.json")


def test_missing_model_key_is_a_weights_mismatch_not_a_traceback(capsys, run):
    edit_config(run, lambda m: m["model"].pop("n_layer"))  # default n_layer 4 != the 2 stored layers
    one_error_line(capsys, ["sample", run, "--max-new-tokens", "2"], "does not match")


def test_tokenizer_larger_than_the_model(capsys, run):
    CharTokenizer("".join(chr(0x4E00 + i) for i in range(300))).save(run / "last")  # 300 ids > 256
    edit_config(run, lambda m: m.update(tokenizer="char"))
    one_error_line(capsys, ["sample", run, "--max-new-tokens", "2"], "300 ids", "256")


def test_nan_weights(capsys, run):
    path = run / "last" / "model.safetensors"
    w = load_file(str(path))
    w["blocks.0.mlp.fc.weight"][0, 0] = float("nan")
    save_file(w, str(path))
    one_error_line(capsys, ["sample", run, "--max-new-tokens", "2"], "NaN")
    one_error_line(capsys, ["eval", run], "NaN")


@pytest.mark.parametrize("device", ["mps", "tpu", "meta", "xla", "", "gpu", "cuda:7"])
@pytest.mark.parametrize("command", ["sample", "eval"])
def test_devices_this_machine_lacks(capsys, run, device, command):
    if device.startswith("cuda") and torch.cuda.device_count() > 7:
        pytest.skip("this machine has that device")
    if device == "mps" and torch.backends.mps.is_available():
        pytest.skip("this machine has that device")
    one_error_line(capsys, [command, run, "--device", device], "--device")


@pytest.mark.parametrize("flags, words", [
    (["--temperature", "nan"], ["finite"]),
    (["--temperature", "inf"], ["finite"]),
    (["--temperature", "-1"], ["temperature"]),
    (["--top-p", "nan"], ["finite"]),
    (["--top-p", "1.5"], ["top_p"]),
    (["--top-k", "0"], ["top_k"]),
    (["--max-new-tokens", "1e12"], ["max-new-tokens"]),
    (["--max-new-tokens", "-3"], ["max_new_tokens"]),
    (["--seed", "1e20"], ["seed"]),
    (["--seed", str(10**20)], ["seed"]),
    (["--seed", "-1"], ["seed"]),
])
def test_bad_sampling_values(capsys, run, flags, words):
    one_error_line(capsys, ["sample", run, *flags], *words)


def test_cache_too_large_for_memory(capsys, tmp_path):
    d = tmp_path / "rope"
    save_checkpoint(d / "last", tiny_model(preset="rope", vocab_size=256).eval(), ByteTokenizer())
    one_error_line(capsys, ["sample", d, "--max-new-tokens", str(10**12)], "memory")


def test_model_too_large_for_memory(capsys, run):
    # a config whose weights would need terabytes: refused before anything is allocated
    edit_config(run, lambda m: m["model"].update(vocab_size=10**9, n_embd=4096, n_head=32))
    one_error_line(capsys, ["sample", run, "--max-new-tokens", "2"], "memory")
    with pytest.raises(llmlab.LlmlabError, match="memory"):
        llmlab.load(run)


# ---- TOML settings (train --config) ------------------------------------------------------------------
@pytest.mark.parametrize("toml, words", [
    ('lr = "abc"', ["lr", "float"]),
    ("beta1 = 5", ["beta1"]),
    ("beta2 = -0.5", ["beta2"]),
    ("max_iters = 2.5", ["max_iters", "int"]),
    ("max_iters = true", ["max_iters"]),
    ("compile = 1", ["compile", "bool"]),
    ('preset = ["flash"]', ["preset"]),
    ("lr = nan", ["lr", "finite"]),
    ("no_such_setting = 1", ["no_such_setting"]),
])
def test_toml_with_wrong_types(capsys, tmp_path, toml, words):
    cfg = tmp_path / "c.toml"
    cfg.write_text(toml + "\n")
    one_error_line(capsys, ["train", "--config", cfg, "--out", tmp_path / "r"], *words)
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("content", [bytes(range(256)) * 4, b"\xff\xfe\x00lr = 1"])
def test_toml_binary_file(capsys, tmp_path, content):
    cfg = tmp_path / "c.toml"
    cfg.write_bytes(content)
    one_error_line(capsys, ["train", "--config", cfg, "--out", tmp_path / "r"], "TOML")


def test_toml_directory(capsys, tmp_path):
    one_error_line(capsys, ["train", "--config", tmp_path, "--out", tmp_path / "r"], "config file")


# ---- plot --out ---------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", ["under-file", "empty", "dir-under-file"])
def test_plot_bad_out(capsys, run, tmp_path, bad):
    (tmp_path / "f").write_text("x")
    out = {"under-file": tmp_path / "f" / "loss.png", "empty": "", "dir-under-file": tmp_path / "f" / "a" / "b"}[bad]
    one_error_line(capsys, ["plot", run, "--out", out], "--out")
    assert (tmp_path / "f").read_text() == "x"


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere: no unwritable directory to test with")
def test_plot_unwritable_out(capsys, run, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    one_error_line(capsys, ["plot", run, "--out", locked / "loss.png"], "not writable")


def test_plot_out_directory_reports_the_file(capsys, run, tmp_path):
    assert main(["plot", str(run), "--out", str(tmp_path)]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {tmp_path / 'loss.png'}"
    assert (tmp_path / "loss.png").read_bytes().startswith(b"\x89PNG")
    assert main(["plot", str(run), "--out", str(tmp_path / "new") + "/"]) == 0  # DIR/ names a folder
    assert (tmp_path / "new" / "loss.png").read_bytes().startswith(b"\x89PNG")
    assert main(["plot", str(run), "--out", str(tmp_path / "loss.png")]) == 0  # an earlier plot is replaced


@pytest.mark.parametrize("target", ["checkpoint_config", "text_file", "txt_name", "png_name_not_png", "in_checkpoint"])
def test_plot_never_overwrites_what_is_not_a_plot(capsys, run, tmp_path, target):
    """--out RUN/last/config.json (PNG bytes over the checkpoint's config), a text file, a name that
    is not .png, a .png that is not a PNG, a new file inside a checkpoint: one line, nothing written."""
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "photo.png").write_text("not a png")
    out = {"checkpoint_config": run / "last" / "config.json", "text_file": tmp_path / "notes.txt",
           "txt_name": tmp_path / "curves.txt", "png_name_not_png": tmp_path / "photo.png",
           "in_checkpoint": run / "last" / "loss.png"}[target]
    before = {p: p.read_bytes() for p in [*run.rglob("*"), *tmp_path.glob("*.*")] if p.is_file()}
    err = one_error_line(capsys, ["plot", str(run), "--out", str(out)], "--out")
    assert "not a .png" in err or "not a PNG" in err or "inside a checkpoint" in err, err
    assert {p: p.read_bytes() for p in before} == before
    assert not (tmp_path / "curves.txt").exists()


def test_unwritable_out_simulated(capsys, run, tmp_path, monkeypatch):
    """The same refusal where the test runs as root (which may write anywhere): the directory
    reports itself unwritable through os.access, as it would for a normal user."""
    import llmlab.fsutil

    locked = tmp_path / "locked"
    locked.mkdir()
    real = os.access
    monkeypatch.setattr(llmlab.fsutil.os, "access", lambda p, mode: False if str(p) == str(locked) else real(p, mode))
    one_error_line(capsys, ["plot", run, "--out", locked / "loss.png"], "not writable")
    one_error_line(capsys, ["convert", run, "--to-hf", locked / "hf"], "not writable")
    assert list(locked.iterdir()) == []
