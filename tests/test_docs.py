"""docs/ladder.md states no number a new comparison could contradict outside the blocks that
docs/make_ladder.py fills from results.json, and the numbers it does state are computed."""
from __future__ import annotations

import re

from conftest import REPO

LADDER = REPO / "docs" / "ladder.md"
BLOCK = re.compile(r"<!-- numbers:[\w-]+ -->\n.*?<!-- /numbers -->", re.S)


def test_deepseek_v2_cache_ratio_is_keys_and_values():
    """MLA's cache against MHA's keys *and* values at DeepSeek-V2's sizes: 2·128·128 / (512 + 64) ≈ 57."""
    import llmlab.model  # noqa: F401 - registers the attention kinds
    from llmlab.config import ModelConfig
    from llmlab.model.cache import values_per_token
    from llmlab.registry import lookup

    sizes = dict(n_layer=1, n_head=128, head_dim=128, n_embd=5120)
    mla = ModelConfig(**sizes, attention="mla", kv_lora_rank=512, qk_rope_head_dim=64, position="rope")

    def per_token(cfg):  # what the attention kind caches per token and layer
        return values_per_token(lookup("attention", cfg.attention).cache_spec(cfg))

    ratio = per_token(ModelConfig(**sizes)) / per_token(mla)
    assert round(ratio) == 57
    text = LADDER.read_text()
    assert f"≈ 1/{round(ratio)} of MHA's keys and values" in text and "1/28" not in text


def test_ladder_prose_states_no_measured_numbers_or_settings():
    prose = BLOCK.sub("", LADDER.read_text())
    assert not re.search(r"\d+ steps of \d+ x \d+", prose)  # the settings are filled from results.json
    assert not re.search(r"\b[1-9]\.\d{2,}\b", prose)  # no measured numbers (2.28, 1.94, 1.12 ...) outside the blocks
    assert not re.search(r"\d[\d,]* (train )?tokens/s", prose)  # nor speeds
    names = set(re.findall(r"<!-- numbers:([\w-]+) -->", LADDER.read_text()))
    from llmlab.presets import PRESETS

    assert {"settings", "claims", "reading", "table", "attention", "speed"} <= names
    assert {f"rung-{p}" for p in PRESETS} <= names  # every rung has its numbers block
