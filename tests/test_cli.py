"""The command line: each bad input is one clear line and exit 2, nothing overwritten; the
commands work end to end on a tiny trained run."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from llmlab.cli import main

TINY = ["--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--block-size", "16", "--batch-size", "4",
        "--eval-iters", "2", "--sample-tokens", "20", "--quiet"]


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_clear_error(code, err, *words):
    assert code == 2
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for w in words:
        assert w in lines[0], (w, lines[0])


@pytest.fixture(scope="module")
def char_run(tmp_path_factory, corpus_file):
    """A tiny char-level run on a slice of the built-in corpus (for sample/eval/convert/plot tests)."""
    out = tmp_path_factory.mktemp("runs") / "char"
    assert main(["train", *TINY, "--tokenizer", "char", "--data", str(corpus_file), "--max-iters", "20",
                 "--eval-interval", "10", "--out", str(out)]) == 0
    return out


def test_presets_lists_every_rung(capsys):
    from llmlab.presets import PRESETS

    code, out, _ = run_cli(capsys, "presets")
    assert code == 0
    for name, preset in PRESETS.items():
        assert any(ln.startswith(name) and preset.description in ln for ln in out.splitlines())


def test_train_prints_summary_and_sample(capsys, tmp_path):
    code, out, _ = run_cli(capsys, "train", *TINY, "--max-iters", "10", "--eval-interval", "5",
                           "--out", tmp_path / "r")
    assert code == 0
    assert "trained to step 10" in out and "--- sample ---" in out
    lines = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if "val_loss" in r] == [0, 5, 10]
    assert [r["step"] for r in lines if "loss" in r] == list(range(10))


def test_config_file_values_and_flag_override(capsys, tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text('max-iters = 4\neval_interval = 2\nn_embd = 24\nn_head = 3\n')
    code, out, _ = run_cli(capsys, "train", "--config", cfg, *TINY, "--n-embd", "16", "--out", tmp_path / "r")
    assert code == 0 and "trained to step 4" in out
    meta = json.loads((tmp_path / "r" / "last" / "config.json").read_text())
    assert meta["model"]["n_embd"] == 16 and meta["model"]["n_head"] == 2


@pytest.mark.parametrize("argv, words", [
    (["--preset", "nope"], ["unknown preset 'nope'", "llmlab presets"]),
    (["--data", "/no/such/file.txt"], ["data file not found", "/no/such/file.txt"]),
    (["--lr", "-1"], ["--lr must be a finite number > 0"]),
    (["--n-embd", "30", "--n-head", "4"], ["divisible by n_head"]),
    (["--block-size", "512", "--data", "SMALL"], ["block size 512", "lower --block-size"]),
    (["--max-iters", "-3"], ["--max-iters"]),
    (["--batch-threads", "2", "--dropout", "0.1"], ["--batch-threads needs dropout 0"]),
])
def test_train_bad_input(capsys, tmp_path, argv, words):
    out_dir = tmp_path / "r"
    small = tmp_path / "small.txt"
    small.write_text("to be or not to be " * 100)  # 1,900 bytes: the val split is shorter than 512
    argv = [str(small) if a == "SMALL" else a for a in argv]
    code, _, err = run_cli(capsys, "train", *TINY, "--max-iters", "2", "--out", out_dir, *argv)
    assert_clear_error(code, err, *words)
    assert not (out_dir / "last").exists()


def test_bad_toml_and_unknown_key(capsys, tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("max_iters = = 3")
    assert_clear_error(*run_cli(capsys, "train", "--config", bad)[::2], "not valid TOML")
    bad.write_text("max_iterz = 3")
    assert_clear_error(*run_cli(capsys, "train", "--config", bad)[::2], "max_iterz")


def test_existing_run_is_not_overwritten(capsys, char_run):
    before = {p: p.read_bytes() for p in (char_run / "last").iterdir()}
    code, _, err = run_cli(capsys, "train", *TINY, "--out", char_run)
    assert_clear_error(code, err, "already holds a run", "--resume")
    assert before == {p: p.read_bytes() for p in (char_run / "last").iterdir()}


def test_sample_streams_text(capsys, char_run):
    import llmlab
    from llmlab.sample import sample_text
    from llmlab.tokenizer import load_tokenizer

    code, out, _ = run_cli(capsys, "sample", char_run, "--prompt", "ROMEO:", "--max-new-tokens", "30", "--seed", "1")
    # exactly the prompt and 30 new characters (a char vocabulary has no end token), the text the
    # Python API gives for the same checkpoint, settings (CLI default temperature 0.8) and seed
    tok = load_tokenizer(char_run / "best")
    want = sample_text(llmlab.load(char_run), tok, "ROMEO:", 30, temperature=0.8, seed=1)
    assert code == 0 and out == want + "\n" and len(want) == len("ROMEO:") + 30
    code2, out2, _ = run_cli(capsys, "sample", char_run, "--prompt", "ROMEO:", "--max-new-tokens", "30",
                             "--seed", "1", "--no-cache")
    assert out2 == out  # the cache changes speed, not text


@pytest.mark.slow
def test_sample_compile_gives_the_same_greedy_text(capsys, char_run):
    args = ("sample", char_run, "--prompt", "ROMEO:", "--max-new-tokens", "30", "--temperature", "0")
    code, out, _ = run_cli(capsys, *args)
    code2, out2, _ = run_cli(capsys, *args, "--compile")
    assert code == code2 == 0 and out2 == out and len(out) > len("ROMEO:")
    code3, _, err = run_cli(capsys, *args, "--compile", "--no-cache")
    assert_clear_error(code3, err, "use_cache=False")


def test_sample_prompt_outside_char_vocab(capsys, char_run):
    code, out, err = run_cli(capsys, "sample", char_run, "--prompt", "日本")
    assert_clear_error(code, err, "'日'")
    assert out == ""


def test_sample_corrupt_checkpoint(capsys, tmp_path, char_run):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(char_run, broken)
    for sub in ("best", "last"):
        f = broken / sub / "model.safetensors"
        f.write_bytes(f.read_bytes()[:200])
    code, _, err = run_cli(capsys, "sample", broken)
    assert_clear_error(code, err, "truncated or corrupt")
    (broken / "best" / "config.json").write_text("{not json")
    code, _, err = run_cli(capsys, "sample", broken)
    assert_clear_error(code, err, "corrupt config.json")


def test_eval_reports_loss_and_perplexity(capsys, char_run):
    import math

    code, out, _ = run_cli(capsys, "eval", char_run)
    rec = json.loads(out.strip().splitlines()[-1])
    assert code == 0 and rec["tokens"] > 0
    assert rec["perplexity"] == pytest.approx(math.exp(rec["val_loss"]), rel=1e-3)
    from llmlab.tokenizer import load_tokenizer

    vocab = load_tokenizer(char_run / "best").vocab_size
    assert rec["val_loss"] < math.log(vocab)  # better than uniform over the characters


def test_plot_writes_png(capsys, char_run):
    code, out, _ = run_cli(capsys, "plot", char_run)
    png = char_run / "loss.png"
    assert code == 0 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_console_script_exit_code(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    proc = subprocess.run([sys.executable, "-m", "llmlab.cli", "train", "--preset", "nope", "--out", str(tmp_path)],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().startswith("error: unknown preset")


def test_convert_both_ways_keeps_logits(capsys, tmp_path):
    transformers = pytest.importorskip("transformers")
    import torch

    import llmlab

    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    hf.save_pretrained(tmp_path / "hf")
    code, out, _ = run_cli(capsys, "convert", "--from-hf", tmp_path / "hf", "--out", tmp_path / "run")
    assert code == 0 and "converted" in out
    code, out, _ = run_cli(capsys, "convert", tmp_path / "run", "--to-hf", tmp_path / "back")
    assert code == 0
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back").eval()
    idx = torch.randint(0, 64, (2, 12))
    with torch.no_grad():
        ref = hf(idx).logits
        assert (llmlab.load(tmp_path / "run")(idx) - ref).abs().max() <= 1e-4
        assert (back(idx).logits - ref).abs().max() <= 1e-4
    capsys.readouterr()
    code, _, err = run_cli(capsys, "convert", tmp_path / "run")
    assert_clear_error(code, err, "--to-hf")


def test_resume_keeps_the_runs_own_settings(capsys, tmp_path, corpus_file):
    out = tmp_path / "r"
    assert main(["train", *TINY, "--tokenizer", "char", "--data", str(corpus_file), "--max-iters", "6",
                 "--eval-interval", "3", "--out", str(out)]) == 0
    capsys.readouterr()
    code, out_text, _ = run_cli(capsys, "train", "--out", out, "--resume", "--max-iters", "9")
    assert code == 0 and "trained to step 9" in out_text
    meta = json.loads((out / "last" / "config.json").read_text())
    assert meta["tokenizer"] == "char" and meta["train"]["data"] == str(corpus_file)
    assert meta["model"]["n_embd"] == 16 and meta["state"]["step"] == 9
