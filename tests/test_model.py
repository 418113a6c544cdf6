"""The generic decoder: attention backends agree, causality, init, sizes, config errors."""
import math

import pytest
import torch

from llmlab.runtime import Runtime

from conftest import tiny, tiny_model
from llmlab import LlmlabError, Transformer
from llmlab.model.attention import manual_attention, sdpa_attention


def naive_attention(q, k, v):
    """Independent reference: loop over heads, explicit causal mask, repeated shared heads."""
    b, h, t, hd = q.shape
    rep = h // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    out = torch.empty_like(q)
    for i in range(h):
        s = q[:, i] @ k[:, i].transpose(-1, -2) / math.sqrt(hd)
        s = s.masked_fill(torch.triu(torch.ones(t, t, dtype=torch.bool), 1), float("-inf"))
        out[:, i] = torch.softmax(s, -1) @ v[:, i]
    return out


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_attention_kernels_equal_naive(kv_heads):
    q = torch.randn(2, 4, 9, 8, dtype=torch.float64)
    k, v = torch.randn(2, kv_heads, 9, 8, dtype=torch.float64), torch.randn(2, kv_heads, 9, 8, dtype=torch.float64)
    ref = naive_attention(q, k, v)
    torch.testing.assert_close(manual_attention(q, k, v, None, 0.0), ref)
    torch.testing.assert_close(sdpa_attention(q, k, v, None, 0.0), ref)


@pytest.mark.parametrize("position", ["learned", "sinusoidal", "rope"])
def test_manual_equals_sdpa_same_weights(position):
    basic = tiny_model(preset="basic", position=position).eval()
    flash = Transformer(basic.config, Runtime(attention="sdpa")).eval()
    assert basic.runtime.attention == "manual"
    flash.load_state_dict(basic.state_dict())
    idx = torch.randint(0, 97, (3, 32))
    assert (basic(idx) - flash(idx)).abs().max() <= 1e-5


@pytest.mark.parametrize("preset", ["basic", "flash"])
def test_causality(preset):
    model = tiny_model(preset=preset).eval()
    idx = torch.randint(0, 97, (1, 20))
    changed = idx.clone()
    changed[0, 12:] = (changed[0, 12:] + 1) % 97
    a, b = model(idx), model(changed)
    torch.testing.assert_close(a[:, :12], b[:, :12], rtol=0, atol=1e-6)
    assert (a[:, 12:] - b[:, 12:]).abs().max() > 1e-4  # later positions do see the change


def test_gpt2_init_and_tied_embeddings():
    model = tiny_model(n_layer=8, n_embd=256, n_head=8)
    assert model.lm_head.weight is model.tok_emb.weight
    std = model.blocks[0].attn.qkv.weight.std().item()
    resid = model.blocks[0].attn.proj.weight.std().item()
    assert abs(std - 0.02) < 0.002
    assert abs(resid - 0.02 / math.sqrt(2 * 8)) < 0.0005
    assert torch.all(model.blocks[0].attn.qkv.bias == 0)


def test_param_counts_by_hand():
    c = tiny(vocab_size=10, block_size=8, n_layer=1, n_head=2, n_embd=4)
    model = Transformer(c)
    d, f = 4, 16
    block = (2 * d) + (d * 3 * d + 3 * d) + (d * d + d) + (2 * d) + (d * f + f) + (f * d + d)
    emb, pos = 10 * d, 8 * d
    assert model.num_params() == emb + pos + block + 2 * d  # + final norm, head tied
    assert model.num_params(non_embedding=True) == block + 2 * d


def test_learned_positions_refuse_too_long_input():
    model = tiny_model()
    with pytest.raises(LlmlabError, match="block_size"):
        model(torch.zeros(1, 33, dtype=torch.long))


@pytest.mark.parametrize("bad, match", [
    (dict(n_embd=30, n_head=4), "divisible by n_head"),
    (dict(n_kv_head=3), "multiple of n_kv_head"),
    (dict(position="alibi"), "unknown position"),
    (dict(preset="nope"), "unknown preset"),
])
def test_config_errors_are_clear(bad, match):
    with pytest.raises(LlmlabError, match=match):
        tiny(**bad)


@pytest.mark.parametrize("preset", sorted(__import__("llmlab").PRESETS))
def test_training_loss_traces_as_one_graph(preset):
    """No host sync or graph break in the training forward of any rung (e.g. growing a position
    table from int(pos.max()) would break it): dynamo traces loss() with fullgraph=True."""
    torch._dynamo.reset()  # every preset traces loss()'s one code object: start each from a clean slate
    model = tiny_model(preset=preset, dropout=0.0)
    x = torch.randint(0, 97, (2, 16))
    loss = torch.compile(model.loss, fullgraph=True, backend="eager")(x, x)
    assert torch.allclose(loss, model.loss(x, x))
