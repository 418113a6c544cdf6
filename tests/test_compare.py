"""`llmlab compare` end to end at tiny sizes, each run in its own process as in real use: two seeds
give two runs and a spread, a failing run is reported while the others finish, the timing turns
are round-robin, the claims follow results.json, a second run trains nothing, the output folder is
compare's own, and a killed comparison takes its workers with it."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llmlab.cli import main

ENTRIES = "kv_cache,sin=kv_cache,gqa2=kv_cache,bad=basic"
SETS = ["--set", "sin:position=sinusoidal", "--set", "gqa2:n_kv_head=2",
        "--set", "bad:lr=1e6"]  # bad: its loss turns NaN, a failure at run time, for real
TINY = ["--n-layer", "1", "--n-head", "4", "--n-embd", "32", "--block-size", "16", "--batch-size", "4",
        "--max-iters", "4", "--eval-interval", "2", "--eval-iters", "2", "--contexts", "8,24", "--decode-steps", "3",
        "--rounds", "2", "--seeds", "2", "--no-compile", "--threads", "1", "--jobs", "2", "--quiet"]


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
    """(out dir, exit code, stdout) of one comparison of the ENTRIES, two seeds each."""
    out = tmp_path_factory.mktemp("cmp") / "c"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LLMLAB_CACHE", str(tmp_path_factory.getbasetemp() / "llmlab-cache"))
        import io
        from contextlib import redirect_stdout

        buf = io.StringIO()
        with redirect_stdout(buf):
            code = main(["compare", "--presets", ENTRIES, *SETS, "--data", str(corpus), "--out", str(out), *TINY])
    return out, code, buf.getvalue()


def table(report: str, first_col: str) -> dict[str, dict[str, str]]:
    """The markdown table of report.md whose header starts with `first_col`, by its first cell."""
    lines = report.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith(f"| {first_col} |"))
    header = [c.strip() for c in lines[start].strip("|").split("|")]
    rows = {}
    for ln in lines[start + 2:]:
        if not ln.startswith("|"):
            break
        cells = [c.strip() for c in ln.strip("|").split("|")]
        rows[cells[0]] = dict(zip(header, cells))
    return rows


@pytest.mark.slow
def test_two_seeds_two_runs_a_spread_and_the_report_holds_the_json(compared):
    out, code, stdout = compared
    assert code == 1 and "compared 4 preset(s), 1 failed: bad" in stdout
    doc = json.loads((out / "results.json").read_text())
    names = [e["name"] for e in doc["entries"]]
    assert names == ["kv_cache", "sin", "gqa2", "bad"]
    rows = table((out / "report.md").read_text(), "preset")
    from llmlab.compare.stats import spread

    for e in doc["entries"][:3]:
        assert e["status"] == "ok" and e["seeds"] == [1337, 1338] and len(e["val_loss"]) == 2
        for seed in (1337, 1338):  # a normal run directory per seed
            assert (out / "runs" / e["name"] / f"seed{seed}" / "last" / "model.safetensors").is_file()
        s = spread(e["val_loss"])
        assert s.sd is not None and s.sd == pytest.approx(abs(e["val_loss"][0] - e["val_loss"][1]) / 2 ** 0.5)
        assert rows[e["name"]]["val loss (last eval)"] == f"{s.mean:.4f} ± {s.sd:.4f} (2 seeds)"
        assert e["peak_mem_mib"] > 50  # MiB of a process holding torch, not KiB or bytes
    by = {e["name"]: e for e in doc["entries"]}
    # a kind and a size from --set, and what each configuration changes against its preset
    assert by["sin"]["config"]["position"] == "sinusoidal" and by["sin"]["parent"] == "kv_cache"
    assert rows["sin"]["changes vs parent"] == "kv_cache: position learned → sinusoidal"
    assert rows["gqa2"]["changes vs parent"] == "kv_cache: n_kv_head 4 → 2"
    assert by["gqa2"]["cache_bytes_per_token"] * 2 == by["kv_cache"]["cache_bytes_per_token"] == 256
    assert re.fullmatch(r"[-+]\d\.\d{3} \((within|beyond) noise ±\d\.\d{3}\)", rows["sin"]["Δ vs parent"])
    # the failed run: one line in the report, the others complete
    bad = by["bad"]
    assert bad["status"] == "failed" and "nan" in bad["error"].lower() and "\n" not in bad["error"]
    assert rows["bad"]["changes vs parent"].startswith("failed: ")
    assert "Traceback" in (out / "runs" / "bad" / "seed1337" / "compare.log").read_text()
    report = (out / "report.md").read_text()
    for png in ("frontier.png", "val_loss.png", "decode.png", "cache_bytes.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
        assert f"]({png})" in report


@pytest.mark.slow
def test_timing_is_round_robin_across_processes(compared):
    out, _, _ = compared
    doc = json.loads((out / "results.json").read_text())
    timed = [e["name"] for e in doc["entries"] if e["status"] == "ok"]
    assert doc["timing_order"] == [[r, name] for r in range(2) for name in timed]
    for e in doc["entries"][:3]:
        t = e["timing"]
        assert t["error"] is None and len(t["rounds"]) == 2
        for r in t["rounds"]:
            assert r["train_tokens_per_s"] > 0 and set(r["decode"]["own"]) == {"8", "24"}
    logs = sorted(p.name for p in (out / "timing").glob("*.log"))
    assert logs == sorted(f"{n}.log" for n in timed)  # one process each


@pytest.mark.slow
def test_claims_follow_results_json(compared, tmp_path):
    """The claims table is computed: a number edited in results.json turns ✓ into ✗."""
    from llmlab.compare.claims import evaluate
    from llmlab.compare.report import render

    out, _, _ = compared
    doc = json.loads((out / "results.json").read_text())
    by = {e["name"]: e for e in doc["entries"]}
    by["sin"]["val_loss_whole"] = [v + 0.01 for v in by["kv_cache"]["val_loss_whole"]]  # within 0.05 of learned

    def claim(d, text):
        return next(c for c in evaluate(d) if c.text.startswith(text))

    assert claim(doc, "sinusoidal positions").verdict is True
    assert claim(doc, "MQA/GQA shrink the cache").verdict is True
    edited = tmp_path / "results.json"
    by["sin"]["val_loss_whole"][0] += 0.5
    by["gqa2"]["cache_bytes_per_token"] += 4
    edited.write_text(json.dumps(doc))
    doc2 = json.loads(edited.read_text())
    assert claim(doc2, "sinusoidal positions").verdict is False
    assert claim(doc2, "MQA/GQA shrink the cache").verdict is False
    text = render(doc2, [])
    row = next(ln for ln in text.splitlines() if "sinusoidal positions ≈ learned" in ln)
    assert "| ✗ |" in row and "fixed table" in row  # the ✗ stays, with its numbers and why


@pytest.mark.slow
def test_a_finished_run_is_a_normal_run_dir(capsys, compared):
    out, _, _ = compared
    code, text, _ = run(capsys, "sample", out / "runs" / "gqa2" / "seed1338", "--max-new-tokens", "5", "--seed", "0")
    assert code == 0 and text.strip()


@pytest.mark.slow
def test_second_run_trains_and_times_nothing_again(capsys, compared, corpus):
    out, _, _ = compared
    before = {p: p.read_bytes() for p in (out / "runs").glob("*/seed*/metrics.jsonl") if "bad" not in str(p)}
    timing = (out / "timing.json").read_bytes()
    # a comparison killed after a run's last step but before its result was written: that run is
    # measured again from its checkpoint, never trained again (nor refused as "nothing to do")
    killed = out / "runs" / "gqa2" / "seed1338"
    old = json.loads((killed / "compare.json").read_text())
    (killed / "compare.json").unlink()
    code, _, _ = run(capsys, "compare", "--presets", ENTRIES, *SETS, "--data", corpus, "--out", out, *TINY)
    assert code == 1  # bad is retried (it fails again), the others are reused
    doc = json.loads((out / "results.json").read_text())
    for e in doc["entries"][:3]:
        assert all(r["reused"] != (e["name"] == "gqa2" and r["seed"] == 1338) for r in e["runs"])
    again = json.loads((killed / "compare.json").read_text())
    assert again["status"] == "ok" and again["val_loss_whole"] == old["val_loss_whole"]
    assert again["train_s"] is None and again["peak_mem_mib"] is None  # not trained by this process: unknown
    assert {p: p.read_bytes() for p in before} == before and (out / "timing.json").read_bytes() == timing
    # other settings on the same --out: refused (its numbers would mix), --fresh would start over
    code, _, err = run(capsys, "compare", "--presets", ENTRIES, *SETS, "--data", corpus, "--out", out,
                       *TINY, "--max-iters", "5")
    assert code == 2 and "--fresh" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("argv, words", [
    (["--presets", "basic,warp"], ["unknown preset", "warp"]),
    (["--presets", "basic", "--set", "rope:n_head=2"], ["rope", "--presets"]),
    (["--presets", "basic", "--set", "basic:colour=2"], ["cannot be set"]),
    (["--presets", "basic", "--set", "basic:norm=batchnorm"], ["unknown norm", "rmsnorm"]),
    (["--presets", "basic", "--set", "basic:lr=fast"], ["lr"]),
    (["--presets", "gqa", "--set", "gqa:n_kv_head=3"], ["n_kv_head"]),
    (["--presets", "basic,basic"], ["twice"]),
    (["--presets", "a/b=basic"], ["folder"]),
    (["--presets", "basic", "--contexts", "8,x"], ["--contexts"]),
    (["--presets", "basic", "--seeds", "0"], ["--seeds"]),
    (["--presets", "basic", "--jobs", "0"], ["--jobs"]),
    (["--presets", "basic", "--contexts", "10000000"], ["within"]),
    (["--presets", "basic", "--rounds", "1000000"], ["--rounds"]),
])
def test_bad_input_is_one_line(capsys, tmp_path, argv, words):
    code, _, err = run(capsys, "compare", "--out", tmp_path / "c", *argv, "--block-size", "16", "--quiet")
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    for w in words:
        assert w in lines[0]
    assert not (tmp_path / "c").exists()  # refused before anything was made


def test_every_setting_is_a_flag_with_help(capsys):
    """The flags are derived from CompareSettings: each field is a flag, with its help and default."""
    import dataclasses

    from llmlab.compare.settings import CompareSettings
    from llmlab.settings import default_text, flag_name

    with pytest.raises(SystemExit):
        main(["compare", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for f in dataclasses.fields(CompareSettings):
        assert flag_name(f.name) in text, f.name
        assert " ".join(f"(default: {default_text(f)})".split()) in text, f.name


def test_nothing_but_mean_loss_evaluates():
    """One evaluation: the only model.loss() outside training's step is evaluate.mean_loss."""
    root = Path(__file__).resolve().parents[1]
    users = sorted(str(p.relative_to(root)) for d in ("src/llmlab", "benchmarks") for p in (root / d).rglob("*.py")
                   if re.search(r"\.loss\(", p.read_text()) and not p.name.startswith("mutation"))  # they quote code
    assert users == ["src/llmlab/training/evaluate.py", "src/llmlab/training/parallel.py"]  # parallel: the training loss


# ---- the output folder is compare's own -----------------------------------------------------------
def project(tmp_path: Path) -> Path:
    """A user's project folder: their own runs/flash and notes."""
    (tmp_path / "runs" / "flash" / "last").mkdir(parents=True)
    (tmp_path / "runs" / "flash" / "last" / "config.json").write_text("{}")
    (tmp_path / "report.md").write_text("my notes")
    return tmp_path


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


@pytest.mark.parametrize("fresh", [[], ["--fresh"]])
def test_a_folder_compare_did_not_make_is_never_touched(capsys, tmp_path, monkeypatch, fresh):
    root = project(tmp_path)
    before = snapshot(root)
    monkeypatch.chdir(root)
    for out in (".", str(root)):
        code, _, err = run(capsys, "compare", "--presets", "flash", "--out", out, *fresh, "--quiet")
        assert code == 2 and "not made by llmlab compare" in err and len(err.strip().splitlines()) == 1
    assert snapshot(root) == before


def test_only_what_compare_made_is_deleted(tmp_path):
    from llmlab.compare.outdir import MARKER, check_out, claim, remove_run
    from llmlab.compare.settings import SPEC
    from llmlab.errors import LlmlabError

    out = tmp_path / "c"
    out.mkdir()
    assert check_out(out) == out  # empty: fine
    claim(out)
    assert (out / MARKER).is_file() and check_out(out) == out
    (out / "notes.txt").write_text("mine")  # a marked folder stays compare's
    assert check_out(out) == out
    ours, mine = out / "runs" / "a" / "seed1", out / "runs" / "b" / "seed1"
    for d in (ours, mine):
        d.mkdir(parents=True)
        (d / "metrics.jsonl").write_text("{}")
    (ours / SPEC).write_text("{}")
    remove_run(ours)
    assert not ours.exists()
    with pytest.raises(LlmlabError, match="not made by llmlab compare"):
        remove_run(mine)
    assert (mine / "metrics.jsonl").is_file() and (out / "notes.txt").read_text() == "mine"


@pytest.mark.slow
def test_fresh_redoes_only_its_runs(capsys, tmp_path, corpus):
    out = tmp_path / "c"
    argv = ["compare", "--presets", "kv_cache", "--data", corpus, "--out", out, *TINY[:-10], "--seeds", "1",
            "--rounds", "1", "--no-compile", "--quiet"]
    assert run(capsys, *argv)[0] == 0
    run_dir = out / "runs" / "kv_cache" / "seed1337"
    (run_dir / "marker").write_text("from the first run")
    (out / "mine").mkdir()
    (out / "mine" / "data.txt").write_text("user data")
    code, _, _ = run(capsys, *argv, "--fresh")
    assert code == 0 and not (run_dir / "marker").exists()  # its own run was started over
    assert (out / "mine" / "data.txt").read_text() == "user data"  # the user's files are untouched
    # a user folder where compare would put a run: refused, never deleted, even with --fresh
    (out / "runs" / "kv_cache" / "seed1338").mkdir()
    code, _, err = run(capsys, *argv, "--seeds", "2", "--fresh")
    assert code == 2 and "seed1338" in err and (out / "runs" / "kv_cache" / "seed1338").is_dir()


# ---- a killed comparison takes its workers with it --------------------------------------------------
def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return not re.search(r"^State:\s+Z", state, re.M)  # a zombie has ended


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_kill_9_of_compare_kills_its_worker(tmp_path, corpus):
    out = tmp_path / "c"
    cmd = [sys.executable, "-m", "llmlab", "compare", "--presets", "kv_cache", "--data", str(corpus), "--out",
           str(out), "--n-layer", "1", "--n-head", "4", "--n-embd", "32", "--block-size", "16", "--batch-size", "4",
           "--max-iters", "1000000", "--eval-interval", "1000000", "--no-compile", "--quiet"]
    parent = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                              env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")})
    lock = out / "runs" / "kv_cache" / "seed1337" / ".lock"  # train() writes its pid there
    worker = None
    try:
        deadline = time.time() + 120
        while worker is None and time.time() < deadline:
            m = re.search(r"pid (\d+)", lock.read_text()) if lock.is_file() else None
            worker = int(m.group(1)) if m else None
            time.sleep(0.2)
        assert worker is not None and worker != parent.pid and _alive(worker), "the worker never started"
        time.sleep(1.0)  # training
        assert _alive(worker)
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait()
        deadline = time.time() + 15
        while _alive(worker) and time.time() < deadline:
            time.sleep(0.2)
        assert not _alive(worker), "the worker outlived the killed comparison"
    finally:
        for pid in (parent.pid, worker):
            if pid and _alive(pid):
                os.kill(pid, signal.SIGKILL)


@pytest.mark.slow
def test_make_ladder_fills_the_docs_from_results_json(compared, tmp_path, capsys):
    """docs/make_ladder.py --no-run writes the comparison's own settings, claims and rung numbers
    into the ladder's blocks (the batch size is the comparison's, not a number typed in the prose)."""
    import importlib.util
    import shutil

    out, _, _ = compared
    spec = importlib.util.spec_from_file_location("make_ladder", Path(__file__).resolve().parents[1] / "docs" / "make_ladder.py")
    ml = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ml)
    ladder = tmp_path / "ladder.md"
    shutil.copy(ml.DOCS / "ladder.md", ladder)
    assert ml.main(["--no-run", "--out", str(out), "--ladder", str(ladder)]) == 0
    text = ladder.read_text()
    settings = text[text.index("<!-- numbers:settings -->"):text.index("### What each rung claims")]
    assert "4 steps of 4 x 16 tokens" in settings and "seeds 1337..1338" in settings
    assert re.search(r"\| mqa, gqa \| MQA/GQA shrink the cache by H/H_kv .*\| ✓ \|", text)
    kv = text[text.index("<!-- numbers:rung-kv_cache -->"):]
    assert kv.split("<!-- /numbers -->")[0].count("**Measured**") == 1
    assert "_Not in this comparison._" in text.split("<!-- numbers:rung-rope -->")[1].split("<!-- /numbers -->")[0]
    assert "Of " in text and " claims, " in text  # the reading, generated from the claims
