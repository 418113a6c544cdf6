"""The cache seam (issue 18): every cached rung gives the same tokens through the dense and the
paged cache as by recomputing (ragged batches, past one block), a paged sequence released
mid-batch gives its blocks to a newcomer with no stale values seen, and the compiled one-token
step traces as one graph over both kinds."""
from __future__ import annotations

import warnings

import pytest
import torch

from llmlab import generate
from llmlab.model import Transformer
from llmlab.presets import PRESETS, preset_config, preset_runtime
from llmlab.runtime import Runtime

CACHED = [name for name, p in PRESETS.items() if p.runtime.uses_cache]


def model_for(preset: str, **kw) -> Transformer:
    torch.manual_seed(0)
    sizes = dict(vocab_size=97, block_size=96, n_layer=2, n_head=4, n_embd=32) | kw
    m = Transformer(preset_config(preset, **sizes), preset_runtime(preset)).eval()
    with torch.no_grad():  # larger than the init, so that a slip shows in the tokens
        for p in m.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.3)
    return m


def prompts(lengths, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 97, (n,), generator=g).tolist() for n in lengths]


def test_every_cached_rung_is_covered():
    assert {"kv_cache", "mqa", "gqa", "naive_mla", "sinusoidal", "rope", "rope_mla", "flash_mla", "llama"} <= set(CACHED)


@pytest.mark.parametrize("preset", CACHED)
def test_dense_and_paged_caches_give_the_recomputed_tokens(preset):
    """Prompts of 5, 19 and 40 tokens, 30 new ones, blocks of 16: every row crosses blocks during
    prefill and decode; a learned-position rung (block_size 96) also rolls its window."""
    model = model_for(preset)
    ps = prompts((5, 19, 40))
    want = generate(model, ps, 30, temperature=0, cache="none")
    kinds = ["paged"] if model.runtime.attention == "flash_mla" else ["dense", "paged"]
    for kind in kinds:
        model.use_runtime(model.runtime.replace(cache=kind, block_size=16))
        got = generate(model, ps, 30, temperature=0)
        assert all(torch.equal(a, b) for a, b in zip(got, want)), (preset, kind)


@pytest.mark.parametrize("preset", ["gqa", "rope_mla"])
def test_a_released_sequence_gives_its_blocks_to_a_newcomer_mid_batch(preset):
    """Rows 0 and 1 decode together; row 0 finishes and is released (its blocks filled with a large
    finite garbage first: a stale read would show), a new sequence takes row 0 and reuses them
    while row 1 goes on. Every step's logits equal recomputing that row's sequence alone."""
    model = model_for(preset)
    model.use_runtime(Runtime(cache="paged", block_size=16))
    cache = model.new_cache(2, 64)
    seqs = {0: prompts((21,), 2)[0], 1: prompts((9,), 3)[0]}

    def check(logits, rows):
        for i, r in enumerate(rows):
            alone = model(torch.tensor([seqs[r]]))[0, -1]
            assert (logits[i] - alone).abs().max() <= 1e-4 * alone.abs().max(), (r, len(seqs[r]))

    def feed(rows, new):  # new: {row: [tokens]} appended to each row, left-padded
        t = max(len(new[r]) for r in rows)
        idx = torch.zeros(len(rows), t, dtype=torch.long)
        for i, r in enumerate(rows):
            idx[i, t - len(new[r]):] = torch.tensor(new[r])
        step = cache.step(rows, [len(new[r]) for r in rows])
        return model(idx, step=step)[:, -1]

    with torch.no_grad():
        check(feed([0, 1], {0: seqs[0], 1: seqs[1]}), [0, 1])
        for _ in range(14):  # row 0 crosses into its third block (21 + 14 > 32)
            nxt = {r: [int(torch.randint(0, 97, ()))] for r in (0, 1)}
            for r in (0, 1):
                seqs[r] += nxt[r]
            check(feed([0, 1], nxt), [0, 1])
        freed = cache.blocks(0)
        for layer in cache.pools:
            for pool in layer.values():
                pool[freed] = 1e4
        cache.release(0)
        seqs[0] = prompts((40,), 4)[0]
        check(feed([0], {0: seqs[0]}), [0])  # the newcomer's prefill, alone
        assert set(cache.blocks(0)) & set(freed)  # it took freed blocks
        for _ in range(6):  # then both decode together again
            nxt = {r: [int(torch.randint(0, 97, ()))] for r in (0, 1)}
            for r in (0, 1):
                seqs[r] += nxt[r]
            check(feed([0, 1], nxt), [0, 1])


@pytest.mark.parametrize("kind", ["dense", "paged"])
def test_the_compiled_decode_step_is_one_graph_over_either_cache(kind, monkeypatch):
    """torch.compile(fullgraph=True) of the one-token step (on dynamo's eager backend: tracing,
    not code generation, is what this checks) follows the eager step's tokens, with no recompile
    across steps, over both cache kinds (the paged one's metadata prepared on the host)."""
    import torch._dynamo

    from llmlab import compiled

    monkeypatch.setattr(compiled, "COMPILE_OPTIONS", None)
    monkeypatch.setattr(compiled, "_compile_failed", False)  # else an earlier failure decodes eagerly, unwarned
    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: real(fn, backend="eager", fullgraph=True))
    compiled._steps.clear()
    model = model_for("rope_mla", block_size=64)
    model.use_runtime(Runtime(cache=kind, block_size=16))
    ps = prompts((5, 12))
    want = generate(model, ps, 24, temperature=0)
    torch._dynamo.reset()
    with torch._dynamo.config.patch(error_on_recompile=True), warnings.catch_warnings():
        warnings.simplefilter("error")  # a compile failure would warn and decode eagerly
        got = generate(model, ps, 24, temperature=0, compile=True)
    assert all(torch.equal(a, b) for a, b in zip(got, want))


@pytest.mark.parametrize("preset", list(PRESETS))
def test_memory_guards_are_exact_for_every_preset(preset):
    """The guards' sizes equal what is measured: parameters of a real build (from a meta-device
    build), and cache bytes of allocated dense and paged caches (from the kind's per-token spec)."""
    from llmlab import memory

    config = preset_config(preset, vocab_size=97, block_size=64, n_layer=2, n_head=4, n_embd=32)
    model = Transformer(config)
    assert memory.count_params(config) == model.num_params() == sum(p.numel() for p in model.parameters())
    assert memory.param_bytes(config) == sum(p.numel() * p.element_size() for p in model.parameters())
    for kind in ("dense", "paged"):
        cache = model.new_cache(3, 64, kind=kind)
        assert memory.cache_bytes(config, 3, 64) == cache.bytes_per_token() * 3 * 64, kind


def test_a_paged_pool_smaller_than_every_row_at_full_length():
    """new_cache(num_blocks=N): N usable blocks shared by the rows (what a server admits by); a step
    the pool cannot hold is refused whole, and a released row's blocks serve the next one, whose
    logits still equal recomputing it alone."""
    from llmlab.errors import LlmlabError

    model = model_for("llama")
    model.use_runtime(Runtime(cache="paged", block_size=16))
    cache = model.new_cache(4, 64, num_blocks=5)
    assert cache.num_free_blocks == 5
    seq = prompts((40,), 5)[0]  # 3 blocks
    with torch.no_grad():
        model(torch.tensor([seq]), step=cache.step([0], [40]))
        assert cache.num_free_blocks == 2
        with pytest.raises(LlmlabError, match="exhausted"):
            cache.step([1], [40])
        assert cache.num_free_blocks == 2 and cache.lengths()[1] == 0
        cache.release(0)
        logits = model(torch.tensor([seq]), step=cache.step([1], [40]))[0, -1]
    alone = model(torch.tensor([seq]))[0, -1]
    assert (logits - alone).abs().max() <= 1e-4 * alone.abs().max()
    with pytest.raises(LlmlabError, match="num_blocks"):
        model.new_cache(4, 64, kind="dense", num_blocks=5)
    with pytest.raises(LlmlabError, match="num_blocks"):
        model.new_cache(4, 64, kind="paged", num_blocks=0)


def test_a_paged_step_reads_only_the_blocks_its_longest_row_needs():
    """The step's block table (what a read gathers and attention scans) is as wide as its longest
    row needs (at least two blocks), not max_len; logits still equal recomputing."""
    model = model_for("llama")
    model.use_runtime(Runtime(cache="paged", block_size=16))
    cache = model.new_cache(2, 128)  # 8 blocks a row
    short, long = prompts((5,), 6)[0], prompts((40,), 7)[0]
    with torch.no_grad():
        step = cache.step([0], [5])
        model(torch.tensor([short]), step=step)
        assert step.table.shape == (1, 2)
        step = cache.step([1], [40])
        model(torch.tensor([long]), step=step)
        assert step.table.shape == (1, 3)
        step = cache.step([0, 1], [1, 1])
        logits = model(torch.tensor([[7], [8]]), step=step)[:, -1]
        assert step.table.shape == (2, 3) and step.read(0, "k").shape[2] == 48
    for i, seq in enumerate((short + [7], long + [8])):
        alone = model(torch.tensor([seq]))[0, -1]
        assert (logits[i] - alone).abs().max() <= 1e-4 * alone.abs().max()


def test_compiled_decode_past_the_position_tables_never_recompiles(monkeypatch):
    """RoPE tables start at block_size 16 and grow with each longer generation (20, 41, 83
    positions): the cache hands the compiled step its cut of them, whose length is dynamic, so
    one graph serves every length (on dynamo's eager backend)."""
    import torch._dynamo

    from llmlab import compiled

    monkeypatch.setattr(compiled, "COMPILE_OPTIONS", None)
    monkeypatch.setattr(compiled, "_compile_failed", False)  # else an earlier failure decodes eagerly, unwarned
    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: real(fn, backend="eager", fullgraph=True))
    compiled._steps.clear()
    model = model_for("rope", block_size=16)
    prompt = torch.tensor([prompts((3,))[0]])
    torch._dynamo.reset()
    generate(model, prompt, 17, temperature=0, compile=True)  # compiles once
    with torch._dynamo.config.patch(error_on_recompile=True), warnings.catch_warnings():
        warnings.simplefilter("error")
        for n in (38, 80):  # the tables grow past what the graph saw
            got = generate(model, prompt, n, temperature=0, compile=True)
            assert torch.equal(got, generate(model, prompt, n, temperature=0))
