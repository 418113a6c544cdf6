"""Multi-head latent attention (naive_mla, rope_mla): absorbed decode = decompressed decode = full
recompute, the latent cache's size, config errors, training, compiled decoding."""
from __future__ import annotations

import pytest
import torch

from conftest import tiny, tiny_model
from llmlab import LlmlabError, Transformer, generate
from llmlab.model.mla import MultiHeadLatentAttention

MLA_PRESETS = ["naive_mla", "rope_mla"]


def mla(preset="rope_mla", **kw) -> Transformer:
    sizes = dict(block_size=128, n_embd=48, n_head=4)  # head 12: d_c 48, d_r 6, nope 12, v 12
    sizes.update(kw)
    m = tiny_model(preset=preset, **sizes).eval()
    with torch.no_grad():  # larger than the init, so that a slip shows in the logits
        for name, p in m.named_parameters():
            if p.dim() > 1:
                p.normal_(0, 0.15)
    return m


def set_absorb(model: Transformer, on: bool) -> None:
    for blk in model.blocks:
        blk.attn.absorb = on


def cached_logits(model, prompts: list[list[int]], cont: torch.Tensor) -> torch.Tensor:
    """Left-padded batched prefill of ragged prompts, then one-token steps feeding `cont` (B, n);
    returns every step's last-position logits (B, n + 1, V)."""
    b, t0 = len(prompts), max(len(p) for p in prompts)
    idx = torch.zeros(b, t0, dtype=torch.long)
    for i, p in enumerate(prompts):
        idx[i, t0 - len(p):] = torch.tensor(p)
    cache = model.new_cache(b, t0 + cont.shape[1])
    cache.set_padding(torch.tensor([t0 - len(p) for p in prompts]))
    out = [model(idx, cache, 0)[:, -1]]
    for j in range(cont.shape[1]):
        out.append(model(cont[:, j:j + 1], cache, t0 + j)[:, -1])
    return torch.stack(out, dim=1)


def recomputed_logits(model, prompts, cont) -> torch.Tensor:
    """The same logits from a full forward of each row alone (no cache, no padding)."""
    rows = []
    for i, p in enumerate(prompts):
        seq = torch.cat([torch.tensor(p), cont[i]])[None]
        rows.append(model(seq)[0, len(p) - 1:])
    return torch.stack(rows)


@pytest.mark.parametrize("preset", MLA_PRESETS)
@pytest.mark.parametrize("q_lora_rank", [None, 16])
def test_absorbed_equals_decompressed_equals_recompute(preset, q_lora_rank):
    model = mla(preset, q_lora_rank=q_lora_rank, v_head_dim=8)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 97, (n,), generator=g).tolist() for n in (70, 5, 33)]  # past one block of 64
    cont = torch.randint(0, 97, (3, 12), generator=g)
    with torch.no_grad():
        ref = recomputed_logits(model, prompts, cont)
        absorbed = cached_logits(model, prompts, cont)
        set_absorb(model, False)
        decompressed = cached_logits(model, prompts, cont)
    scale = ref.abs().max()
    assert (absorbed - ref).abs().max() <= 1e-4 * scale
    assert (decompressed - ref).abs().max() <= 1e-4 * scale


def test_absorbed_path_is_taken_and_never_decompresses(monkeypatch):
    """One-token steps must not run kv_up over the cache (the whole point of absorption)."""
    model = mla()
    cache = model.new_cache(1, 20)
    with torch.no_grad():
        model(torch.randint(0, 97, (1, 10)), cache, 0)
        calls = []
        for blk in model.blocks:
            monkeypatch.setattr(blk.attn, "decompressed_attention", lambda *a, **k: calls.append(1))
        model(torch.randint(0, 97, (1, 1)), cache, 10)
    assert calls == []


def test_absorbed_attention_equals_per_head_naive_formula():
    """absorbed_attention against the paper's formula written out head by head with explicit
    decompressed keys and values (an independent, loop-based reference)."""
    torch.manual_seed(1)
    attn = MultiHeadLatentAttention(tiny(preset="rope_mla", n_embd=48, n_head=4, v_head_dim=8)).double()
    b, t, s, h = 2, 3, 9, attn.n_head
    q_nope = torch.randn(b, h, t, attn.d_nope, dtype=torch.double)
    q_pe = torch.randn(b, h, t, attn.d_r, dtype=torch.double)
    kv = torch.randn(b, s, attn.d_c + attn.d_r, dtype=torch.double)
    mask = torch.zeros(b, 1, t, s, dtype=torch.double)
    mask[0, 0, :, :2] = float("-inf")
    got = attn.absorbed_attention(q_nope, q_pe, kv, mask)
    w = attn.kv_up.weight.view(h, attn.d_nope + attn.d_v, attn.d_c)
    want = torch.zeros(b, h, t, attn.d_v, dtype=torch.double)
    for bi in range(b):
        for hi in range(h):
            c, k_pe = kv[bi, :, : attn.d_c], kv[bi, :, attn.d_c:]
            k = torch.cat([c @ w[hi, : attn.d_nope].T, k_pe], dim=-1)  # (S, d_nope + d_r)
            v = c @ w[hi, attn.d_nope:].T  # (S, d_v)
            q = torch.cat([q_nope[bi, hi], q_pe[bi, hi]], dim=-1)  # (T, d_nope + d_r)
            scores = q @ k.T / (attn.d_nope + attn.d_r) ** 0.5 + mask[bi, 0]
            want[bi, hi] = torch.softmax(scores, -1) @ v
    assert torch.allclose(got, want, atol=1e-12)


@pytest.mark.parametrize("preset, rope", [("naive_mla", 0), ("rope_mla", 6)])
@pytest.mark.parametrize("q_lora_rank", [None, 16])
def test_latent_cache_bytes_per_token(preset, rope, q_lora_rank):
    model = mla(preset, q_lora_rank=q_lora_rank)
    c = model.config
    assert (c.latent_dim, c.rope_head_dim) == (4 * 12, rope)
    cache = model.new_cache(3, 40)
    assert list(cache.pools[0]) == ["kv"] and tuple(cache.pools[0]["kv"].shape) == (3, 40, c.latent_dim + rope)
    assert cache.bytes_per_token() == (c.latent_dim + rope) * c.n_layer * 4  # fp32, whatever n_head
    assert cache.bytes_per_token() < 2 * c.n_layer * c.n_head * c.head_size * 4  # below MHA's


@pytest.mark.parametrize("bad, match", [
    (dict(preset="rope_mla", n_kv_head=2), "no key/value heads"),
    (dict(preset="rope_mla", qk_rope_head_dim=3), "even"),
    (dict(preset="rope_mla", kv_lora_rank=0), "kv_lora_rank must be an integer >= 1"),
    (dict(preset="rope", kv_lora_rank=16), "apply to attention='mla' only"),
    (dict(preset="naive_mla", attention="mqa"), "unknown attention 'mqa'; choose one of: mha, mla"),
])
def test_mla_config_errors_are_clear(bad, match):
    with pytest.raises(LlmlabError, match=match):
        tiny(**bad)


@pytest.mark.parametrize("preset", MLA_PRESETS)
def test_a_few_training_steps_lower_the_loss(preset):
    torch.manual_seed(0)
    model = tiny_model(preset=preset).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    x = torch.randint(0, 97, (4, 32))
    losses = []
    for _ in range(15):
        loss = model.loss(x[:, :-1], x[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5, losses


@pytest.mark.slow
def test_compiled_decode_gives_eager_tokens():
    model = mla("rope_mla", block_size=64)
    prompts = [[1, 2, 3, 4, 5], [7, 8]]
    eager = generate(model, prompts, 20, temperature=0)
    compiled = generate(model, prompts, 20, temperature=0, compile=True)
    assert all(torch.equal(a, b) for a, b in zip(eager, compiled))


def naive_rope_mla_logits(model: Transformer, idx: torch.Tensor) -> torch.Tensor:
    """A rope_mla model's logits written out from its weights alone, token by token and head by head
    (DeepSeek-V2 §2.1: q = W_Q x, [c_kv | k_pe] = W_DKV x, c_kv normed, k_h = [W_UK_h c | RoPE(k_pe)],
    v_h = W_UV_h c; RoPE as a rotation of (x_i, x_{i+d/2}) by p·θ^(-2i/d)); float64."""
    cfg = model.config
    sd = {k: v.double() for k, v in model.state_dict().items()}
    h, d_c, d_r, d_n, d_v = cfg.n_head, cfg.latent_dim, cfg.rope_head_dim, cfg.nope_head_dim, cfg.value_head_dim

    def rms(x, w, eps):
        return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w

    def rope(x, p):  # x (..., d_r), position p
        half = d_r // 2
        ang = torch.tensor([p * cfg.rope_theta ** (-2 * i / d_r) for i in range(half)], dtype=torch.double)
        x1, x2 = x[..., :half], x[..., half:]
        return torch.cat([x1 * ang.cos() - x2 * ang.sin(), x1 * ang.sin() + x2 * ang.cos()], -1)

    t = idx.shape[1]
    x = sd["tok_emb.weight"][idx[0]]  # (T, C)
    for layer in range(cfg.n_layer):
        b = f"blocks.{layer}."
        a = rms(x, sd[b + "norm1.weight"], cfg.norm_eps)
        q = (a @ sd[b + "attn.q.weight"].T).view(t, h, d_n + d_r)
        down = a @ sd[b + "attn.kv_down.weight"].T
        c = rms(down[:, :d_c], sd[b + "attn.kv_norm.weight"], 1e-6)
        k_pe = torch.stack([rope(down[p, d_c:], p) for p in range(t)])
        w_up = sd[b + "attn.kv_up.weight"].view(h, d_n + d_v, d_c)
        out = torch.zeros(t, h, d_v, dtype=torch.double)
        for hi in range(h):
            k = torch.cat([c @ w_up[hi, :d_n].T, k_pe], -1)  # (T, d_n + d_r)
            v = c @ w_up[hi, d_n:].T
            for i in range(t):
                qi = torch.cat([q[i, hi, :d_n], rope(q[i, hi, d_n:], i)])
                scores = (k[: i + 1] @ qi) / (d_n + d_r) ** 0.5
                out[i, hi] = torch.softmax(scores, 0) @ v[: i + 1]
        x = x + out.reshape(t, h * d_v) @ sd[b + "attn.proj.weight"].T
        m = rms(x, sd[b + "norm2.weight"], cfg.norm_eps)
        gate, up = (m @ sd[b + "mlp.fc.weight"].T).chunk(2, -1)
        x = x + (torch.nn.functional.silu(gate) * up) @ sd[b + "mlp.proj.weight"].T
    return rms(x, sd["norm_f.weight"], cfg.norm_eps) @ sd["lm_head.weight"].T


def test_rope_mla_model_equals_a_naive_reference_from_its_weights():
    model = mla(block_size=32, n_layer=2)
    idx = torch.randint(0, 97, (1, 11), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        got = model.double()(idx)[0]
    want = naive_rope_mla_logits(model, idx)
    assert torch.allclose(got, want, atol=1e-6), (got - want).abs().max()  # rope tables are float32
