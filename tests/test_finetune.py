"""`llmlab train --init-from SRC`, full and LoRA (issue 21): a new run starts exactly at the source
model (its loss computed independently, through transformers for a Hugging Face source), never
writes into the source, LoRA trains only its adapters (through peft) and merges into an export that
transformers loads with the same logits; bad sources and settings are one line each, nothing written."""
from __future__ import annotations

import hashlib
import json
import pickle
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import llmlab
from llmlab import lora
from llmlab.checkpoint import save_checkpoint
from llmlab.cli import main as cli
from llmlab.data import BatchSampler, encode_corpus, load_text, split_ids
from llmlab.tokenizer import ByteTokenizer, load_tokenizer
from llmlab.training import TrainArgs, train

from conftest import tiny_model

pytest.importorskip("peft")
# new runs on the test corpus: 4 steps, an eval at 0, 2 and 4
STEPS = dict(max_iters=4, eval_interval=2, eval_iters=2, batch_size=4, lr=1e-2, warmup_iters=0,
             sample_tokens=0, quiet=True)


def losses(run: Path, key: str = "loss") -> dict[int, float]:
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r[key] for r in recs if key in r}


def tree_sha256(root: Path) -> dict[str, str]:
    """Every file under root, by relative path: the source must be byte-identical afterwards."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def first_batches(run: Path, corpus: Path, tokenizer):
    """The windows a run of STEPS saw first, drawn again as train() draws them (its seeds): the
    first training batch and the step-0 eval's validation batches."""
    a = TrainArgs(**json.loads((run / "last" / "config.json").read_text())["train"])
    train_ids, val_ids = split_ids(encode_corpus(load_text(str(corpus))[1], tokenizer))
    blk = json.loads((run / "last" / "config.json").read_text())["model"]["block_size"]
    x, y = BatchSampler(train_ids, blk, a.batch_size, seed=a.seed).next()
    val = BatchSampler(val_ids, blk, a.batch_size, seed=a.seed + 2)
    return (x, y), [val.next() for _ in range(a.eval_iters)]


@pytest.fixture(scope="module")
def hf_gpt2(tmp_path_factory) -> Path:
    """A random GPT-2 written by transformers itself (its own init, not llmlab's), with a byte
    tokenizer.json beside it: a Hugging Face folder as one downloads it."""
    transformers = pytest.importorskip("transformers")
    from llmlab.hf import _save_hf_tokenizer

    torch.manual_seed(1)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=256, n_positions=32, n_embd=32, n_layer=2, n_head=2, bos_token_id=None, eos_token_id=None))
    path = tmp_path_factory.mktemp("hf") / "gpt2"
    model.save_pretrained(str(path))
    _save_hf_tokenizer(ByteTokenizer(), path)
    return path


@pytest.mark.parametrize("lora_rank", [None, 4], ids=["full", "lora"])
def test_init_from_hf_starts_at_the_transformers_loss_and_lowers_it(tmp_path, hf_gpt2, corpus_file, lora_rank):
    from transformers import GPT2LMHeadModel

    before = tree_sha256(hf_gpt2)
    run = tmp_path / "run"
    summary = train(TrainArgs(out=str(run), init_from=str(hf_gpt2), data=str(corpus_file), lora_rank=lora_rank,
                              **STEPS))
    assert tree_sha256(hf_gpt2) == before  # SRC byte-identical: nothing written, nothing changed
    hf = GPT2LMHeadModel.from_pretrained(str(hf_gpt2)).eval()
    (x, y), val = first_batches(run, corpus_file, load_tokenizer(hf_gpt2))
    with torch.no_grad():
        ref_train = F.cross_entropy(hf(x).logits.flatten(0, 1), y.flatten()).item()
        ref_val = sum(F.cross_entropy(hf(vx).logits.flatten(0, 1), vy.flatten()).item() for vx, vy in val) / len(val)
    assert losses(run)[0] == pytest.approx(ref_train, abs=1e-5)
    assert losses(run, "val_loss")[0] == pytest.approx(ref_val, abs=1e-5)
    assert summary["val_loss"] < ref_val - 0.01  # a few steps lower it
    meta = json.loads((run / "last" / "config.json").read_text())
    record = meta["state"]["init_from"]
    assert record["path"] == str(hf_gpt2) and record["format"] == "hf-gpt2"
    assert record["sha256"] == {"model.safetensors": before["model.safetensors"]}
    assert ("lora" in meta) == (lora_rank is not None)


# every attention and MLP kind: MHA tied (flash), GQA untied (llama), MLA (rope_mla), MLA decoding
# through the paged kernel (flash_mla), MoE on a GPT base (moe), MLA + MoE (deepseek)
KINDS = ["flash", pytest.param("llama", marks=pytest.mark.slow), "rope_mla", "flash_mla", "moe",
         pytest.param("deepseek", marks=pytest.mark.slow)]


def source_checkpoint(path: Path, preset: str) -> Path:
    """A checkpoint folder (`llmlab convert` writes these) of a random tiny model of `preset`."""
    torch.manual_seed(2)
    model = tiny_model(preset=preset, vocab_size=256)
    with torch.no_grad():  # a non-zero MoE balancing bias: part of the weights to start from
        for m in model.modules():
            if hasattr(m, "bias") and type(m).__name__ == "Router":
                m.bias.copy_(torch.linspace(-0.01, 0.01, m.bias.numel()))
    save_checkpoint(path, model, ByteTokenizer(), {"preset": preset})
    return path


@pytest.mark.parametrize("preset", KINDS)
def test_init_from_every_preset_kind_full_and_lora(tmp_path, corpus_file, preset):
    src = source_checkpoint(tmp_path / "src", preset)
    before = tree_sha256(src)
    base = llmlab.load(src)
    full, adapted = tmp_path / "full", tmp_path / "lora"
    train(TrainArgs(out=str(full), init_from=str(src), data=str(corpus_file), **STEPS))
    train(TrainArgs(out=str(adapted), init_from=str(src), data=str(corpus_file), lora_rank=2,
                    lora_targets="all-linear", **STEPS))
    assert tree_sha256(src) == before
    (x, y), _ = first_batches(full, corpus_file, ByteTokenizer())
    with torch.no_grad():
        ref = base.train().loss(x, y).item()  # training mode, as step 0 ran (MoE routing alike)
    for run in (full, adapted):
        assert losses(run)[0] == pytest.approx(ref, abs=1e-5), run.name
        assert json.loads((run / "last" / "config.json").read_text())["train"]["preset"] == preset
    assert losses(full, "val_loss")[4] < losses(full, "val_loss")[0]

    # LoRA: only the adapters moved; the base, every parameter and buffer (MoE bias too), is bit-identical
    unmerged = llmlab.load(adapted / "last", merge_lora=False)
    settings = lora.adapted(unmerged)
    plain = base.state_dict()
    for name, t in unmerged.state_dict().items():
        if ".lora_" not in name:
            assert torch.equal(t, plain[name.replace(".base_layer.", ".")]), name
    # trainable parameters: r·(in + out) per adapted linear
    layers = lora.block_linears(base)
    expected = sum(2 * (layers[m].in_features + layers[m].out_features) for m in settings.modules)
    assert lora.trainable_params(unmerged) == expected
    assert set(settings.modules) == set(layers)  # all-linear: every linear inside the blocks
    from safetensors.torch import load_file

    state = load_file(str(adapted / "last" / "train_state.safetensors"))
    assert sum(t.numel() for k, t in state.items() if k.endswith(".exp_avg")) == expected  # AdamW over adapters only

    # merged = unmerged, in a forward and in cached generation (MLA's absorbed decode reads kv_up's matrix)
    merged = llmlab.load(adapted / "last")
    assert lora.adapted(merged) is None and not any(".lora_" in k for k in merged.state_dict())
    assert any(not torch.equal(merged.state_dict()[k], v) for k, v in plain.items())  # the adapters did something
    idx = torch.randint(256, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(merged(idx), unmerged(idx), rtol=0, atol=1e-5)
    gen = dict(max_new_tokens=8, temperature=0.0)
    assert torch.equal(llmlab.generate(merged, idx[:, :5], **gen), llmlab.generate(unmerged, idx[:, :5], **gen))
    assert cli(["sample", str(adapted), "--max-new-tokens", "4", "--seed", "0"]) == 0


def test_lora_resume_is_exact(tmp_path, corpus_file, monkeypatch):
    src = source_checkpoint(tmp_path / "src", "llama")
    args = dict(init_from=str(src), data=str(corpus_file), lora_rank=4, **{**STEPS, "max_iters": 8, "eval_interval": 4})
    train(TrainArgs(out=str(tmp_path / "whole"), **args))
    from llmlab.training import checkpoints

    real_write = checkpoints.MetricsLog.write

    def crash_at_step_6(self, **rec):
        if rec.get("step") == 6 and "loss" in rec:
            raise KeyboardInterrupt  # killed between checkpoints (last one: step 4)
        real_write(self, **rec)

    monkeypatch.setattr(checkpoints.MetricsLog, "write", crash_at_step_6)
    with pytest.raises(KeyboardInterrupt):
        train(TrainArgs(out=str(tmp_path / "resumed"), **args))
    monkeypatch.setattr(checkpoints.MetricsLog, "write", real_write)
    train(TrainArgs(out=str(tmp_path / "resumed"), resume=True))  # the run's own settings, LoRA included
    for key in ("loss", "val_loss"):
        assert losses(tmp_path / "resumed", key) == losses(tmp_path / "whole", key)
    a = llmlab.load(tmp_path / "whole" / "last", merge_lora=False).state_dict()
    b = llmlab.load(tmp_path / "resumed" / "last", merge_lora=False).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    meta = json.loads((tmp_path / "resumed" / "last" / "config.json").read_text())
    assert meta["state"]["init_from"]["path"] == str(src)  # where it started survives the resume


@pytest.mark.parametrize("preset", ["flash", "rope_mla"])
def test_lora_merged_export_round_trips_through_hf(tmp_path, corpus_file, capsys, preset):
    from transformers import AutoModelForCausalLM

    src = source_checkpoint(tmp_path / "src", preset)
    run = tmp_path / "run"
    train(TrainArgs(out=str(run), init_from=str(src), data=str(corpus_file), lora_rank=4, lora_targets="all-linear",
                    **STEPS))
    assert cli(["convert", str(run), "--merge-lora", "--out", str(tmp_path / "merged")]) == 0
    assert cli(["convert", str(run), "--to-hf", str(tmp_path / "hf")]) == 0
    merged = llmlab.load(tmp_path / "merged")
    ours = llmlab.load(run)
    assert merged.state_dict().keys() == ours.state_dict().keys()
    assert all(torch.equal(v, ours.state_dict()[k]) for k, v in merged.state_dict().items())
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    idx = torch.randint(256, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, merged(idx), rtol=0, atol=1e-5)
    capsys.readouterr()
    assert cli(["eval", str(run), "--max-tokens", "500"]) == 0
    assert json.loads(capsys.readouterr().out)["val_loss"] > 0


def test_merge_lora_of_a_plain_run_is_one_line(tmp_path, capsys):
    src = source_checkpoint(tmp_path / "src", "flash")
    assert cli(["convert", str(src), "--merge-lora", "--out", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "has no LoRA adapters to merge" in err
    assert not (tmp_path / "m").exists()


# ---- bad input: one line each, nothing written, the source untouched ------------------------
def _pickle_only(path: Path, planted: Path) -> None:
    """An HF GPT-2 folder whose weights are a pickle (pytorch_model.bin) that runs code if loaded."""
    from transformers import GPT2Config

    class Evil:
        def __reduce__(self):
            return (planted.write_text, ("unpickled",))

    GPT2Config(vocab_size=256, n_positions=32, n_embd=32, n_layer=2, n_head=2).save_pretrained(str(path))
    (path / "pytorch_model.bin").write_bytes(pickle.dumps(Evil()))


def _unsupported(path: Path, planted: Path) -> None:
    from transformers import BertConfig

    BertConfig(vocab_size=256, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
               intermediate_size=64).save_pretrained(str(path))
    (path / "model.safetensors").write_bytes(b"\0" * 16)


def _corrupt_config(path: Path, planted: Path) -> None:
    source_checkpoint(path, "flash")
    (path / "config.json").write_text('{"model": {"n_layer": "four"}}')


def _config_not_json(path: Path, planted: Path) -> None:
    source_checkpoint(path, "flash")
    (path / "config.json").write_bytes(b"\x00\xff not json")


def _truncated_weights(path: Path, planted: Path) -> None:
    source_checkpoint(path, "flash")
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])


def _plain(path: Path, planted: Path) -> None:
    source_checkpoint(path, "flash")


BAD = {  # name: (make the source, extra flags, a piece of the one line)
    "missing": (None, [], "no such directory"),
    "corrupt-config": (_corrupt_config, [], "corrupt config.json"),
    "config-not-json": (_config_not_json, [], "config.json is unreadable or not JSON"),
    "truncated-weights": (_truncated_weights, [], "truncated or corrupt"),
    "pickle-only": (_pickle_only, [], "never unpickles"),
    "unsupported-architecture": (_unsupported, [], "unsupported Hugging Face model_type 'bert'"),
    "rank-zero": (_plain, ["--lora-rank", "0"], "--lora-rank must be >= 1, got 0"),
    "rank-negative": (_plain, ["--lora-rank", "-3"], "--lora-rank must be >= 1, got -3"),
    "rank-past-width": (_plain, ["--lora-rank", "33"], "--lora-rank 33 is past the width of blocks.0.attn.qkv"),
    "unknown-target": (_plain, ["--lora-rank", "2", "--lora-targets", "attn.wq"], "names no linear layer"),
    "with-resume": (_plain, ["--resume"], "--init-from starts a new run from existing weights and --resume"),
    "contradicting-size": (_plain, ["--n-embd", "64"], "--n-embd 64 contradicts --init-from"),
    "contradicting-tokenizer": (_plain, ["--tokenizer", "char"], "--tokenizer char contradicts --init-from"),
    "lora-without-init-from": (None, ["--lora-rank", "2"], "--lora-rank adapts existing weights"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_source_or_settings_is_one_line_and_writes_nothing(tmp_path, capsys, case):
    pytest.importorskip("transformers")
    make, flags, message = BAD[case]
    src, planted = tmp_path / "src", tmp_path / "pwned"
    if make is not None:
        src.mkdir()
        make(src, planted)
    before = tree_sha256(tmp_path)
    out = tmp_path / "out"
    source = [] if case == "lora-without-init-from" else ["--init-from", str(src)]
    code = cli(["train", *source, "--out", str(out), "--max-iters", "2", "--quiet", "--sample-tokens", "0", *flags])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 0, err
    assert message in err and "Traceback" not in err
    assert not out.exists() and not planted.exists()
    assert tree_sha256(tmp_path) == before  # nothing written anywhere, the source untouched


def test_out_inside_the_source_is_refused(tmp_path, capsys):
    src = source_checkpoint(tmp_path / "src", "flash")
    assert cli(["train", "--init-from", str(src), "--out", str(src / "ft"), "--quiet"]) == 2
    assert "never writes into the source" in capsys.readouterr().err
    assert not (src / "ft").exists()


# ---- --init-from under torch.distributed: 2 gloo ranks (torchrun) train like one process ------
@pytest.fixture(scope="module")
def parallel_source(tmp_path_factory) -> Path:
    return source_checkpoint(tmp_path_factory.mktemp("psrc") / "src", "flash")


@pytest.mark.parametrize("parallel, lora_rank", [
    pytest.param("ddp", None, marks=pytest.mark.slow), pytest.param("fsdp", None, marks=pytest.mark.slow),
    ("fsdp", 4), pytest.param("ddp", 4, marks=pytest.mark.slow),
], ids=["ddp-full", "fsdp-full", "fsdp-lora", "ddp-lora"])
def test_init_from_on_two_ranks_trains_like_one_process(tmp_path, corpus_file, parallel_source, parallel, lora_rank):
    from test_parallel import assert_same_losses, torchrun

    # global batch 2 ranks x 2 rows x 2 micro-batches; the reference: one process with 4 rows x 2
    spec = dict(init_from=str(parallel_source), data=str(corpus_file), lora_rank=lora_rank,
                **{**STEPS, "grad_accum": 2})
    ref = tmp_path / "one"
    train(TrainArgs(out=str(ref), **spec))
    run = tmp_path / "two"
    r = torchrun({"train": {**spec, "batch_size": 2, "parallel": parallel, "out": str(run)}})
    assert r.returncode == 0, r.stderr[-3000:]
    assert_same_losses(ref, run)
    meta = json.loads((run / "last" / "config.json").read_text())
    assert meta["state"]["init_from"]["path"] == str(parallel_source) and ("lora" in meta) == bool(lora_rank)
    a, b = llmlab.load(ref / "best").state_dict(), llmlab.load(run / "best").state_dict()  # best/: gathered
    for k, v in a.items():  # Adam turns float-sum-order noise in a near-zero gradient into ~lr-sized steps
        torch.testing.assert_close(b[k], v, rtol=0, atol=1e-4)
    if lora_rank:  # the sharded last/ merges as its single-file conversion loads (adapters folded in)
        from llmlab.training.dcp import to_single

        assert cli(["convert", str(run / "last"), "--merge-lora", "--out", str(tmp_path / "merged")]) == 0
        to_single(run / "last", tmp_path / "single")
        merged, single = llmlab.load(tmp_path / "merged"), llmlab.load(tmp_path / "single")
        assert lora.adapted(merged) is None and merged.state_dict().keys() == single.state_dict().keys()
        assert all(torch.equal(v, single.state_dict()[k]) for k, v in merged.state_dict().items())
        assert json.loads((tmp_path / "merged" / "config.json").read_text())["state"]["merged_lora"]["rank"] == 4


@pytest.mark.slow
def test_finetune_shakespeare_recipe_runs_at_tiny_scale(tmp_path, shakespeare):
    """benchmarks/finetune_shakespeare.py end to end at toy sizes (each run in its own process):
    the table, the JSON line and the PNG; the fine-tuned contestants start where the pretrained
    model is, below the random one, and LoRA trains only its adapters."""
    import subprocess
    import sys

    from conftest import REPO

    out = tmp_path / "bench"
    r = subprocess.run([sys.executable, str(REPO / "benchmarks" / "finetune_shakespeare.py"), "--tiny",
                        "--data", str(shakespeare), "--out", str(out), "--pretrain-iters", "6", "--max-iters", "4",
                        "--eval-interval", "2", "--threads", "1"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads(r.stdout.strip().splitlines()[-1])["summary"]
    assert "| lora |" in r.stdout and (out / "val_loss.png").stat().st_size > 10_000
    assert summary["full"]["curve"]["0"] == summary["lora"]["curve"]["0"]  # both start at the pretrained model
    assert summary["full"]["curve"]["0"] < summary["scratch"]["curve"]["0"]
    assert summary["lora"]["trainable"] < summary["full"]["trainable"] == summary["scratch"]["trainable"]
    assert summary["lora"]["optimizer_bytes"] < summary["full"]["optimizer_bytes"]
