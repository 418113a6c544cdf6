"""The chat page at `/`: one static HTML file with its script inline (no build step, no CDN, no
request to anywhere but this server). It streams replies from /v1/chat/completions, can stop one
(aborting the request frees its cache row) and start a new chat, and shows the settings it sends."""
from __future__ import annotations

from functools import lru_cache
from importlib.resources import files


@lru_cache(maxsize=1)
def html() -> str:
    return files("llmlab.serve").joinpath("static/chat.html").read_text(encoding="utf-8")
