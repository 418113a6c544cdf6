"""`llmlab convert` never runs repository code, never unpickles, never overwrites, writes atomically,
keeps the tokenizer of every kind and gives files the user's umask."""
from __future__ import annotations

import builtins
import json
import os
import stat
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")

import llmlab  # noqa: E402
from llmlab.cli import main  # noqa: E402
from llmlab.hf import convert_from_hf, convert_to_hf  # noqa: E402
from llmlab.tokenizer import BPETokenizer, ByteTokenizer, CharTokenizer, load_tokenizer  # noqa: E402

from conftest import tiny  # noqa: E402

EVIL = "import pathlib\npathlib.Path({marker!r}).write_text('ran')\n"


def one_error_line(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


@pytest.fixture
def say_yes(monkeypatch):
    """A user at a terminal who answers "y" to any question (transformers asks before running
    a repository's custom code)."""
    monkeypatch.setattr(builtins, "input", lambda *a, **k: "y")
    monkeypatch.setattr(sys.stdin, "isatty", lambda: True, raising=False)


@pytest.mark.parametrize("model_type", ["evil-arch", "gpt2"])
def test_custom_code_in_auto_map_is_never_run(capsys, tmp_path, say_yes, model_type):
    src, marker = tmp_path / "repo", tmp_path / "code-ran"
    src.mkdir()
    (src / "evil.py").write_text(EVIL.format(marker=str(marker)))
    cfg = {"model_type": model_type, "auto_map": {"AutoConfig": "evil.EvilConfig",
                                                  "AutoModelForCausalLM": "evil.EvilModel"}}
    if model_type == "gpt2":  # a supported type: llmlab uses its own class, auto_map is ignored
        cfg.update(vocab_size=16, n_positions=8, n_embd=8, n_layer=1, n_head=2)
    (src / "config.json").write_text(json.dumps(cfg))
    one_error_line(capsys, ["convert", "--from-hf", str(src), "--out", str(tmp_path / "run")])
    assert not marker.exists()
    assert not (tmp_path / "run").exists()


def test_index_naming_a_pickled_shard_is_refused(capsys, tmp_path, monkeypatch):
    src = tmp_path / "hf"
    transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=16, n_positions=8, n_embd=8, n_layer=1,
                                                         n_head=2)).save_pretrained(src)
    (src / "model.safetensors").unlink()
    torch.save({}, src / "pytorch_model-00001.bin")
    (src / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {"transformer.wte.weight": "pytorch_model-00001.bin"}}))

    def no_unpickling(*a, **k):
        raise AssertionError("torch.load was called")

    monkeypatch.setattr(torch, "load", no_unpickling)
    err = one_error_line(capsys, ["convert", "--from-hf", str(src), "--out", str(tmp_path / "run")])
    assert "pytorch_model-00001.bin" in err and "safetensors" in err


# ---- nothing is overwritten -------------------------------------------------------------------------
def gpt2_run(tmp_path, tokenizer=None):
    cfg = tiny(preset="flash", vocab_size=tokenizer.vocab_size if tokenizer else 97)
    run = tmp_path / "run"
    llmlab.checkpoint.save_checkpoint(run / "best", llmlab.Transformer(cfg).eval(), tokenizer=tokenizer)
    llmlab.checkpoint.save_checkpoint(run / "last", llmlab.Transformer(cfg).eval(), tokenizer=tokenizer)
    return run


def tree(path):
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_convert_never_overwrites(capsys, tmp_path):
    run = gpt2_run(tmp_path, ByteTokenizer())
    hf_dir = convert_to_hf(run, tmp_path / "hf")
    before = tree(run)
    for argv in (["convert", "--from-hf", str(hf_dir), "--out", str(run)],  # would replace last/
                 ["convert", str(run), "--to-hf", str(run / "best")],  # would destroy best/
                 ["convert", str(run), "--to-hf", str(run)],  # would put an HF config.json in the run root
                 ["convert", str(run), "--to-hf", str(hf_dir)]):  # an earlier export
        assert "not empty" in one_error_line(capsys, argv)
    assert tree(run) == before
    assert main(["sample", str(run), "--max-new-tokens", "3", "--seed", "0"]) == 0


@pytest.mark.parametrize("bad", ["file", "under-file", "empty"])
def test_convert_bad_out_paths(capsys, tmp_path, bad):
    run = gpt2_run(tmp_path)
    (tmp_path / "f").write_text("x")
    out = {"file": str(tmp_path / "f"), "under-file": str(tmp_path / "f" / "sub"), "empty": ""}[bad]
    one_error_line(capsys, ["convert", str(run), "--to-hf", out])
    hf_dir = convert_to_hf(run, tmp_path / "hf")
    one_error_line(capsys, ["convert", "--from-hf", str(hf_dir), "--out", out])
    assert (tmp_path / "f").read_text() == "x"


def test_to_hf_is_atomic(tmp_path, monkeypatch):
    """A kill while the weights are written leaves no half directory (no config.json alone)."""
    run = gpt2_run(tmp_path)

    def killed(*a, **k):  # after config.json is written, before the weights are
        raise KeyboardInterrupt

    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", killed)
    with pytest.raises(KeyboardInterrupt):
        convert_to_hf(run, tmp_path / "hf")
    assert not (tmp_path / "hf").exists() and [p.name for p in tmp_path.iterdir()] == ["run"]


def test_exported_files_get_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        out = convert_to_hf(gpt2_run(tmp_path, ByteTokenizer()), tmp_path / "hf")
        run = tmp_path / "back"
        convert_from_hf(out, run)
    finally:
        os.umask(old)
    files = [p for p in [*out.iterdir(), *(run / "last").iterdir()] if p.is_file()]
    assert {"model.safetensors", "tokenizer.json", "config.json"} <= {p.name for p in files}
    for p in files:
        assert stat.S_IMODE(p.stat().st_mode) == 0o644, p


# ---- the tokenizer survives the round trip -----------------------------------------------------------
TEXT = "ROMEO: But soft, what light\nthrough yonder window breaks? caf\u00e9 \u00e9t\u00e9\n" * 3


@pytest.mark.parametrize("kind", ["byte", "char", "bpe"])
def test_tokenizer_round_trip(capsys, tmp_path, kind):
    tok = {"byte": ByteTokenizer, "char": lambda: CharTokenizer(TEXT),
           "bpe": lambda: BPETokenizer.train(TEXT * 5, vocab_size=300)}[kind]()
    run = gpt2_run(tmp_path, tok)
    assert main(["convert", str(run), "--to-hf", str(tmp_path / "hf")]) == 0
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"), trust_remote_code=False)
    probe = "But soft, caf\u00e9\n  light"
    assert hf_tok(probe)["input_ids"] == tok.encode(probe)
    assert hf_tok.decode(tok.encode(probe)) == probe
    assert main(["convert", "--from-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "back")]) == 0
    back = load_tokenizer(tmp_path / "back" / "last")
    assert back.kind == kind and back.encode(probe) == tok.encode(probe) and back.decode(tok.encode(probe)) == probe
    capsys.readouterr()
    assert main(["sample", str(tmp_path / "back"), "--prompt", "But", "--max-new-tokens", "4",
                 "--temperature", "0"]) == 0
    assert capsys.readouterr().out.startswith("But")


@pytest.mark.parametrize("key", ["attn_implementation", "_attn_implementation"])
def test_attention_implementation_named_in_config_is_never_honoured(tmp_path, key, monkeypatch):
    """A config.json may name a hub kernel (code fetched and run) as its attention: llmlab chooses
    the implementation itself, so the name is ignored and the model converts with HF's logits."""
    import transformers.modeling_utils as mu

    src = tmp_path / "hf"
    cfg = transformers.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=16)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    hf.save_pretrained(src)
    raw = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps(raw | {key: "kernels-community/evil-attention"}))

    def no_kernels(*a, **k):
        raise AssertionError("a hub attention kernel was looked up")

    monkeypatch.setattr(mu, "lazy_import_flash_attention", no_kernels, raising=False)
    model = llmlab.from_hf(src)
    x = torch.randint(32, (1, 8))
    torch.testing.assert_close(model(x), hf(x).logits, rtol=1e-4, atol=1e-5)
