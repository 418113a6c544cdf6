"""DeepSeek-V2 interop: logit parity with transformers.DeepseekV2ForCausalLM on random weights both
ways (full-rank and low-rank queries, v_head_dim != qk_nope_head_dim), greedy tokens equal HF's,
`to_hf` round trip through AutoModelForCausalLM (MoE layers: tests/test_hf_deepseek_moe.py)."""
from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from test_hf import hf_greedy, ids, max_diff, randomize  # noqa: E402

import llmlab  # noqa: E402
from llmlab.hf import convert_from_hf, convert_to_hf, from_hf, to_hf  # noqa: E402

V, TOL = 96, 1e-4


def hf_deepseek(q_lora_rank=None, v_head_dim=16, seed=0, **kw):
    cfg = transformers.DeepseekV2Config(
        vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=128, kv_lora_rank=32, q_lora_rank=q_lora_rank,
        qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=v_head_dim, first_k_dense_replace=2,
        rope_theta=50000.0, rms_norm_eps=3e-5, bos_token_id=None, eos_token_id=None, pad_token_id=None, **kw)
    torch.manual_seed(seed)
    model = transformers.DeepseekV2ForCausalLM(cfg).eval()
    randomize(model, seed, std=0.1)
    return model


def logits(model, x):
    with torch.no_grad():
        out = model(x)
    return out.logits if hasattr(out, "logits") else out


CASES = [(None, 16), (24, 16), (None, 8), (24, 12)]


@pytest.mark.parametrize("q_lora_rank, v_head_dim", CASES)
def test_from_hf_parity(q_lora_rank, v_head_dim):
    hf = hf_deepseek(q_lora_rank, v_head_dim)
    x = ids(1, b=2, t=48)
    ref = logits(hf, x)
    m = from_hf(hf)
    c = m.config
    assert (c.attention, c.position, c.latent_dim, c.rope_head_dim, c.nope_head_dim, c.value_head_dim,
            c.q_lora_rank, c.rope_theta, c.norm_eps) == \
        ("mla", "rope", 32, 8, 16, v_head_dim, q_lora_rank, 50000.0, 3e-5)
    assert max_diff(logits(m, x), ref) <= TOL * ref.abs().max()
    assert max_diff(logits(from_hf(hf, attn_backend="manual"), x), ref) <= TOL * ref.abs().max()


def test_parity_needs_the_rope_reordering(monkeypatch):
    """Without reordering the rope rows (adjacent pairs -> half split) the logits differ: the
    parity above is not an accident of a rotation-free test."""
    import llmlab.hf.convert

    hf = hf_deepseek()
    x = ids(2, b=1, t=40)
    ref = logits(hf, x)
    monkeypatch.setattr(llmlab.hf.convert, "rope_to_half_split", lambda sd, cfg: sd)
    assert max_diff(logits(from_hf(hf), x), ref) > 1e-2


@pytest.mark.parametrize("q_lora_rank, v_head_dim", [(None, 8), (24, 16)])
def test_to_hf_round_trip(tmp_path, q_lora_rank, v_head_dim):
    cfg = llmlab.preset_config("rope_mla", vocab_size=V, n_layer=2, n_head=4, n_embd=64, block_size=64,
                               q_lora_rank=q_lora_rank, v_head_dim=v_head_dim)
    ours = llmlab.Transformer(cfg).eval()
    randomize(ours, 5, std=0.1)
    out = to_hf(ours, tmp_path / "hf")
    back = transformers.AutoModelForCausalLM.from_pretrained(str(out)).eval()
    assert type(back).__name__ == "DeepseekV2ForCausalLM"
    x = ids(3, b=2, t=40)
    ref = logits(ours, x)
    assert max_diff(logits(back, x), ref) <= TOL * ref.abs().max()
    again = from_hf(out)
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), again.state_dict().values()))


@pytest.mark.parametrize("use_cache", [True, False])
def test_greedy_tokens_equal_hf(use_cache):
    hf = hf_deepseek(q_lora_rank=24, seed=4)
    prompt = ids(9, b=1, t=8)
    ref = hf_greedy(hf, prompt, 32)
    assert ref.shape == (1, 40)
    assert torch.equal(llmlab.generate(from_hf(hf), prompt, 32, temperature=0, use_cache=use_cache), ref)


def test_convert_cli_helpers_round_trip(tmp_path):
    hf = hf_deepseek(q_lora_rank=24)
    hf.save_pretrained(tmp_path / "src")
    run = convert_from_hf(tmp_path / "src", tmp_path / "run")
    m = llmlab.load(run)
    assert m.config.attention == "mla"
    out = convert_to_hf(tmp_path / "run", tmp_path / "back")
    x = ids(4, b=1, t=30)
    back = transformers.AutoModelForCausalLM.from_pretrained(str(out)).eval()
    ref = logits(hf, x)
    assert max_diff(logits(back, x), ref) <= TOL * ref.abs().max()
