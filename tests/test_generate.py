"""Generation: cached == recomputed, batched == alone, samplers stay in their allowed sets."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import tiny_model
from llmlab import LlmlabError, generate
from llmlab.generation import sample_next, stream
from llmlab.presets import PRESETS


@pytest.mark.parametrize("preset", list(PRESETS))
def test_greedy_cached_equals_recomputed(preset):
    model = tiny_model(preset=preset, block_size=64).eval()
    idx = torch.randint(0, 97, (2, 7))
    cached = generate(model, idx, 40, temperature=0, use_cache=True)
    recomputed = generate(model, idx, 40, temperature=0, use_cache=False)
    assert cached.shape == (2, 47)
    assert torch.equal(cached, recomputed)


@pytest.mark.parametrize("preset", list(PRESETS))
def test_cached_decode_step_logits_equal_full_recompute(preset):
    model = tiny_model(preset=preset).eval()
    idx = torch.randint(0, 97, (2, 20))
    full = model(idx)
    cache = model.new_cache(2, 32)
    with torch.no_grad():
        prefill = model(idx[:, :12], cache, 0)
        steps = [model(idx[:, t:t + 1], cache, t) for t in range(12, 20)]
    assert (prefill - full[:, :12]).abs().max() <= 1e-5
    assert (torch.cat(steps, 1) - full[:, 12:]).abs().max() <= 1e-5


def test_batched_ragged_prompts_equal_each_alone():
    model = tiny_model(preset="kv_cache", position="rope").eval()
    prompts = [[5, 6, 7], [1, 2, 3, 4, 5, 6, 7, 8, 9], [42]]
    batched = generate(model, prompts, 15, temperature=0)
    for p, row in zip(prompts, batched):
        alone = generate(model, torch.tensor([p]), 15, temperature=0)[0]
        assert torch.equal(row, alone)
    # sampling too: same seed, same per-row stream only when alone; here check shapes and prefixes
    sampled = generate(model, prompts, 5, temperature=1.0, seed=3)
    assert [len(r) for r in sampled] == [len(p) + 5 for p in prompts]
    assert all(r[: len(p)].tolist() == p for p, r in zip(prompts, sampled))


@pytest.mark.parametrize("position", ["learned", "rope", "sinusoidal"])
def test_generation_past_block_size(position):
    model = tiny_model(preset="kv_cache", position=position, block_size=16).eval()
    idx = torch.randint(0, 97, (2, 10))
    cached = generate(model, idx, 30, temperature=0)  # 40 tokens > block_size 16
    assert cached.shape == (2, 40)
    assert torch.equal(cached, generate(model, idx, 30, temperature=0, use_cache=False))


def test_seed_and_stop_tokens():
    model = tiny_model(preset="kv_cache").eval()
    idx = torch.randint(0, 97, (3, 4))
    a = generate(model, idx, 20, temperature=1.0, top_k=10, seed=7)
    b = generate(model, idx, 20, temperature=1.0, top_k=10, seed=7)
    assert torch.equal(a, b)
    greedy = generate(model, idx[:1], 20, temperature=0)
    stop = int(greedy[0, 4 + 5])  # the 6th new token
    steps = list(stream(model, idx[:1], 20, temperature=0, stop_tokens=[stop]))
    assert int(steps[-1][0]) == stop and len(steps) <= 6


logits_strategy = st.lists(st.floats(-20, 20, allow_nan=False), min_size=2, max_size=40)


@settings(max_examples=150, deadline=None)
@given(values=logits_strategy, k=st.integers(1, 40), seed=st.integers(0, 2**31 - 1))
def test_top_k_stays_in_top_k(values, k, seed):
    logits = torch.tensor([values])
    allowed = set(torch.topk(logits[0], min(k, len(values))).indices.tolist())
    kth = torch.topk(logits[0], min(k, len(values))).values[-1]
    allowed |= set(torch.nonzero(logits[0] == kth).flatten().tolist())  # ties with the k-th
    gen = torch.Generator().manual_seed(seed)
    for _ in range(5):
        assert int(sample_next(logits, 1.0, top_k=k, generator=gen)) in allowed


@settings(max_examples=150, deadline=None)
@given(values=logits_strategy, p=st.floats(0.01, 1.0), seed=st.integers(0, 2**31 - 1))
def test_top_p_stays_in_nucleus(values, p, seed):
    logits = torch.tensor([values], dtype=torch.float32)
    probs = torch.softmax(logits[0].double(), -1).tolist()
    order = sorted(range(len(values)), key=lambda i: -probs[i])
    allowed, mass = set(), 0.0
    for i in order:  # smallest prefix of most likely tokens reaching p (ties and rounding: +1e-6)
        allowed.add(i)
        mass += probs[i]
        if mass >= p - 1e-6:
            break
    allowed |= {i for i in range(len(values)) if any(abs(probs[i] - probs[j]) < 1e-7 for j in allowed)}
    gen = torch.Generator().manual_seed(seed)
    for _ in range(5):
        assert int(sample_next(logits, 1.0, top_p=p, generator=gen)) in allowed


def test_decode_attention_equals_sdpa():
    """The one-token attention the compiled step uses, against SDPA (GQA groups, padding mask)."""
    from llmlab.model.attention import decode_attention, sdpa_attention

    q, k, v = torch.randn(3, 8, 1, 16), torch.randn(3, 2, 11, 16), torch.randn(3, 2, 11, 16)
    mask = torch.zeros(3, 1, 1, 11)
    mask[0, ..., 7:] = float("-inf")  # row 0: later slots not written yet
    mask[2, ..., :4] = float("-inf")  # row 2: left padding
    assert (decode_attention(q, k, v, mask) - sdpa_attention(q, k, v, mask, 0.0)).abs().max() <= 1e-6


@pytest.mark.slow
def test_compiled_generation_equals_eager_without_recompiling():
    """generate(compile=True): same greedy tokens as eager for ragged batches and new lengths, and
    one compiled graph serves them all (any recompile or compile failure would warn -> error)."""
    import warnings

    model = tiny_model(preset="llama", block_size=64).eval()
    prompts = [[5, 6, 7], [1, 2, 3, 4, 5, 6, 7, 8, 9]]
    eager = generate(model, prompts, 12, temperature=0)
    assert all(torch.equal(a, b) for a, b in zip(generate(model, prompts, 12, temperature=0, compile=True), eager))
    with warnings.catch_warnings(), torch._dynamo.config.patch(error_on_recompile=True):
        warnings.simplefilter("error", RuntimeWarning)
        for n_prompt, n_new in ((4, 30), (13, 7)):  # other cache lengths: the same graph
            idx = torch.randint(0, 97, (2, n_prompt))
            assert torch.equal(generate(model, idx, n_new, temperature=0, compile=True),
                               generate(model, idx, n_new, temperature=0))


@pytest.mark.slow
def test_compiled_generation_rolls_past_block_size():
    model = tiny_model(preset="kv_cache", block_size=16).eval()
    idx = torch.randint(0, 97, (1, 10))
    assert torch.equal(generate(model, idx, 20, temperature=0, compile=True),
                       generate(model, idx, 20, temperature=0, use_cache=False))


def test_compile_failure_falls_back_to_eager_and_warns_once(monkeypatch):
    import warnings
    import weakref

    import llmlab.compiled

    def broken(*args):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(llmlab.compiled, "_compile_for_one_model", lambda: broken)
    monkeypatch.setattr(llmlab.compiled, "_steps", weakref.WeakKeyDictionary())
    monkeypatch.setattr(llmlab.compiled, "_compile_failed", False)
    model = tiny_model(preset="kv_cache").eval()
    idx = torch.randint(0, 97, (2, 5))
    with pytest.warns(RuntimeWarning, match=r"no C\+\+ compiler"):
        out = generate(model, idx, 8, temperature=0, compile=True)
    assert torch.equal(out, generate(model, idx, 8, temperature=0))
    other = tiny_model(preset="gqa").eval()
    with warnings.catch_warnings():  # the failure was reported once; later generations stay quiet
        warnings.simplefilter("error", RuntimeWarning)
        for m in (model, other):
            assert torch.equal(generate(m, idx, 4, temperature=0, compile=True), generate(m, idx, 4, temperature=0))
    with pytest.raises(LlmlabError, match="use_cache=False"):
        generate(model, idx, 2, compile=True, use_cache=False)


def test_uncompiled_decoding_keeps_dynamo_guards(monkeypatch):
    """Skipping dynamo's guard checks is for the compiled step only; eager decoding never sets it."""
    calls = []
    monkeypatch.setattr(torch.compiler, "set_stance", lambda *a, **k: calls.append((a, k)))
    generate(tiny_model(preset="kv_cache").eval(), torch.randint(0, 97, (1, 4)), 6, temperature=0)
    assert calls == []


def test_several_models_compiled_in_one_process_keep_their_own_graphs(monkeypatch):
    """Each model gets its own compiled step: three models under a recompile limit of 1 still
    compile, give their eager tokens, and never fall back (which would warn). Dynamo's tracing and
    its limit are what is tested, so the graphs run on dynamo's eager backend (no C++ compile)."""
    import warnings

    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: real_compile(fn, fullgraph=True, backend="eager"))
    models = [tiny_model(preset=p, block_size=64, n_layer=1).eval() for p in ("kv_cache", "gqa", "rope_mla")]
    with warnings.catch_warnings(), torch._dynamo.config.patch(recompile_limit=1, fail_on_recompile_limit_hit=True):
        warnings.simplefilter("error", RuntimeWarning)
        for m in models:
            idx = torch.randint(0, 97, (2, 5))
            assert torch.equal(generate(m, idx, 6, temperature=0, compile=True), generate(m, idx, 6, temperature=0))
