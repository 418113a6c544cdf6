"""Issue 16's traceback classes, each as a table or a fuzz over its kind of input: the Python API
(types, sizes, prompts, caches), stdout that closes or fills, `bench decode`'s flags, a hand-edited
checkpoint, HF configs with wrong types, damaged sharded checkpoints. Each is one LlmlabError or
one `error:` line with a non-zero exit (or a clean result), never a traceback."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings, strategies as st

import llmlab
from llmlab import LlmlabError
from llmlab.cli import main

from conftest import tiny_model

REPO = Path(__file__).resolve().parents[1]


# ---- the Python API ---------------------------------------------------------------------------
@pytest.mark.parametrize("field, value", [
    ("kv_lora_rank", True), ("vocab_size", 64.5), ("vocab_size", True), ("n_layer", -1), ("n_head", 0),
    ("n_embd", "128"), ("n_kv_head", 0), ("head_dim", -4), ("intermediate_size", 0), ("dropout", 1.5),
    ("dropout", True), ("rope_theta", 0.0), ("rope_theta", -1.0), ("rope_theta", float("nan")),
    ("norm_eps", -1e-5), ("norm_eps", float("nan")), ("bias", 1), ("block_size", 2.0), ("tie_embeddings", "yes"),
])
def test_model_config_values_of_the_wrong_type_or_range(field, value):
    kw = {"attention": "mla"} if field == "kv_lora_rank" else {}
    with pytest.raises(LlmlabError, match=field):
        llmlab.preset_config("flash", **kw, **{field: value}) if not kw else llmlab.ModelConfig(**kw, **{field: value})


@pytest.fixture(scope="module")
def model():
    return tiny_model(preset="kv_cache").eval()


@pytest.mark.parametrize("prompts, words", [
    (torch.zeros(1, 0, dtype=torch.long), "at least one token"),
    (torch.zeros(2, 3, 4, dtype=torch.long), "(batch, tokens)"),
    (torch.zeros(1, 3), "integers"),
    (torch.tensor([[1, 2, 97]]), "[0, 97)"),
    (torch.tensor([[-1, 2]]), "[0, 97)"),
    ([], "at least one token"),
    ([[1, 2], []], "at least one token"),
    ([[1, 2.5]], "integers"),
    ([[1, 200]], "[0, 97)"),
    ([["a"]], "integers"),
])
def test_generate_refuses_bad_prompts(model, prompts, words):
    with pytest.raises(LlmlabError, match=words.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        llmlab.generate(model, prompts, 2)


@pytest.mark.parametrize("kw, words", [
    (dict(max_new_tokens=-1), "max_new_tokens"), (dict(max_new_tokens=2.5), "max_new_tokens"),
    (dict(max_new_tokens=True), "max_new_tokens"), (dict(temperature=float("nan")), "temperature"),
    (dict(temperature="hot"), "temperature"), (dict(top_k=0), "top_k"), (dict(top_k=1.5), "top_k"),
    (dict(top_p=0.0), "top_p"), (dict(top_p="x"), "top_p"), (dict(seed=2**70), "seed"), (dict(seed=-1), "seed"),
])
def test_generate_refuses_bad_settings(model, kw, words):
    args = dict(max_new_tokens=2) | kw
    with pytest.raises(LlmlabError, match=words):
        llmlab.generate(model, torch.tensor([[1, 2]]), **args)


@pytest.mark.parametrize("batch, max_len", [(0, 8), (-1, 8), (1, -5), (1.5, 8), (True, 8), (1, "8")])
def test_new_cache_refuses_bad_sizes(model, batch, max_len):
    with pytest.raises(LlmlabError, match="new_cache"):
        model.new_cache(batch, max_len)


def test_tiny_temperature_is_greedy_not_nan(model):
    x = torch.tensor([[1, 2, 3]])
    greedy = llmlab.generate(model, x, 5, temperature=0)
    assert torch.equal(llmlab.generate(model, x, 5, temperature=1e-300, seed=0), greedy)


def test_huge_max_new_tokens_on_learned_positions_keeps_only_the_window(model):
    """The token buffer is the rolling window, never the whole requested output."""
    it = llmlab.stream(model, torch.tensor([[1, 2, 3]]), 10**12, temperature=0)
    got = [int(next(it)[0]) for _ in range(40)]  # past block_size 32: the window rolls
    it.close()
    assert got == llmlab.generate(model, torch.tensor([[1, 2, 3]]), 40, temperature=0)[0, 3:].tolist()


# ---- stdout -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from llmlab.checkpoint import save_checkpoint
    from llmlab.tokenizer import ByteTokenizer

    d = tmp_path_factory.mktemp("run") / "run"
    save_checkpoint(d / "last", tiny_model(vocab_size=256, block_size=16).eval(), ByteTokenizer())
    return d


def _llmlab(args: list[str], **kw) -> subprocess.CompletedProcess:
    env = {"PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    return subprocess.run(f"{sys.executable} -m llmlab " + " ".join(args), shell=True, env=env, capture_output=True,
                          text=True, errors="replace", timeout=120, **kw)


def test_stdout_closed_early_is_a_clean_exit(run):
    r = _llmlab(["sample", str(run), "--max-new-tokens", "2000", "--seed", "1", "|", "head", "-c", "1",
                 ";", "echo", "status=${PIPESTATUS[0]}"], executable="/bin/bash")
    assert r.stdout.endswith("status=0\n") and r.stderr == "", (r.stdout, r.stderr)


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="no /dev/full on this system")
def test_stdout_on_a_full_disk_is_one_line(run):
    r = _llmlab(["sample", str(run), "--max-new-tokens", "50", "--seed", "1", ">", "/dev/full"])
    assert r.returncode == 2 and r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, r.stderr
    assert "No space left" in r.stderr


# ---- bench decode -------------------------------------------------------------------------------
@pytest.mark.parametrize("flags, words", [
    (["--threads", "100000"], "--threads must be in"), (["--threads", "-1"], "--threads must be in"),
    (["--seed", str(2**70)], "--seed"), (["--new-tokens", str(10**9)], "within"),
    (["--contexts", "10000000"], "within"), (["--prompt-len", str(10**7)], "within"),
    (["--repeats", "1000000"], "--repeats"), (["--decode-steps", "0"], "--decode-steps"),
])
def test_bench_decode_flags_out_of_range(capsys, flags, words):
    assert main(["bench", "decode", "--no-hf", "--no-compile", *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and words in err and err.count("\n") == 1, err


# ---- hand-edited checkpoints and HF configs ------------------------------------------------------
@pytest.mark.parametrize("edit, words", [
    (lambda m: m["state"].update(step="ten"), "state.step"),
    (lambda m: m["state"].update(step=-3), "state.step"),
    (lambda m: m["state"].pop("optimizer"), "optimizer"),
    (lambda m: m["state"].update(best_val_loss="low"), "best_val_loss"),
])
def test_hand_edited_train_state_is_one_line(tmp_path, capsys, edit, words):
    from llmlab.training import TrainArgs, train

    out = tmp_path / "run"
    train(TrainArgs(out=str(out), n_layer=1, n_head=2, n_embd=16, block_size=16, batch_size=2, eval_iters=1,
                    max_iters=2, eval_interval=2, sample_tokens=0, quiet=True))
    path = out / "last" / "config.json"
    meta = json.loads(path.read_text())
    edit(meta)
    path.write_text(json.dumps(meta))
    assert main(["train", "--out", str(out), "--resume", "--max-iters", "4", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and words in err and err.count("\n") == 1, err


def test_hf_rope_theta_of_the_wrong_type_is_one_line(tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    src = tmp_path / "hf"
    cfg = transformers.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                   num_attention_heads=2, max_position_embeddings=16)
    transformers.LlamaForCausalLM(cfg).save_pretrained(src)
    raw = json.loads((src / "config.json").read_text())
    raw["rope_theta"] = "big"
    raw.get("rope_parameters", {}).update(rope_theta="big")
    (src / "config.json").write_text(json.dumps(raw))
    capsys.readouterr()  # save_pretrained's progress bar
    assert main(["convert", "--from-hf", str(src), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()


# ---- damaged sharded checkpoints: one line on stderr, nothing from torch's logger ---------------
@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    from llmlab.training import TrainArgs, train

    out = tmp_path_factory.mktemp("sharded") / "run"
    train(TrainArgs(out=str(out), parallel="fsdp", n_layer=1, n_head=2, n_embd=16, block_size=16, batch_size=2,
                    eval_iters=1, max_iters=2, eval_interval=2, sample_tokens=0, quiet=True))
    return out


@pytest.mark.parametrize("damage", ["missing", "empty", "truncated", "garbage_header", "no_dcp_folder"])
def test_damaged_sharded_checkpoint_is_one_line(tmp_path, capfd, sharded, damage):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(sharded, run)
    shard = next((run / "last" / "dcp").glob("*.safetensors"))  # one rank: one shard, its header the metadata
    data = shard.read_bytes()
    if damage == "missing":  # the dcp folder left empty
        shard.unlink()
    elif damage == "no_dcp_folder":  # the manifest says sharded, the folder is gone
        shutil.rmtree(run / "last" / "dcp")
    elif damage == "empty":
        shard.write_bytes(b"")
    elif damage == "truncated":
        shard.write_bytes(data[: len(data) // 2])
    else:
        shard.write_bytes(b"\xff" * 8 + data[8:])
    capfd.readouterr()
    assert main(["convert", str(run / "last"), "--out", str(tmp_path / "single")]) == 2
    out, err = capfd.readouterr()
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err


@settings(max_examples=25, deadline=None)
@given(cut=st.integers(min_value=0, max_value=4000))
def test_any_truncation_of_a_shard_is_one_line(tmp_path_factory, sharded, cut):
    import shutil

    run = tmp_path_factory.mktemp("cut") / "run"
    shutil.copytree(sharded, run)
    shard = next((run / "last" / "dcp").iterdir())
    shard.write_bytes(shard.read_bytes()[:cut])
    with pytest.raises(LlmlabError):
        from llmlab.training.dcp import to_single

        to_single(run / "last", run.parent / "single")
