"""Smoke tests of the benchmarks: they run end to end at tiny sizes and end with a JSON line.
No timing is asserted (the numbers depend on the machine and its load)."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llmlab import bench, cli

REPO = Path(__file__).resolve().parents[1]
from conftest import SHAKESPEARE, needs_shakespeare  # noqa: E402
TINY = ["--prompt-len", "4", "--new-tokens", "3", "--contexts", "8,16", "--repeats", "1", "--decode-steps", "2",
        "--no-compile"]


@pytest.fixture(autouse=True)
def keep_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def last_json(text: str) -> dict:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    assert lines, "no output"
    return json.loads(lines[-1])


@pytest.mark.slow
def test_decode_bench_end_to_end(capsys):
    """With HF and the compiled runs (one compile of the bench model: tens of seconds)."""
    pytest.importorskip("transformers")
    assert bench.main([a for a in TINY if a != "--no-compile"]) == 0
    out = capsys.readouterr().out
    summary = last_json(out)
    for key in ("hf_tokens_per_s", "llmlab_cached_tokens_per_s", "llmlab_uncached_tokens_per_s", "ratio",
                "llmlab_compiled_tokens_per_s", "compiled_ratio", "compile_s", "contexts", "cache_bytes_per_token"):
        assert key in summary, key
    assert [c["context"] for c in summary["contexts"]] == [8, 16]
    for name in ("Table 1", "Table 2", "Table 3"):
        assert name in out
    # every llmlab path gives the same greedy tokens: cached, recomputed, compiled (and HF's, same weights)
    assert summary["uncached_tokens_same"] is True and summary["compiled_tokens_same"] is True
    assert all(c["compiled_tokens_same"] for c in summary["contexts"])
    if summary["weights_shared"]:
        assert summary["tokens_match"] is True


def test_decode_bench_via_cli_without_hf(capsys):
    assert cli.main(["bench", "decode", "--no-hf", *TINY]) == 0
    summary = last_json(capsys.readouterr().out)
    assert summary["hf_tokens_per_s"] is None and summary["llmlab_cached_tokens_per_s"] > 0


def test_decode_bench_llama_shape_runs(capsys):
    """The Llama shape is supported: it must run (a "skipped" summary also has shape llama, so
    the shape alone proves nothing), decode tokens and agree between cached and recomputed paths."""
    assert bench.main(["--shape", "llama", "--no-hf", *TINY]) == 0
    summary = last_json(capsys.readouterr().out)
    assert summary["shape"] == "llama" and "skipped" not in summary
    assert summary["llmlab_cached_tokens_per_s"] > 0 and summary["uncached_tokens_same"] is True
    assert [c["context"] for c in summary["contexts"]] == [8, 16]


def test_decode_bench_help(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["bench", "decode", "--help"])
    assert e.value.code == 0
    assert "--shape" in capsys.readouterr().out


def test_cache_bytes_per_token_equals_formula_for_every_preset():
    """Measured bytes vs the formula written out here from each preset's config (fp32)."""
    from llmlab import preset_config
    from llmlab.presets import preset_runtime

    rows = {r["name"]: r for r in bench.cache_bytes_rows()}
    assert {"mqa", "gqa", "naive_mla", "rope_mla"} <= set(rows)
    for name, r in rows.items():
        c = preset_config(name, n_layer=bench.N_LAYER, n_embd=bench.N_EMBD, n_head=bench.N_HEAD)
        if not preset_runtime(name).uses_cache:  # basic, flash: generation recomputes, nothing is cached
            assert r["measured"] is None and r["formula"] is None, r
            continue
        per_layer = c.latent_dim + c.rope_head_dim if c.attention == "mla" else 2 * c.kv_heads * c.head_size
        assert r["measured"] == r["formula"] == c.n_layer * per_layer * 4, r
    assert rows["rope_mla"]["measured"] == 4 * (4 * 32 + 16) * 4  # d_c = 4*head_dim, d_r = head_dim/2


def test_cache_table_says_which_rungs_cache_and_how_heads_share(capsys):
    """basic/flash keep no cache (as compare reports); the attention column names the sharing
    (8 heads: mqa 1 key/value head, gqa and llama 2), not the kind's registry name `mha`."""
    entries = bench.cache_bytes_rows()
    labels = {e["name"]: e["attention"] for e in entries}
    assert labels["kv_cache"] == "MHA" and labels["mqa"] == "MQA" and labels["gqa"] == labels["llama"] == "GQA-2"
    assert labels["rope_mla"] == "MLA d_c=128 d_r=16" and labels["naive_mla"] == "MLA d_c=128 d_r=0"
    bench.print_cache_bytes(entries)
    lines = {ln.split()[0]: ln for ln in capsys.readouterr().out.splitlines() if ln.strip()}
    for name in ("basic", "flash"):
        assert "no cache (recomputes)" in lines[name] and "8,192" not in lines[name]
    assert "2,048 (yes)" in lines["gqa"] and "GQA-2" in lines["gqa"]  # 4 layers x 2 x 2 heads x 32 x 4 B


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_script_{name}", REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@needs_shakespeare
def test_train_benchmark_script_prints_json(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LLMLAB_CACHE", str(tmp_path / "cache"))  # never touch the real token cache
    script = load_script("train_shakespeare_char")  # in-process: torch is imported once for the file
    rc = script.main(["--data", str(SHAKESPEARE), "--max-iters", "20", "--eval-interval", "20",
                      "--threads", "1", "--no-full-val", "--no-compile"])
    assert rc == 0
    summary = last_json(capsys.readouterr().out)
    assert set(summary) == {"val_loss", "tokens_per_s", "iters"}
    assert summary["iters"] == 20 and summary["tokens_per_s"] > 0 and summary["val_loss"] > 0


def test_decode_script_wrapper(capsys):
    assert load_script("decode").main(["--no-hf", *TINY]) == 0
    assert "llmlab_cached_tokens_per_s" in last_json(capsys.readouterr().out)


@pytest.mark.parametrize("entry", [["benchmarks/decode.py"], ["-m", "llmlab.bench", "decode"]])
@pytest.mark.parametrize("flags", [["--repeats", "x"], ["--contexts", "8,x"], ["--shape", "nope"]])
def test_decode_script_bad_flags_are_one_line(entry, flags):
    """Started as a script or a module (not through the CLI's handler): still one line, exit 2."""
    proc = subprocess.run([sys.executable, *entry, *flags], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO / "src")}, timeout=120)
    assert proc.returncode == 2 and proc.stderr.startswith("error:"), proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr


def test_train_benchmark_missing_data(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "train_shakespeare_char.py"), "--data", str(tmp_path / "nope.txt")],
        capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO / "src")}, timeout=120)
    assert proc.returncode == 2
    assert "not found" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_nanogpt_stand_in_has_llmlab_flash_logits():
    """The speed comparison is fair only if the stand-in is the same model: copy llmlab's weights
    into it (nanoGPT's own parameter names) and compare logits and loss."""
    from llmlab.model import Transformer
    from llmlab.presets import preset_config

    ref_mod = load_script("nanogpt_reference")
    model = Transformer(preset_config("flash", vocab_size=65, n_layer=2, n_head=4, n_embd=32, block_size=16,
                                      bias=False)).eval()
    ref = ref_mod.NanoGPT(65, 16, n_layer=2, n_head=4, n_embd=32).eval()
    names = {"tok_emb": "wte", "pos": "wpe", "blocks": "h", "norm1": "ln_1", "norm2": "ln_2", "norm_f": "ln_f",
             "attn.qkv": "attn.c_attn", "attn.proj": "attn.c_proj", "mlp.fc": "c_fc", "mlp.proj": "c_proj"}
    theirs = {}
    for name, p in model.state_dict().items():
        for ours, nano in names.items():
            name = name.replace(ours, nano)
        theirs[name] = p
    missing, unexpected = ref.load_state_dict(theirs, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}  # tied to wte
    x, y = torch.randint(65, (3, 16)), torch.randint(65, (3, 16))
    logits, loss = ref(x, y)
    torch.testing.assert_close(logits, model(x), rtol=1e-5, atol=1e-5)
    assert loss.item() == pytest.approx(model.loss(x, y).item(), rel=1e-5)


def test_train_speed_script_runs_and_prints_ratios(capsys):
    script = load_script("train_speed")
    assert script.main(["--configs", "eager,batch-threads", "--rounds", "1", "--seconds", "0.5",
                        "--threads", "2"]) == 0
    summary = last_json(capsys.readouterr().out)
    assert summary["nanogpt_ms"] > 0 and summary["eager_x"] > 0 and summary["batch_threads_x"] > 0
    assert summary["eager_shards"] == 0 and summary["batch_threads_shards"] == 2


def test_train_speed_script_bad_config(capsys):
    with pytest.raises(SystemExit) as e:
        load_script("train_speed").main(["--configs", "warp"])
    assert e.value.code == 2
    assert "unknown config(s) warp" in capsys.readouterr().err


def test_mutation_list_matches_the_code():
    """Every planted bug of benchmarks/mutation_check.py still finds its original line exactly once
    (a stale list would silently test nothing)."""
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "mutation_check.py"), "--check"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "exactly once" in proc.stdout, proc.stdout + proc.stderr
