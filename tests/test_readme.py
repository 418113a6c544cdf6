"""The README's Python example runs as written (pasted into a fresh directory holding runs/a)."""
from __future__ import annotations

import re

import pytest

from conftest import REPO


def readme_python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(encoding="utf-8"), re.S)


@pytest.mark.slow
def test_readme_python_example_runs(tmp_path, monkeypatch):
    pytest.importorskip("transformers")  # the example exports to and imports from Hugging Face
    import llmlab
    from llmlab.checkpoint import save_checkpoint

    blocks = readme_python_blocks()
    assert blocks, "the README has no python example"
    monkeypatch.chdir(tmp_path)
    # the one thing the example assumes: a run at runs/a, as `llmlab train --out runs/a` leaves
    save_checkpoint(tmp_path / "runs" / "a" / "last", llmlab.Transformer(llmlab.preset_config("flash", vocab_size=256)))
    for code in blocks:
        scope: dict = {}
        exec(compile(code, "README.md", "exec"), scope)  # noqa: S102 - our own documentation
    assert scope["model"].config.attn_backend == "manual"  # the last line's override took effect
    assert scope["out"].shape == (1, 5 + 256) and len(scope["rows"]) == 2
    assert (tmp_path / "exported" / "model.safetensors").is_file()
