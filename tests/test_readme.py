"""The README's Python example runs as written (pasted into a fresh directory holding runs/a)."""
from __future__ import annotations

import re

import pytest

from conftest import REPO


def readme_python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(encoding="utf-8"), re.S)


@pytest.mark.slow
def test_readme_python_example_runs(tmp_path, monkeypatch):
    """The example runs as pasted, twice in the same folder (it writes only into a new temp folder)."""
    pytest.importorskip("transformers")  # the example exports to and imports from Hugging Face
    blocks = readme_python_blocks()
    assert blocks, "the README has no python example"
    monkeypatch.chdir(tmp_path)
    for _ in range(2):
        scope: dict = {}
        for code in blocks:
            exec(compile(code, "README.md", "exec"), scope)  # noqa: S102 - our own documentation
        assert scope["model"].runtime.attention == "manual" and scope["model"].runtime.cache == "paged"
        assert scope["out"].shape == (1, 5 + 256) and len(scope["rows"]) == 2
        assert list(tmp_path.iterdir()) == []  # nothing written where it ran
