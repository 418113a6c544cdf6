"""DeepSeek-V2/V3 interop with MoE layers: logit parity with transformers' DeepseekV2/V3ForCausalLM
on random weights (with and without shared experts, group-limited routing, q_lora, V3's selection
bias and both rope layouts), greedy tokens equal HF's, `to_hf` round trips through
AutoModelForCausalLM, and one-line refusals for what does not map."""
from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from test_hf import hf_greedy, ids, max_diff, one_line_error, randomize  # noqa: E402

import llmlab  # noqa: E402
from llmlab.hf import convert_from_hf, convert_to_hf, from_hf, to_hf  # noqa: E402

V, TOL = 96, 1e-4


def hf_moe(arch="deepseek_v3", seed=0, n_shared=1, group=None, q_lora_rank=None, **kw):
    """A 3-layer HF DeepSeek model (layer 0 dense, 1-2 MoE with 8 routed experts, top-2), random weights
    and, for V3, a random selection bias so that it changes which experts are chosen."""
    cls = {"deepseek_v2": (transformers.DeepseekV2Config, transformers.DeepseekV2ForCausalLM),
           "deepseek_v3": (transformers.DeepseekV3Config, transformers.DeepseekV3ForCausalLM)}[arch]
    routing = dict(n_group=group[0], topk_group=group[1]) if group else {}
    if arch == "deepseek_v2":
        routing["topk_method"] = "group_limited_greedy" if group else "greedy"
    elif not group:
        routing.update(n_group=1, topk_group=1)
    cfg = cls[0](
        vocab_size=V, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128, kv_lora_rank=32,
        q_lora_rank=q_lora_rank, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, first_k_dense_replace=1,
        n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=n_shared, rope_theta=50000.0,
        rms_norm_eps=3e-5, bos_token_id=None, eos_token_id=None, pad_token_id=None, **routing, **kw)
    torch.manual_seed(seed)
    model = cls[1](cfg).eval()
    randomize(model, seed, std=0.1)
    if arch == "deepseek_v3":
        g = torch.Generator().manual_seed(seed + 100)
        for layer in model.model.layers[1:]:
            layer.mlp.gate.e_score_correction_bias.copy_(0.05 * torch.randn(8, generator=g))
    return model


def logits(model, x):
    with torch.no_grad():
        out = model(x)
    return out.logits if hasattr(out, "logits") else out


CASES = {
    "v2-shared2-greedy": dict(arch="deepseek_v2", n_shared=2, routed_scaling_factor=1.5),
    "v2-noshared-grouped-qlora": dict(arch="deepseek_v2", n_shared=0, group=(4, 2), q_lora_rank=24),
    "v3-shared-grouped-qlora": dict(arch="deepseek_v3", group=(4, 2), q_lora_rank=24, routed_scaling_factor=2.5),
    "v3-noshared-unnormalised": dict(arch="deepseek_v3", n_shared=0, norm_topk_prob=False),
    "v3-half-split-rope": dict(arch="deepseek_v3", rope_interleave=False, group=(2, 1)),
}


@pytest.mark.parametrize("case", CASES)
def test_from_hf_parity(case):
    kw = CASES[case]
    hf = hf_moe(**kw)
    x = ids(1, b=2, t=48)
    ref = logits(hf, x)
    m = from_hf(hf)
    c = m.config
    v3 = kw["arch"] == "deepseek_v3"
    assert (c.mlp, c.dense_layers, c.routed_experts, c.experts_per_token, c.expert_size) == ("moe", 1, 8, 2, 32)
    assert c.shared_experts == kw.get("n_shared", 1) and c.router_score == ("sigmoid" if v3 else "softmax")
    assert (c.n_group, c.topk_group) == (kw.get("group") or (None, None))
    assert c.normalize_topk == (v3 and kw.get("norm_topk_prob", True))
    assert c.routed_scale == kw.get("routed_scaling_factor", 2.5 if v3 else 1.0)
    assert [type(b.mlp).__name__ for b in m.blocks] == ["SwiGLU", "MoE", "MoE"]
    assert max_diff(logits(m, x), ref) <= TOL * ref.abs().max()


def test_parity_depends_on_the_selection_bias():
    """V3's e_score_correction_bias becomes router.bias and changes the chosen experts: without it
    the logits differ (the parity above is not blind to it)."""
    hf = hf_moe("deepseek_v3", seed=3)
    x = ids(2, b=1, t=40)
    ref = logits(hf, x)
    m = from_hf(hf)
    assert max_diff(logits(m, x), ref) <= TOL * ref.abs().max()
    for block in m.blocks[1:]:
        block.mlp.router.bias.zero_()
    assert max_diff(logits(m, x), ref) > 1e-2


@pytest.mark.parametrize("arch", ["deepseek_v2", "deepseek_v3"])
@pytest.mark.parametrize("use_cache", [True, False])
def test_greedy_tokens_equal_hf(arch, use_cache):
    hf = hf_moe(arch, seed=4, group=(4, 2), q_lora_rank=24)
    prompt = ids(9, b=1, t=8)
    ref = hf_greedy(hf, prompt, 32)
    assert ref.shape == (1, 40)
    assert torch.equal(llmlab.generate(from_hf(hf), prompt, 32, temperature=0, use_cache=use_cache), ref)


def ours(seed=5, **kw):
    cfg = llmlab.preset_config("deepseek", vocab_size=V, n_layer=3, n_head=4, n_embd=64, block_size=64, **kw)
    m = llmlab.Transformer(cfg).eval()
    randomize(m, seed, std=0.1)
    g = torch.Generator().manual_seed(seed)
    for block in m.blocks[1:]:  # a trained balancing bias
        block.mlp.router.bias.copy_(0.05 * torch.randn(block.mlp.router.bias.shape, generator=g))
    return m


@pytest.mark.parametrize("kw, arch", [
    (dict(), "DeepseekV3ForCausalLM"),
    (dict(n_shared_experts=0, n_group=4, topk_group=2, q_lora_rank=24, routed_scaling_factor=2.0), "DeepseekV3ForCausalLM"),
    (dict(moe_score="softmax", n_shared_experts=2, n_group=2, topk_group=1), "DeepseekV2ForCausalLM"),
], ids=["v3", "v3-noshared-grouped-qlora", "v2-softmax-grouped"])
def test_to_hf_round_trip(tmp_path, kw, arch):
    m = ours(**kw)
    if arch == "DeepseekV2ForCausalLM":  # V2 has no selection bias: a zero one exports
        for block in m.blocks[1:]:
            block.mlp.router.bias.zero_()
    out = to_hf(m, tmp_path / "hf")
    back = transformers.AutoModelForCausalLM.from_pretrained(str(out)).eval()
    assert type(back).__name__ == arch
    x = ids(3, b=2, t=40)
    ref = logits(m, x)
    assert max_diff(logits(back, x), ref) <= TOL * ref.abs().max()
    again = from_hf(out)
    assert again.config == m.config.replace(**{k: v for k, v in again.config.to_dict().items()
                                               if getattr(m.config, k) is None})  # explicit where ours derived
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), again.state_dict().values()))


def test_to_hf_refuses_what_does_not_map(tmp_path):
    softmax = ours(moe_score="softmax")  # its router.bias is non-zero: DeepSeek-V2 has no place for it
    one_line_error(to_hf, softmax, tmp_path / "a", match="router.bias is non-zero")
    one_line_error(to_hf, ours(moe_score="softmax", norm_topk_prob=True), tmp_path / "b", match="normalises")
    gpt_moe = llmlab.Transformer(llmlab.preset_config("moe", vocab_size=V, n_layer=2, n_embd=64, block_size=32))
    one_line_error(to_hf, gpt_moe, tmp_path / "c", match="attention='mla'")
    assert not any((tmp_path / d).exists() for d in "abc")


@pytest.mark.parametrize("kw, match", [
    (dict(arch="deepseek_v2", topk_method="noaux_tc"), "topk_method='noaux_tc'"),
    (dict(arch="deepseek_v2", norm_topk_prob=True), "norm_topk_prob"),
    (dict(arch="deepseek_v2", moe_layer_freq=2), "moe_layer_freq"),
])
def test_from_hf_refuses_what_does_not_map(tmp_path, kw, match):
    arch = kw.pop("arch")
    cfg = {"deepseek_v2": transformers.DeepseekV2Config}[arch](
        vocab_size=V, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, kv_lora_rank=32, q_lora_rank=None, qk_nope_head_dim=16, qk_rope_head_dim=8,
        v_head_dim=16, first_k_dense_replace=1, n_routed_experts=4, num_experts_per_tok=2, **kw)
    cfg.save_pretrained(tmp_path / "m")
    one_line_error(from_hf, tmp_path / "m", match=match)


def test_convert_cli_helpers_round_trip(tmp_path):
    hf = hf_moe("deepseek_v3", group=(4, 2), q_lora_rank=24)
    hf.save_pretrained(tmp_path / "src")
    run = convert_from_hf(tmp_path / "src", tmp_path / "run")
    m = llmlab.load(run)
    assert m.config.mlp == "moe" and m.config.router_score == "sigmoid"
    out = convert_to_hf(tmp_path / "run", tmp_path / "back")
    x = ids(4, b=1, t=30)
    back = transformers.AutoModelForCausalLM.from_pretrained(str(out)).eval()
    ref = logits(hf, x)
    assert max_diff(logits(back, x), ref) <= TOL * ref.abs().max()
    bias = "model.layers.1.mlp.gate.e_score_correction_bias"
    assert torch.equal(back.state_dict()[bias], hf.state_dict()[bias])
