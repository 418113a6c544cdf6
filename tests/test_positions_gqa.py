"""Shared key/value heads (GQA/MQA) and position encodings (sinusoidal, RoPE)."""
import math

import pytest
import torch

from conftest import tiny, tiny_model
from llmlab import Transformer
from llmlab.model.positions import apply_rope, rope_tables, sinusoidal_table


def expand_kv_heads(gqa: Transformer) -> Transformer:
    """An MHA model whose k/v projections are the GQA ones, each repeated for its query group."""
    c = gqa.config
    mha = Transformer(c.replace(n_kv_head=None)).eval()
    sd = gqa.state_dict()
    hd, h, hkv = c.head_size, c.n_head, c.kv_heads
    for i in range(c.n_layer):
        for name in ("weight", "bias"):
            key = f"blocks.{i}.attn.qkv.{name}"
            q, k, v = sd[key].split([h * hd, hkv * hd, hkv * hd])
            rep = lambda t: t.view(hkv, hd, *t.shape[1:]).repeat_interleave(h // hkv, 0).reshape(h * hd, *t.shape[1:])
            sd[key] = torch.cat([q, rep(k), rep(v)])
    mha.load_state_dict(sd)
    return mha


@pytest.mark.parametrize("preset", ["basic", "flash"])
@pytest.mark.parametrize("kv", [1, 2, 4])
def test_gqa_equals_mha_with_repeated_heads(preset, kv):
    gqa = tiny_model(preset=preset, n_kv_head=kv, position="rope").eval()
    mha = expand_kv_heads(gqa)
    idx = torch.randint(0, 97, (2, 24))
    assert (gqa(idx) - mha(idx)).abs().max() <= 1e-5
    if kv == 4:  # n_kv_head == n_head is plain MHA: same parameter shapes, same function
        assert gqa.config.kv_heads == gqa.config.n_head
        assert {k: v.shape for k, v in gqa.state_dict().items()} == {k: v.shape for k, v in mha.state_dict().items()}


@pytest.mark.parametrize("preset, kv", [("kv_cache", 4), ("gqa", 2), ("mqa", 1)])
def test_cache_stores_only_kv_heads(preset, kv):
    model = tiny_model(preset=preset)
    cache = model.new_cache(3, 20)
    c = model.config
    assert c.kv_heads == kv
    assert tuple(cache.pools[0]["k"].shape) == tuple(cache.pools[0]["v"].shape) == (3, kv, 20, c.head_size)
    assert cache.bytes_per_token() == 2 * c.n_layer * kv * c.head_size * 4  # fp32


def test_n_head_not_multiple_of_n_kv_head():
    from llmlab import LlmlabError

    with pytest.raises(LlmlabError, match=r"n_head \(4\) must be a multiple of n_kv_head \(3\)"):
        tiny(n_kv_head=3)


def test_sinusoidal_table_matches_closed_form():
    n, d = 50, 16
    table = sinusoidal_table(n, d)
    for p in (0, 1, 7, 49):
        for i in range(d // 2):
            angle = p / 10000 ** (2 * i / d)
            assert table[p, 2 * i].item() == pytest.approx(math.sin(angle), abs=1e-6)
            assert table[p, 2 * i + 1].item() == pytest.approx(math.cos(angle), abs=1e-6)


def test_rope_scores_depend_only_on_position_difference():
    hd = 16
    cos, sin = rope_tables(200, hd, theta=10000.0)
    q, k = torch.randn(hd, dtype=torch.float64), torch.randn(hd, dtype=torch.float64)

    def score(pq, pk):
        rq = apply_rope(q[None, None, None].float(), cos[pq], sin[pq])
        rk = apply_rope(k[None, None, None].float(), cos[pk], sin[pk])
        return (rq * rk).sum().item()

    for m, n in [(5, 2), (40, 3), (17, 17)]:
        for shift in (1, 10, 150):
            assert score(m + shift, n + shift) == pytest.approx(score(m, n), abs=1e-4)
    assert abs(score(9, 2) - score(9, 5)) > 1e-3  # and it does depend on the difference


def test_rope_rotation_by_hand():
    """Pair (x_j, x_{j+d/2}) rotates by angle p·theta^(-2j/d) (half-split layout)."""
    hd, p, theta = 8, 3, 100.0
    cos, sin = rope_tables(p + 1, hd, theta)
    x = torch.randn(hd)
    out = apply_rope(x[None, None, None], cos[p], sin[p])[0, 0, 0]
    for j in range(hd // 2):
        a = p * theta ** (-2 * j / hd)
        x1, x2 = x[j].item(), x[j + hd // 2].item()
        assert out[j].item() == pytest.approx(x1 * math.cos(a) - x2 * math.sin(a), abs=1e-5)
        assert out[j + hd // 2].item() == pytest.approx(x2 * math.cos(a) + x1 * math.sin(a), abs=1e-5)


def test_rope_tables_are_not_saved():
    model = tiny_model(preset="rope")
    assert not any("cos" in k or "sin" in k for k in model.state_dict())


@pytest.mark.parametrize("preset", ["rope", "sinusoidal", "llama"])
def test_cached_decode_past_block_size_equals_recompute(preset):
    model = tiny_model(preset=preset, block_size=16).eval()
    idx = torch.randint(0, 97, (2, 40))  # longer than block_size: tables grow
    full = model(idx)
    cache = model.new_cache(2, 48)
    with torch.no_grad():
        model(idx[:, :10], cache, 0)
        steps = torch.cat([model(idx[:, t:t + 1], cache, t) for t in range(10, 40)], 1)
    assert (steps - full[:, 10:]).abs().max() <= 1e-5
    # (greedy generation past block_size, cached vs recomputed, is test_generate's
    # test_generation_past_block_size; these logits are the stronger check)


def test_sinusoidal_positions_start_at_the_token_embeddings_scale():
    """At init the added position signal is about as large as the token signal (was ~35x larger:
    a table of amplitude 1 beside embeddings of std 0.02), and the table is still the fixed
    sinusoids, scaled, with no parameters."""
    model = Transformer(tiny(preset="sinusoidal", n_embd=64, block_size=64))
    rms = lambda t: t.float().pow(2).mean().sqrt().item()  # noqa: E731
    tok, pos = rms(model.tok_emb.weight), rms(model.pos.table)
    assert 0.5 < pos / tok < 2, (pos, tok)
    assert pos == pytest.approx(0.02, rel=1e-3)  # sin² + cos² = 1 per pair: RMS 1/√2 before scaling by 0.02·√2
    assert torch.allclose(model.pos.table, sinusoidal_table(64, 64) * 0.02 * math.sqrt(2))
    learned = Transformer(tiny(preset="kv_cache", n_embd=64, block_size=64))
    assert learned.num_params() - model.num_params() == 64 * 64 and not list(model.pos.parameters())
    model.pos.ensure_length(100)  # grown on demand at the same scale
    assert torch.allclose(model.pos.table, sinusoidal_table(100, 64) * 0.02 * math.sqrt(2))
