"""The MoE MLP (llmlab/model/moe.py): its output against a naive per-token reference (scores, bias,
group limits, normalisation, scaling, shared experts, capacity), the grouped matmul against the loop
reference (values and gradients), one compiled graph, the balance loss, sizes and config errors."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from llmlab import LlmlabError, Transformer, preset_config
from llmlab.config import ModelConfig
from llmlab.model.expert_mm import expert_matmul, expert_mm_loop
from llmlab.model.moe import MoE

D = 32


def moe_layer(seed=0, **kw) -> MoE:
    cfg = ModelConfig(vocab_size=16, n_layer=2, n_embd=D, mlp="moe", bias=False, moe_intermediate_size=16, **kw)
    torch.manual_seed(seed)
    layer = MoE(cfg)
    with torch.no_grad():  # large random weights and a random selection bias: routing decisions matter
        for p in layer.parameters():
            p.normal_(0, 0.3)
        layer.router.bias.normal_(0, 0.1)
    layer.record_load = layer.record_balance_loss = True  # as a balancer turns them on
    return layer


def naive(layer: MoE, x: torch.Tensor, capacity=None) -> torch.Tensor:
    """Token by token, expert by expert, as DeepSeek-V3 §2.1.2 writes it (no sorting, no batching)."""
    r, e = layer.router, layer.experts
    flat = x.reshape(-1, x.shape[-1])
    picks = []
    for tok in flat:
        logits = r.weight @ tok
        s = logits.sigmoid() if r.score == "sigmoid" else logits.softmax(-1)
        choice = (s + r.bias).tolist()
        allowed = set(range(r.n_experts))
        if r.n_group:
            size = r.n_experts // r.n_group
            groups = [choice[g * size:(g + 1) * size] for g in range(r.n_group)]
            rank = [sum(sorted(g)[-2:]) if r.score == "sigmoid" else max(g) for g in groups]
            best = sorted(range(r.n_group), key=lambda g: -rank[g])[:r.topk_group]
            allowed = {g * size + j for g in best for j in range(size)}
        top = sorted(allowed, key=lambda i: -choice[i])[:r.k]
        w = torch.stack([s[i] for i in top])
        if r.normalize:
            w = w / w.sum()
        picks.append((top, w * r.scale, [s[i].item() for i in top]))
    kept = {}  # (token, expert) -> kept under capacity: the best-scored `capacity` of each expert
    if capacity is not None:
        for i in range(r.n_experts):
            mine = sorted(((sc, t) for t, (top, _, scs) in enumerate(picks) for j, sc in zip(top, scs) if j == i),
                          reverse=True)
            kept.update({(t, i): n < capacity for n, (_, t) in enumerate(mine)})
    out = []
    for t, (tok, (top, w, _)) in enumerate(zip(flat, picks)):
        y = torch.zeros_like(tok)
        for i, wi in zip(top, w):
            if kept.get((t, i), True):
                gate, up = (e.fc[i] @ tok).chunk(2)
                y = y + wi * (e.proj[i] @ (F.silu(gate) * up))
        if layer.shared is not None:
            y = y + layer.shared(tok)
        out.append(y)
    return torch.stack(out).view_as(x)


CASES = {
    "sigmoid-normalised": dict(),
    "softmax-v2": dict(moe_score="softmax", routed_scaling_factor=2.0),
    "sigmoid-grouped-noshared": dict(n_group=4, topk_group=2, n_shared_experts=0),
    "softmax-grouped-2shared": dict(moe_score="softmax", n_group=2, topk_group=1, n_shared_experts=2),
    "top3-unnormalised": dict(num_experts_per_tok=3, norm_topk_prob=False, routed_scaling_factor=2.5),
}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("impl", ["loop", "grouped"])
def test_forward_equals_naive_reference(case, impl):
    layer = moe_layer(**CASES[case]).eval()
    layer.experts.impl = impl  # torch._grouped_mm runs fp32 on CPU eagerly
    x = torch.randn(2, 9, D, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(layer(x), naive(layer, x), rtol=1e-5, atol=1e-5)


def test_capacity_drops_the_lowest_scored_assignments_in_training_only():
    layer = moe_layer(moe_capacity_factor=0.5)
    x = torch.randn(2, 12, D, generator=torch.Generator().manual_seed(2))
    capacity = math.ceil(0.5 * 24 * 2 / 8)
    with torch.no_grad():
        got = layer.train()(x)
        torch.testing.assert_close(got, naive(layer, x, capacity), rtol=1e-5, atol=1e-5)
        counts, dropped = layer.load_log[-1]
        assert torch.equal(dropped, (counts - capacity).clamp(min=0)) and dropped.sum() > 0
        torch.testing.assert_close(layer.eval()(x), naive(layer, x), rtol=1e-5, atol=1e-5)


def test_a_plain_training_loop_records_nothing_it_does_not_use():
    """Without a balancer asking (llmlab.training.balance), training forwards keep no load log and
    build no balance loss (whose graph would outlive the step); a balancer without the auxiliary
    loss asks for the loads only."""
    from llmlab.training.balance import ExpertBalance

    model = Transformer(preset_config("moe", vocab_size=40, n_layer=2, n_head=2, n_embd=32, block_size=16)).train()
    moe = [b.mlp for b in model.blocks if isinstance(b.mlp, MoE)]
    x = torch.randint(40, (2, 16), generator=torch.Generator().manual_seed(1))
    for _ in range(3):
        model.loss(x, x).backward()
    assert moe and all(m.load_log == [] and m.balance_loss is None for m in moe)
    ExpertBalance(model, bias_rate=0.01, aux_weight=0.0)
    model.loss(x, x).backward()
    assert all(len(m.load_log) == 1 and m.balance_loss is None for m in moe)
    ExpertBalance(model, aux_weight=0.1)
    model.loss(x, x)
    assert all(m.balance_loss is not None and m.balance_loss.requires_grad for m in moe)


def test_balance_loss_matches_the_formula():
    layer = moe_layer().train()
    b, t, e, k = 3, 10, 8, 2
    x = torch.randn(b, t, D, generator=torch.Generator().manual_seed(3))
    layer(x)
    flat = x.reshape(-1, D)
    with torch.no_grad():
        s = (flat @ layer.router.weight.t()).sigmoid()
        _, chosen, _ = layer.router(flat)
    want = 0.0
    for seq in range(b):
        rows = slice(seq * t, (seq + 1) * t)
        f = [e / (k * t) * int((chosen[rows] == i).sum()) for i in range(e)]
        p = (s[rows] / s[rows].sum(-1, keepdim=True)).mean(0)
        want += sum(fi * pi for fi, pi in zip(f, p.tolist())) / b
    assert layer.balance_loss.item() == pytest.approx(want, rel=1e-5)
    assert layer.balance_loss.requires_grad  # it trains the router


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_grouped_matmul_equals_the_loop_reference_with_gradients(dtype):
    """torch._grouped_mm (one kernel) and the loop op, values and both gradients, with an empty expert;
    float64 also checks the loop op's autograd formula numerically (gradcheck)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(13, 16, generator=g).to(dtype).requires_grad_()
    w = torch.randn(4, 16, 24, generator=g).to(dtype).requires_grad_()
    offs = torch.tensor([3, 3, 9, 13], dtype=torch.int32)  # expert 1 gets no rows
    gy = torch.randn(13, 24, generator=g).to(dtype)
    ref = torch.cat([x[0:3] @ w[0], x[3:9] @ w[2], x[9:13] @ w[3]])
    ref_grads = torch.autograd.grad(ref, (x, w), gy)
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else {}
    for impl in ("loop", "grouped") if dtype == torch.bfloat16 else ("loop",):
        y = expert_matmul(x, w, offs, impl)
        torch.testing.assert_close(y, ref, **tol)
        for a, b in zip(torch.autograd.grad(y, (x, w), gy), ref_grads):
            torch.testing.assert_close(a, b, **tol)
    if dtype == torch.float64:
        assert torch.autograd.gradcheck(lambda a, b: expert_mm_loop(a, b, offs), (x, w))


def test_auto_picks_the_grouped_kernel_for_bf16_only():
    layer = moe_layer()
    x = torch.randn(2, 8, D)
    calls = []
    grouped = torch.nn.functional.grouped_mm
    try:
        torch.nn.functional.grouped_mm = lambda *a, **kw: calls.append(1) or grouped(*a, **kw)
        layer(x)
        assert not calls  # fp32: the loop op (torch's grouped kernel cannot be traced in fp32)
        layer.bfloat16()(x.bfloat16())
        assert len(calls) == 2  # bf16: both expert matmuls through torch._grouped_mm
    finally:
        torch.nn.functional.grouped_mm = grouped


@pytest.mark.parametrize("preset, kw", [("moe", {}), ("deepseek", dict(n_group=2, topk_group=1)),
                                         ("moe", dict(moe_capacity_factor=1.0))])
def test_loss_compiles_as_one_graph(preset, kw):
    """torch.compile(fullgraph=True): no graph break and no host sync in the forward (a .item() or
    data-dependent shape would break the graph); same loss, gradients and recorded loads as eager."""
    cfg = preset_config(preset, vocab_size=40, n_layer=2, n_head=2, n_embd=32, block_size=16, **kw)
    torch.manual_seed(0)
    model = Transformer(cfg)
    x = torch.randint(40, (2, 16), generator=torch.Generator().manual_seed(1))
    y = torch.roll(x, -1, 1)
    results = []
    for fn in (model.loss, torch.compile(model.loss, fullgraph=True, backend="aot_eager")):
        model.zero_grad()
        moe = [b.mlp for b in model.blocks if isinstance(b.mlp, MoE)]
        for m in moe:
            m.load_log.clear()
            m.record_load = m.record_balance_loss = True
        loss = fn(x, y) + sum(m.balance_loss for m in moe)
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters()],
                        [torch.stack(m.load_log) for m in moe]))
    (l0, g0, n0), (l1, g1, n1) = results
    torch.testing.assert_close(l1, l0)
    for a, b in zip(g1, g0):
        torch.testing.assert_close(a, b)
    assert all(torch.equal(a, b) for a, b in zip(n1, n0))


def test_first_k_dense_replace_and_active_params():
    cfg = preset_config("deepseek", vocab_size=40, n_layer=3, n_head=2, n_embd=32, block_size=16)
    model = Transformer(cfg)
    assert [type(b.mlp).__name__ for b in model.blocks] == ["SwiGLU", "MoE", "MoE"]
    assert model.blocks[0].mlp.proj.in_features == cfg.ffn_size  # the dense layer keeps the full width
    i = cfg.expert_size
    assert (cfg.routed_experts, cfg.experts_per_token, cfg.shared_experts, i) == (8, 2, 1, cfg.ffn_size // 3)
    idle = 2 * (8 - 2) * 3 * 32 * i  # 2 MoE layers, 6 experts a token skips, 3 matrices of D x I each
    assert model.num_active_params() == model.num_params() - idle


def test_router_bias_is_a_saved_buffer_without_gradient():
    model = Transformer(preset_config("moe", vocab_size=40, n_layer=1, n_embd=32, block_size=16))
    router = model.blocks[0].mlp.router
    assert "blocks.0.mlp.router.bias" in model.state_dict()
    assert all(p is not router.bias for p in model.parameters())


@pytest.mark.parametrize("kw, match", [
    (dict(n_routed_experts=True), "n_routed_experts must be int"),
    (dict(num_experts_per_tok=2.0), "num_experts_per_tok must be int"),
    (dict(n_shared_experts=-1), "n_shared_experts must be an integer >= 0"),
    (dict(num_experts_per_tok=9), r"num_experts_per_tok \(9\) must be <= n_routed_experts \(8\)"),
    (dict(moe_score="relu"), "moe_score must be one of"),
    (dict(norm_topk_prob=1), "norm_topk_prob must be bool"),
    (dict(routed_scaling_factor=float("nan")), "routed_scaling_factor must be a finite number"),
    (dict(routed_scaling_factor=True), "routed_scaling_factor must be float"),
    (dict(routed_scaling_factor=-1.0), "routed_scaling_factor must be a finite number > 0"),
    (dict(moe_capacity_factor=0), "moe_capacity_factor must be a finite number > 0"),
    (dict(n_group=3, topk_group=1), r"n_group \(3\) must divide"),
    (dict(n_group=2), "needs both n_group and topk_group"),
    (dict(n_group=2, topk_group=3), r"topk_group \(3\) must be <= n_group"),
    (dict(n_group=8, topk_group=2), "2 best experts"),
    (dict(n_group=4, topk_group=1, num_experts_per_tok=3), "eligible groups must hold k experts"),
    (dict(first_k_dense_replace=2), r"first_k_dense_replace \(2\) must be < n_layer \(2\)"),
])
def test_bad_moe_settings_are_one_line(kw, match):
    with pytest.raises(LlmlabError, match=match) as e:
        ModelConfig(n_layer=2, mlp="moe", **kw)
    assert "\n" not in str(e.value)


def test_moe_fields_on_a_dense_model_are_refused():
    with pytest.raises(LlmlabError, match="n_routed_experts, first_k_dense_replace apply to mlp='moe' only"):
        ModelConfig(mlp="swiglu", n_routed_experts=4, first_k_dense_replace=1)


@pytest.mark.slow
def test_compiled_decode_step_equals_eager():
    """generate(compile=True) runs the MoE one-token step through inductor (the loop op inside the
    graph): same greedy tokens as eager. A compile failure would warn (here: an error)."""
    import warnings

    from llmlab import generate

    torch.manual_seed(0)
    model = Transformer(preset_config("deepseek", vocab_size=40, n_layer=2, n_head=2, n_embd=32, block_size=32)).eval()
    idx = torch.randint(40, (2, 5), generator=torch.Generator().manual_seed(1))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        assert torch.equal(generate(model, idx, 12, temperature=0, compile=True), generate(model, idx, 12, temperature=0))
