"""The comparison's arithmetic without training anything: mean ± spread and "within noise", the
claims on hand-made results (each number chosen so the verdict is known), controlled pairs, the
--set parser (kinds included) and the one cache-kind helper."""
from __future__ import annotations

import math

import pytest
import torch

from llmlab.compare.claims import evaluate
from llmlab.compare.report import controlled_pairs
from llmlab.compare.results import change_groups, config_diff
from llmlab.compare.settings import CompareSettings, parse_overrides
from llmlab.compare.stats import compare_means, faster, speed_range, spread
from llmlab.presets import preset_config

SIZES = dict(vocab_size=256, n_layer=2, n_head=8, n_embd=64, block_size=32)


def test_spread_and_noise_against_hand_computed_values():
    s = spread([2.0, 2.2, 2.4])
    assert s.mean == pytest.approx(2.2) and s.sd == pytest.approx(0.2) and s.n == 3
    t = spread([2.1, 2.3, 2.5])  # the same spread, 0.1 higher
    band = 2 * math.sqrt(0.2 ** 2 / 3 + 0.2 ** 2 / 3)  # 0.327
    d, beyond, words = compare_means(t, s)
    assert d == pytest.approx(0.1) and beyond is False and words == f"+0.100 (within noise ±{band:.3f})"
    far = spread([3.0, 3.01, 3.02])
    assert compare_means(far, spread([2.0, 2.01, 2.02]))[1] is True
    one = spread([2.0])
    assert one.sd is None and one.text() == "2.0000 (1 seed)"
    assert compare_means(one, s)[1] is None and "noise unknown" in compare_means(one, s)[2]
    r = speed_range([10.0, 30.0, 20.0])
    assert (r.median, r.lo, r.hi) == (20.0, 10.0, 30.0)
    assert faster(speed_range([31, 40]), r) is True and faster(r, speed_range([31, 40])) is False
    assert faster(speed_range([25, 40]), r) is None  # ranges overlap: within noise
    assert r.text() == "20.0 (10.0–30.0)" and speed_range([0.42, 0.4, 0.45]).text() == "0.42 (0.40–0.45)"
    assert speed_range([1234.4, 1200, 1300]).text() == "1,234 (1,200–1,300)"


def entry(name, preset, val, cache=None, rung=True, variants=("own",), rounds=(), tokens=(1, 2, 3), **over):
    from llmlab.compare.runtime import preset_recorded
    from llmlab.model import Transformer

    params = Transformer(preset_config(preset, **SIZES | over)).num_params()
    cfg = preset_recorded(preset, **SIZES | over)  # the model's fields and its runtime's, as compare records them
    return {"name": name, "preset": preset, "rung": rung, "status": "ok", "config": cfg, "params": params,
            "cache_bytes_per_token": cache, "val_loss_whole": list(val), "seeds": list(range(len(val))),
            "greedy_tokens": list(tokens), "timing": {"ready": {"variants": list(variants)}, "rounds": list(rounds)}}


def rounds(**per_variant):
    """Three timing rounds: variant -> {context: tokens/s}, the same each round ±1%."""
    return [{"train_tokens_per_s": 1000.0, "decode": {v: {str(c): x * f for c, x in d.items()}
                                                      for v, d in per_variant.items()}} for f in (0.99, 1.0, 1.01)]


def claim(doc, text):
    return next(c for c in evaluate(doc) if c.text.startswith(text))


def test_claims_on_known_numbers():
    mha, gqa, mqa = 2048, 512, 256  # 2 layers x 2 x {8, 2, 1} heads x 8 wide x 4 bytes
    doc = {"settings": {"contexts": [64, 512]}, "entries": [
        entry("flash", "flash", [2.30, 2.31], rounds=rounds(own={64: 100, 512: 10})),
        entry("kv_cache", "kv_cache", [2.30, 2.31], mha, rounds=rounds(own={64: 400, 512: 300})),
        entry("gqa", "kv_cache", [2.31, 2.32], gqa, rung=False, n_kv_head=2, rounds=rounds(own={64: 400, 512: 380})),
        entry("mqa", "kv_cache", [2.40, 2.41], mqa, rung=False, n_kv_head=1, rounds=rounds(own={64: 400, 512: 290})),
        entry("sinusoidal", "sinusoidal", [2.33, 2.34], mha),
        entry("rope", "rope", [2.10, 2.11], mha),
        entry("mla", "naive_mla", [2.32, 2.33], 512, variants=("own", "decompressing"),
              rounds=rounds(own={64: 400, 512: 350}, decompressing={64: 300, 512: 100})),
    ]}
    assert claim(doc, "the KV cache makes decode faster").verdict is True  # 4x then 30x
    assert claim(doc, "MQA/GQA shrink the cache").verdict is True
    speed = claim(doc, "MQA/GQA decode faster")
    assert speed.verdict is False and "mqa 0.97x" in speed.measured  # mqa is not faster: ✗ stays, with numbers
    assert claim(doc, "GQA keeps MHA-like quality").verdict is True  # +0.01
    mla = claim(doc, "MLA keeps MHA-like quality")
    assert mla.verdict is True and "+0.020" in mla.measured  # 512 B <= 2048/3; 2.325 - 2.305
    assert claim(doc, "MLA's absorbed decode beats").verdict is True  # 3.5x at 512
    sin = claim(doc, "sinusoidal positions")
    assert sin.verdict is True and sin.note == ""  # +0.03, and no position table
    assert claim(doc, "RoPE learns better").verdict is True
    assert claim(doc, "flash trains faster").verdict is None  # no basic here: not measured
    # one number changed: the verdict follows
    doc["entries"][6]["val_loss_whole"] = [2.35, 2.36]
    worse = claim(doc, "MLA keeps MHA-like quality")
    assert worse.verdict is False and "costs more" in worse.note  # +0.05, beyond noise
    for vals in ([2.30, 2.42], [2.34, 2.35]):  # +0.055 with seeds 0.12 apart; +0.040, beyond noise from 0
        doc["entries"][6]["val_loss_whole"] = vals  # but only 0.01 past the tolerance, inside the band 0.014
        noisy = claim(doc, "MLA keeps MHA-like quality")
        assert noisy.verdict is False and "less than the noise" in noisy.note and "costs more" not in noisy.note
    doc["entries"][6]["val_loss_whole"] = [2.35, 2.36]
    doc["entries"][6]["timing"]["rounds"] = rounds(own={64: 400, 512: 250}, decompressing={64: 300, 512: 100})
    assert claim(doc, "MLA's absorbed decode beats").verdict is False  # 2.5x < 3x
    doc["entries"][1]["timing"]["rounds"] = rounds(own={64: 400, 512: 20})
    assert claim(doc, "the KV cache makes decode faster").verdict is False  # 4x then 2x: the gap shrinks


def test_mla_at_four_heads_cannot_claim_a_third_of_the_cache():
    four = dict(n_head=4)
    doc = {"settings": {"contexts": [64]}, "entries": [
        entry("rope", "rope", [2.0, 2.0], 2048, **four),
        entry("mla", "rope_mla", [2.0, 2.0], 1152, rung=False, **four, norm="layernorm", mlp="gelu", bias=True,
              tie_embeddings=True)]}
    c = claim(doc, "MLA keeps MHA-like quality")
    assert c.verdict is False and "0.56 of MHA's" in c.measured


def test_flash_mla_tokens_claim():
    doc = {"settings": {"contexts": [64]}, "entries": [
        entry("rope_mla", "rope_mla", [2.0], 512, tokens=[5, 6, 7]),
        entry("flash_mla", "flash_mla", [2.0], 512, tokens=[5, 6, 7])]}
    assert claim(doc, "flash_mla gives rope_mla's tokens").verdict is True
    doc["entries"][1]["greedy_tokens"] = [5, 6, 8]
    c = claim(doc, "flash_mla gives rope_mla's tokens")
    assert c.verdict is False and c.measured.startswith("2 of 3")


def test_controlled_pairs_split_a_several_things_change():
    from llmlab.compare.runtime import preset_recorded

    rope, mla = preset_recorded("rope", **SIZES), preset_recorded("rope_mla", **SIZES)
    base = preset_recorded("llama", **SIZES, n_kv_head=8)  # rope_mla's block with MHA
    diff = config_diff(rope, mla)
    assert set(change_groups(diff)) == {"attention", "norm", "mlp", "bias", "tie_embeddings"}

    def e(name, cfg, parent=None, label="", groups=()):
        return {"name": name, "status": "ok", "config": cfg, "val_loss_whole": [2.0, 2.1], "parent": parent,
                "parent_label": label, "change_groups": list(groups)}

    doc = {"entries": [e("rope", rope), e("rope_mla", mla, "rope", "rope", change_groups(diff))]}
    assert "no controlled pair in this comparison" in controlled_pairs(doc)
    doc["entries"].append(e("llama_mha", base, "llama", "llama", ["attention"]))
    text = controlled_pairs(doc)
    assert "llama_mha → rope_mla changes only attention mha → mla" in text
    assert "rope → llama_mha changes the rest" in text and "norm layernorm → rmsnorm" in text


def test_set_takes_kinds_and_sizes():
    got = parse_overrides(["rope:norm=rmsnorm", "rope:tie=false", "rope:mlp=swiglu", "mla:kv_lora_rank=32",
                           "gqa:n-kv-head=4", "rope:position=sinusoidal", "mla:attention=mla"])
    assert got == {"rope": {"norm": "rmsnorm", "tie_embeddings": False, "mlp": "swiglu", "position": "sinusoidal"},
                   "mla": {"kv_lora_rank": 32, "attention": "mla"}, "gqa": {"n_kv_head": 4}}
    s = CompareSettings(presets=["rope", "x=rope_mla"], set=["x:kv_lora_rank=32", "rope:norm=rmsnorm"])
    s.validate()
    spec = s.run_spec(s.entries()[1], 7)
    assert spec["train"]["kv_lora_rank"] == 32 and spec["train"]["preset"] == "rope_mla" and spec["seed"] == 7
    from llmlab.training import TrainArgs

    args = TrainArgs(**s.run_spec(s.entries()[0], 1)["train"])  # what the worker trains with
    cfg = preset_config(args.preset, **args.model_overrides())
    assert cfg.norm == "rmsnorm" and cfg.position == "rope"


def test_cache_kind_is_read_in_one_place():
    from llmlab.compare.runtime import cache_kind, set_absorbed
    from llmlab.model import Transformer

    from llmlab.presets import preset_model

    kinds = {p: cache_kind(preset_model(p, **SIZES)) for p in ("basic", "kv_cache", "rope_mla", "flash_mla")}
    assert kinds == {"basic": "none", "kv_cache": "dense", "rope_mla": "dense", "flash_mla": "paged"}
    mla = preset_model("rope_mla", **SIZES).eval()
    x = torch.randint(0, 256, (1, 12))
    from llmlab.generation import generate

    absorbed = generate(mla, x, 6, temperature=0)
    assert set_absorbed(mla, False) and not mla.blocks[0].attn.absorb
    assert torch.equal(generate(mla, x, 6, temperature=0), absorbed)  # the same tokens, computed another way
    assert not set_absorbed(Transformer(preset_config("kv_cache", **SIZES)), False)
