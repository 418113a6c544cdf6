"""The flash_mla rung: rope_mla's model decoding through the paged latent cache and the fused MLA
decode kernel (the PyTorch reference here; the Triton kernel through its interpreter in a child
process). Its tokens and logits must be rope_mla's on the same weights."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO, tiny, tiny_model
from llmlab import LlmlabError, Transformer, generate, load
from llmlab.checkpoint import save_checkpoint
from llmlab.model.paged_cache import PagedCache
from llmlab.runtime import Runtime
from test_mla import cached_logits, recomputed_logits


def pair(**kw) -> tuple[Transformer, Transformer]:
    """(rope_mla, flash_mla) sharing random weights."""
    torch.manual_seed(0)
    sizes = dict(block_size=256, n_embd=48, n_head=4)
    sizes.update(kw)
    dense = tiny_model(preset="rope_mla", **sizes).eval()
    with torch.no_grad():
        for p in dense.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.15)
    paged = Transformer(dense.config, Runtime(attention="flash_mla", cache="paged")).eval()
    paged.load_state_dict(dense.state_dict())
    return dense, paged


def prompts(lengths, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 97, (n,), generator=g).tolist() for n in lengths]


def test_flash_mla_logits_equal_recompute_ragged_past_one_block():
    dense, paged = pair(q_lora_rank=16)
    ps = prompts((70, 5, 130))
    cont = torch.randint(0, 97, (3, 10), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = recomputed_logits(dense, ps, cont)
        got = cached_logits(paged, ps, cont)
    assert (got - ref).abs().max() <= 1e-4 * ref.abs().max()


def test_flash_mla_greedy_tokens_equal_rope_mla():
    dense, paged = pair()
    ps = prompts((70, 3, 129))  # batch > 1, prompts longer than one block of 64
    a = generate(dense, ps, 24, temperature=0)
    b = generate(paged, ps, 24, temperature=0)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    # compile=True is accepted: the paged step is already one fused kernel call, run as it is
    c = generate(paged, ps, 8, temperature=0, compile=True)
    assert all(torch.equal(x[: len(y)], y) for x, y in zip(a, c))


def test_paged_cache_stores_real_tokens_only():
    """Left padding is never stored: each row holds its own length in its own blocks."""
    _, paged = pair()
    cache = paged.new_cache(3, 200)
    assert isinstance(cache, PagedCache)
    ps = prompts((70, 3, 129))
    t0 = 129
    idx = torch.zeros(3, t0, dtype=torch.long)
    for i, p in enumerate(ps):
        idx[i, t0 - len(p):] = torch.tensor(p)
    cache.set_padding(torch.tensor([t0 - len(p) for p in ps]))
    with torch.no_grad():
        paged(idx, cache, 0)
        paged(torch.zeros(3, 1, dtype=torch.long), cache, t0)
    assert cache.lengths()[:3] == [71, 4, 130]
    assert [len(cache.blocks(r)) for r in range(3)] == [2, 1, 3]
    c = paged.config
    assert cache.bytes_per_token() == c.n_layer * (c.latent_dim + c.rope_head_dim) * 4


def test_load_switches_a_rope_mla_run_to_flash_mla(tmp_path):
    dense, _ = pair()
    save_checkpoint(tmp_path / "run" / "last", dense)
    switched = load(tmp_path / "run", runtime={"attention": "flash_mla", "cache": "paged"})
    assert switched.runtime.attention == "flash_mla" and switched.config == load(tmp_path / "run").config
    legacy = load(tmp_path / "run", attn_backend="flash_mla")  # the name before the runtime split
    assert legacy.runtime == switched.runtime
    assert isinstance(switched.new_cache(1, 8), PagedCache)
    ps = prompts((66, 9))
    assert all(torch.equal(x, y) for x, y in zip(generate(dense, ps, 12, temperature=0),
                                                  generate(switched, ps, 12, temperature=0)))


def test_flash_mla_needs_mla():
    with pytest.raises(LlmlabError, match="'flash_mla' is an implementation of attention mla"):
        Transformer(tiny(preset="rope"), Runtime(attention="flash_mla", cache="paged"))
    with pytest.raises(LlmlabError, match="decodes from a paged cache"):
        Runtime(attention="flash_mla", cache="dense")
    for size in (1, 8):  # the kernel's blocks are powers of two from 16 (kernels.dispatch.check_inputs)
        with pytest.raises(LlmlabError, match="at least 16 tokens"):
            Runtime(attention="flash_mla", cache="paged", block_size=size)
    assert Runtime(attention="sdpa", cache="paged", block_size=8).block_size == 8  # the PyTorch path takes any


CHILD = """
import torch
from llmlab.kernels import flash_mla
from test_flash_mla_model import pair, prompts
from llmlab import generate
assert flash_mla.flash_mla_path("cpu") == "triton-interpret", flash_mla.flash_mla_path("cpu")
dense, paged = pair(n_layer=2)
ps = prompts((70, 3))
a = generate(dense, ps, 8, temperature=0)
b = generate(paged, ps, 8, temperature=0)
assert all(torch.equal(x, y) for x, y in zip(a, b)), (a, b)
print("KERNEL-GREEDY-OK")
"""


def test_flash_mla_through_the_triton_kernel_interpreted():
    """The model's decode through the Triton kernel itself (Triton's CPU interpreter, which must be
    switched on before triton is imported, hence a child process): rope_mla's greedy tokens."""
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1",
               PYTHONPATH=os.pathsep.join([str(REPO / "tests"), str(REPO / "src")] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    run = subprocess.run([sys.executable, "-c", CHILD], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0 and "KERNEL-GREEDY-OK" in run.stdout, run.stdout[-3000:] + run.stderr[-3000:]


def test_paged_decode_crossing_a_block_boundary_equals_recompute():
    """Decode steps that cross from one 64-token block into the next (prompts of 60, 62 and 127
    tokens, 10 steps each): a wrong block-table lookup at the crossing shows in the logits."""
    dense, paged = pair()
    ps = prompts((60, 62, 127), seed=3)
    cont = torch.randint(0, 97, (3, 10), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref = recomputed_logits(dense, ps, cont)
        got = cached_logits(paged, ps, cont)
    assert (got - ref).abs().max() <= 1e-4 * ref.abs().max()
