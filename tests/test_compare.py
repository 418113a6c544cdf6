"""`llmlab compare` end to end at tiny sizes: the report's table holds the JSON's numbers, the plots
are written, a failing preset is reported as failed while the others finish, a second run with the
same --out trains nothing. Each preset runs in its own process (as in real use)."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from llmlab.cli import main

PRESETS = "basic,rope,gqa"
TINY = ["--n-layer", "1", "--n-head", "4", "--n-embd", "32", "--block-size", "16", "--batch-size", "4",
        "--max-iters", "6", "--eval-interval", "3", "--eval-iters", "2", "--contexts", "4,8", "--decode-steps", "3",
        "--repeats", "1", "--no-compile", "--threads", "1", "--quiet",
        "--set", "gqa:n_kv_head=3"]  # 4 heads cannot be shared by 3 key/value heads: gqa fails, for real


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    words = "the quick brown fox jumps over a lazy dog while seven wizards hex and quiz".split()
    text = "\n".join(" ".join(words[(i * 7 + j) % len(words)] for j in range(9)) for i in range(600))
    path = tmp_path_factory.mktemp("data") / "tiny.txt"
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def compared(tmp_path_factory, corpus):
    """One comparison of basic, rope and a gqa that cannot build; (out dir, exit code, stdout)."""
    out = tmp_path_factory.mktemp("cmp") / "c"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LLMLAB_CACHE", str(tmp_path_factory.getbasetemp() / "llmlab-cache"))
        import io
        from contextlib import redirect_stdout

        buf = io.StringIO()
        with redirect_stdout(buf):
            code = main(["compare", "--presets", PRESETS, "--data", str(corpus), "--out", str(out), *TINY])
    return out, code, buf.getvalue()


def table(report: str) -> list[dict[str, str]]:
    lines = [ln for ln in report.splitlines() if ln.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    return [dict(zip(header, (c.strip() for c in ln.strip("|").split("|")))) for ln in lines[2:]]


def num(cell: str) -> float:
    return float(cell.replace(",", "").rstrip("x"))


def test_report_json_and_plots_agree(compared):
    out, code, stdout = compared
    assert code == 1  # one preset failed
    assert "compared 3 preset(s), 1 failed: gqa" in stdout
    results = json.loads((out / "results.json").read_text())
    assert isinstance(results, list) and [r["preset"] for r in results] == PRESETS.split(",")
    report = (out / "report.md").read_text()
    assert "torch" in report and "UTC" in report and "cores" in report  # machine, versions, date
    rows = {r["preset"]: r for r in table(report)}
    assert list(rows) == PRESETS.split(",")
    for r in results:
        if r["status"] != "ok":
            continue
        row = rows[r["preset"]]
        assert num(row["params"]) == r["params"]
        assert num(row["params vs first"]) == r["params_vs_first"]
        assert num(row["val loss (last eval)"]) == r["val_loss"] == r["val_curve"][-1][1]
        assert num(row["val loss (whole val split)"]) == r["val_loss_whole"]
        assert num(row["train tokens/s"]) == r["train_tokens_per_s"] > 0
        assert num(row["peak memory (MiB)"]) == r["peak_mem_mib"] > 0
        for d in r["decode"]:
            assert num(row[f"decode tokens/s @ {d['context']}"]) == d["tokens_per_s"] > 0
        assert [d["context"] for d in r["decode"]] == [4, 8]
        assert [s for s, _ in r["val_curve"]] == [0, 3, 6]
    ok = {r["preset"]: r for r in results if r["status"] == "ok"}
    assert ok["basic"]["cache_bytes_per_token"] is None and rows["basic"]["cache bytes/token"] == "n/a"
    assert ok["basic"]["decode_path"] == "recompute" and ok["rope"]["decode_path"] == "cache"
    # rope: 1 layer x 2 (k and v) x 4 heads x 8 wide x 4 bytes
    assert ok["rope"]["cache_bytes_per_token"] == 256 and rows["rope"]["cache bytes/token"] == "256"
    assert ok["basic"]["params_vs_first"] == 1.0 and ok["rope"]["params"] < ok["basic"]["params"]  # no position table
    for png in ("val_loss.png", "decode.png", "cache_bytes.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
        assert f"]({png})" in report


def test_a_failing_preset_is_reported_and_the_others_complete(compared):
    out, _, _ = compared
    results = {r["preset"]: r for r in json.loads((out / "results.json").read_text())}
    assert results["basic"]["status"] == results["rope"]["status"] == "ok"
    failed = results["gqa"]
    assert failed["status"] == "failed" and "n_kv_head" in failed["error"] and "\n" not in failed["error"]
    row = {r["preset"]: r for r in table((out / "report.md").read_text())}["gqa"]
    assert row["status"].startswith("failed: ") and "n_kv_head" in row["status"]
    assert "Traceback" in (out / "runs" / "gqa" / "compare.log").read_text()  # the whole story in its log


def test_a_finished_run_is_a_normal_run_dir(capsys, compared):
    out, _, _ = compared
    code, text, _ = run(capsys, "sample", out / "runs" / "rope", "--max-new-tokens", "5", "--seed", "0")
    assert code == 0 and text.strip()


def test_second_run_trains_nothing_again(capsys, compared, corpus):
    out, _, _ = compared
    before = {p: (out / "runs" / p / "metrics.jsonl").read_bytes() for p in ("basic", "rope")}
    first = json.loads((out / "results.json").read_text())
    code, text, _ = run(capsys, "compare", "--presets", PRESETS, "--data", corpus, "--out", out, *TINY)
    assert code == 1  # gqa is retried (it still cannot build), the others are reused
    results = json.loads((out / "results.json").read_text())
    for r, r0 in zip(results, first):
        if r["status"] == "ok":
            assert r["reused"] is True
            assert {k: v for k, v in r.items() if k != "reused"} == r0
    assert {p: (out / "runs" / p / "metrics.jsonl").read_bytes() for p in before} == before
    assert re.search(r"\| basic \| ok \(reused\) \|", (out / "report.md").read_text())
    # other settings on the same --out: refused (its numbers would mix), --fresh would start over
    code, _, err = run(capsys, "compare", "--presets", "basic", "--data", corpus, "--out", out,
                       *TINY[:-2], "--max-iters", "7")
    assert code == 2 and "--fresh" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("argv, words", [
    (["--presets", "basic,warp"], ["unknown preset", "warp"]),
    (["--presets", "basic", "--contexts", "64"], ["--block-size"]),
    (["--presets", "basic", "--set", "rope:n_head=2"], ["rope", "--presets"]),
    (["--presets", "basic", "--set", "basic:colour=2"], ["cannot be set"]),
])
def test_bad_input_is_one_line(capsys, tmp_path, argv, words):
    code, _, err = run(capsys, "compare", "--out", tmp_path / "c", *argv, "--block-size", "16", "--quiet")
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    for w in words:
        assert w in lines[0]


def test_out_that_is_a_file_or_holds_other_things(capsys, tmp_path):
    f = tmp_path / "f"
    f.write_text("x")
    code, _, err = run(capsys, "compare", "--presets", "basic", "--out", f, "--quiet")
    assert code == 2 and "is a file" in err
    code, _, err = run(capsys, "compare", "--presets", "basic", "--out", tmp_path, "--quiet")
    assert code == 2 and "not a comparison" in err and not (tmp_path / "runs").exists()


def test_nothing_but_mean_loss_evaluates():
    """One evaluation: the only model.loss() outside training's step is evaluate.mean_loss."""
    root = Path(__file__).resolve().parents[1]
    users = sorted(str(p.relative_to(root)) for d in ("llmlab", "benchmarks") for p in (root / d).rglob("*.py")
                   if re.search(r"\.loss\(", p.read_text()) and not p.name.startswith("mutation"))  # they quote code
    assert users == ["llmlab/training/evaluate.py", "llmlab/training/parallel.py"]  # parallel: the training loss


def test_fresh_trains_again(capsys, tmp_path, corpus):
    out = tmp_path / "c"
    argv = ["compare", "--presets", "basic", "--data", corpus, "--out", out, *TINY[:-2]]
    assert run(capsys, *argv)[0] == 0
    (out / "runs" / "basic" / "marker").write_text("from the first run")
    code, _, _ = run(capsys, *argv, "--fresh")
    results = json.loads((out / "results.json").read_text())
    assert code == 0 and results[0]["status"] == "ok" and "reused" not in results[0]
    assert not (out / "runs" / "basic" / "marker").exists()  # the run directory was started over
