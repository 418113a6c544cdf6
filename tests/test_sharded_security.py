"""Sharded checkpoints run no planted code and lose no data (issue 16, items 1-3).

The attacks are the issue's, each with a marker file its payload would create: a protocol-4 pickle
whose STACK_GLOBAL walks a dotted name (`os.system` "inside" an allowed module), and allow-listed
classes pointing DCP's planner at a planted torch.save file it would load with weights_only=False.
Each is tried through every door: `convert RUN/last`, `train --resume`, and a plain `train --out RUN`
(start-up recovery rebuilds best/ from the sharded last/)."""
from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import struct
from pathlib import Path

import pytest
import torch

import llmlab
from llmlab.cli import main as cli
from llmlab.training import TrainArgs, train

TINY = dict(n_layer=1, n_head=2, n_embd=16, block_size=16, batch_size=2, eval_iters=1, max_iters=2,
            eval_interval=2, sample_tokens=0, quiet=True, dropout=0.0)


@pytest.fixture(scope="module")
def sharded_run(tmp_path_factory) -> Path:
    """A one-process --parallel fsdp run: its last/ is a sharded checkpoint."""
    run = tmp_path_factory.mktemp("sharded") / "run"
    train(TrainArgs(out=str(run), parallel="fsdp", **TINY))
    return run


def tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): (hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir")
            for p in sorted(root.rglob("*"))}


def test_new_sharded_checkpoints_hold_no_pickle(sharded_run):
    dcp_dir = sharded_run / "last" / "dcp"
    names = sorted(p.name for p in dcp_dir.iterdir())
    assert names == ["shard-00001-model-00001-of-00001.safetensors"]
    assert json.loads((sharded_run / "last" / "config.json").read_text())["format"] == "llmlab-dcp-2"
    raw = (dcp_dir / names[0]).read_bytes()
    header = json.loads(raw[8:8 + struct.unpack("<Q", raw[:8])[0]])  # safetensors: length + JSON header
    assert "model.tok_emb.weight" in header and "train.rng.torch" in header
    assert "model.lm_head.weight" not in header  # tied: stored once


def _to_legacy(dcp_dir: Path) -> None:
    """Rewrite a new-format dcp/ folder (all its tensors) as DCP's FileSystemWriter writes it: the
    earlier format's `.metadata` pickle + `__0_0.distcp`."""
    import shutil

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemWriter, HuggingFaceStorageReader

    reader = HuggingFaceStorageReader(str(dcp_dir))
    md = reader.read_metadata().state_dict_metadata
    state = {k: torch.zeros(m.size, dtype=m.properties.dtype) for k, m in md.items()}
    dcp.load(state, storage_reader=HuggingFaceStorageReader(str(dcp_dir)))
    state["model.lm_head.weight"] = state["model.tok_emb.weight"].clone()  # the earlier writer kept both names
    shutil.rmtree(dcp_dir)
    dcp.save(state, storage_writer=FileSystemWriter(str(dcp_dir)))


@pytest.fixture(scope="module")
def legacy_run(tmp_path_factory, sharded_run) -> Path:
    import shutil

    run = tmp_path_factory.mktemp("legacy") / "run"
    shutil.copytree(sharded_run, run)
    _to_legacy(run / "last" / "dcp")
    meta = json.loads((run / "last" / "config.json").read_text())
    (run / "last" / "config.json").write_text(json.dumps(meta | {"format": "llmlab-dcp-1"}))
    assert (run / "last" / "dcp" / ".metadata").is_file()
    return run


def _planted(tmp_path: Path, legacy_run: Path, metadata: bytes, files: dict[str, bytes] = {}) -> Path:
    """A copy of the legacy run whose `.metadata` (and extra shard files) an attacker replaced."""
    import shutil

    run = tmp_path / "victim"
    shutil.copytree(legacy_run, run)
    (run / "last" / "dcp" / ".metadata").write_bytes(metadata)
    for name, data in files.items():
        (run / "last" / "dcp" / name).write_bytes(data)
    return run


def stack_global_payload(command: str) -> bytes:
    """Protocol 4: STACK_GLOBAL('torch.distributed.checkpoint.filesystem', 'os.system')(command).
    pickle resolves the dotted name by walking attributes: filesystem.os.system."""
    def s(text: str) -> bytes:
        b = text.encode()
        return b"\x8c" + bytes([len(b)]) + b  # SHORT_BINUNICODE
    return (b"\x80\x04" + s("torch.distributed.checkpoint.filesystem") + s("os.system") + b"\x93"
            + s(command) + b"\x85" + b"R" + b".")  # STACK_GLOBAL, TUPLE1, REDUCE, STOP


class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def bytes_entry_payload(legacy_run: Path, marker: Path) -> tuple[bytes, dict[str, bytes]]:
    """The real metadata with only allow-listed classes of the module, but the embedding's entry
    made a BytesStorageMetadata whose storage is a planted torch.save file in a shard-named file:
    DCP's planner would torch.load(weights_only=False) it."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, MetadataIndex

    md = pickle.loads((legacy_run / "last" / "dcp" / ".metadata").read_bytes())  # our own file
    buf = io.BytesIO()
    torch.save(_Payload(marker), buf)
    planted = buf.getvalue()
    key = "model.tok_emb.weight"
    md.state_dict_metadata[key] = BytesStorageMetadata()
    md.storage_data = {i: v for i, v in md.storage_data.items() if i.fqn != key}
    md.storage_data[MetadataIndex(key)] = _StorageInfo("__9_0.distcp", 0, len(planted))
    return pickle.dumps(md), {"__9_0.distcp": planted}


DOORS = {
    "convert": lambda run, tmp: ["convert", str(run / "last"), "--out", str(tmp / "single")],
    "resume": lambda run, tmp: ["train", "--out", str(run), "--resume", "--max-iters", "4", "--quiet",
                                "--sample-tokens", "0"],
}


@pytest.mark.parametrize("door", [*DOORS, "startup_recovery"])
@pytest.mark.parametrize("attack", ["stack_global", "bytes_entry"])
def test_planted_code_in_a_sharded_checkpoint_never_runs(tmp_path, legacy_run, capsys, door, attack):
    marker = tmp_path / "pwned"
    if attack == "stack_global":
        run = _planted(tmp_path, legacy_run, stack_global_payload(f"touch {marker}"))
    else:
        run = _planted(tmp_path, legacy_run, *bytes_entry_payload(legacy_run, marker))
    if door == "startup_recovery":  # best/ lost while last/ says it was the best: train rebuilds it
        import shutil

        shutil.rmtree(run / "best")
        args = ["train", "--out", str(run), "--quiet", "--sample-tokens", "0"]
    else:
        args = DOORS[door](run, tmp_path)
    code = cli(args)
    err = capsys.readouterr().err.strip()
    assert not marker.exists(), "the planted payload ran"
    assert code == 2 and err.count("\n") == 0 and err.startswith("error:"), err
    assert "Traceback" not in err


def _retarget(md, edit):
    """Apply `edit` to the first storage entry of the model's embedding (allow-listed classes only)."""
    import dataclasses as dc

    index = next(i for i in md.storage_data if i.fqn == "model.tok_emb.weight")
    md.storage_data[index] = dc.replace(md.storage_data[index], **edit)
    return md


def _rename_key(md):
    md.state_dict_metadata["model.planted.weight"] = md.state_dict_metadata.pop("model.tok_emb.weight")
    return md


# every check made after unpickling, each reached by metadata built from allow-listed classes only
# (so the unpickler lets it through, and only that check stands between it and DCP's loader)
FORGED = {
    "path_outside": (lambda md: _retarget(md, {"relative_path": "../../victim.distcp"}), "not a shard file"),
    "shard_missing": (lambda md: _retarget(md, {"relative_path": "__7_0.distcp"}), "missing or not a regular file"),
    "negative_offset": (lambda md: _retarget(md, {"offset": -1}), "invalid offset"),
    "foreign_key": (_rename_key, "not a tensor of this model"),
}


@pytest.mark.parametrize("forged", FORGED)
def test_metadata_of_allowed_classes_is_still_checked_entry_by_entry(tmp_path, legacy_run, capsys, forged):
    from llmlab.training.dcp_legacy import read_metadata_pickle

    edit, says = FORGED[forged]
    md = edit(pickle.loads((legacy_run / "last" / "dcp" / ".metadata").read_bytes()))  # our own file
    run = _planted(tmp_path, legacy_run, pickle.dumps(md))
    read_metadata_pickle(run / "last" / "dcp" / ".metadata")  # the exact allow-list lets it through
    code = cli(DOORS["convert"](run, tmp_path))
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error:") and err.count("\n") == 0, err
    assert "invalid metadata" in err and says in err, err
    assert not (tmp_path / "single").exists()


def test_sharded_folder_with_foreign_files_is_refused(tmp_path, sharded_run, capsys):
    import shutil

    for plant in ("extra.safetensors", ".metadata", "link"):
        run = tmp_path / plant.strip(".")
        shutil.copytree(sharded_run, run)
        target = run / "last" / "dcp" / plant
        if plant == "link":
            target.symlink_to(run / "last" / "dcp" / "shard-00001-model-00001-of-00001.safetensors")
        else:
            target.write_bytes(b"x")
        assert cli(["convert", str(run / "last"), "--out", str(tmp_path / f"single-{plant}")]) == 2
        err = capsys.readouterr().err
        assert "llmlab never writes" in err and err.count("\n") == 1


def test_legacy_format_written_by_dcp_still_loads_and_resumes(tmp_path, sharded_run, legacy_run):
    """An earlier llmlab's sharded checkpoint (DCP FileSystemWriter, a real .metadata pickle)
    converts to the new format's weights and resumes."""
    import shutil

    new = llmlab.load(_convert(tmp_path / "a", sharded_run / "last"))
    got = llmlab.load(_convert(tmp_path / "b", legacy_run / "last"))
    for k, v in new.state_dict().items():
        assert torch.equal(got.state_dict()[k], v), k
    run = tmp_path / "resumed"
    shutil.copytree(legacy_run, run)
    assert cli(["train", "--out", str(run), "--resume", "--max-iters", "4", "--quiet", "--sample-tokens", "0"]) == 0
    assert json.loads((run / "last" / "config.json").read_text())["format"] == "llmlab-dcp-2"


def _convert(out: Path, last: Path) -> Path:
    assert cli(["convert", str(last), "--out", str(out)]) == 0
    return out


@pytest.mark.parametrize("target", ["run", "run_last", "other_run", "folder", "file"])
def test_sharded_convert_never_overwrites(tmp_path, sharded_run, capsys, target):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(sharded_run, run)
    other = tmp_path / "other"
    shutil.copytree(sharded_run, other)
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "notes.txt").write_text("mine")
    (tmp_path / "file").write_text("mine")
    out = {"run": run, "run_last": run / "last", "other_run": other, "folder": tmp_path / "folder",
           "file": tmp_path / "file"}[target]
    before = tree_digest(tmp_path)
    assert cli(["convert", str(run / "last"), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --out") and err.count("\n") == 1
    assert tree_digest(tmp_path) == before


def test_convert_to_hf_with_out_is_one_line(tmp_path, capsys):
    assert cli(["convert", str(tmp_path / "run"), "--to-hf", str(tmp_path / "x"), "--out", str(tmp_path / "y")]) == 2
    assert "--out does not apply" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_shard_with_a_tensor_this_model_never_has_is_refused(tmp_path, sharded_run, capsys):
    """A shard rewritten with one more tensor (a planted key, the header's DCP offsets kept valid):
    refused in one line before anything is loaded."""
    import shutil

    from safetensors import safe_open
    from safetensors.torch import save_file

    run = tmp_path / "run"
    shutil.copytree(sharded_run, run)
    shard = next((run / "last" / "dcp").iterdir())
    with safe_open(str(shard), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = f.metadata()
    info = json.loads(meta["DCP_SHARDING_INFO"])
    tensors["model.evil"] = torch.zeros(3)
    info["model.evil"] = {"saved_offsets": [0]}
    save_file(tensors, str(shard), metadata=meta | {"DCP_SHARDING_INFO": json.dumps(info)})
    assert cli(["convert", str(run / "last"), "--out", str(tmp_path / "single")]) == 2
    err = capsys.readouterr().err
    assert "model.evil" in err and "never has" in err and err.count("\n") == 1


def test_sharded_convert_of_a_model_too_large_for_memory_is_one_line(tmp_path, sharded_run, capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(sharded_run, run)
    meta = json.loads((run / "last" / "config.json").read_text())
    meta["model"].update(n_embd=1_000_000, n_head=2)
    (run / "last" / "config.json").write_text(json.dumps(meta))
    assert cli(["convert", str(run / "last"), "--out", str(tmp_path / "single")]) == 2
    err = capsys.readouterr().err
    assert "needs about" in err and "GiB" in err and err.count("\n") == 1
    assert not (tmp_path / "single").exists()
