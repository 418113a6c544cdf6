"""Flash MLA decode (llmlab.kernels) and the paged latent cache (llmlab.model.paged_cache).

Oracles: an independent naive float64 computation (token-by-token gather, per-head softmax with an
explicit causal mask) checks the reference; the reference and the naive one check the Triton
kernel, which runs here through Triton's CPU interpreter.

Triton's interpreter works only if TRITON_INTERPRET=1 was set before triton was first imported
(see dispatch._triton_interpreted). The kernel tests (named test_interp_*) therefore run in this
process when it was started with the variable set, and otherwise in one child pytest process that
test_interpreter_suite_in_subprocess starts with it set."""
from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llmlab.errors import LlmlabError
from llmlab.kernels import dispatch, flash_mla, flash_mla_decode, flash_mla_path, flash_mla_reference
from llmlab.model.paged_cache import PagedLatentCache

REPO = Path(__file__).resolve().parents[1]
DC, DR, BS = 32, 16, 64  # small latent / rope widths; the real block size


@pytest.fixture
def interpret(monkeypatch):
    """Triton's interpreter on for this test, and every buffer the launcher allocates poisoned."""
    pytest.importorskip("triton")
    if not dispatch._triton_interpreted():
        pytest.skip("triton was imported without TRITON_INTERPRET=1; run by test_interpreter_suite_in_subprocess")
    from llmlab.kernels import flash_mla_triton as fmt

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(fmt, "_empty", lambda *a, **kw: torch.full(a, float("nan"), **kw))
    return fmt


def make_case(lengths, heads, s_q, dtype=torch.float32, seed=0, spare=3):
    """Random q and pool; each sequence's blocks are a random, out-of-order draw from the pool, and
    every cache row past a sequence's length (its last block's tail, unused blocks) is NaN."""
    g = torch.Generator().manual_seed(seed)
    per = [max(1, -(-n // BS)) for n in lengths]
    num_blocks = sum(per) + spare
    kv = torch.full((num_blocks, BS, DC + DR), float("nan"))
    order = torch.randperm(num_blocks, generator=g)
    table = torch.zeros(len(lengths), max(per), dtype=torch.int32)
    used = 0
    for b, n in enumerate(lengths):
        blocks = order[used:used + per[b]]
        used += per[b]
        table[b, :per[b]] = blocks.int()
        rows = torch.randn(n, DC + DR, generator=g)
        kv.view(-1, DC + DR)[(blocks[:, None] * BS + torch.arange(BS)).flatten()[:n]] = rows
    q = torch.randn(len(lengths), s_q, heads, DC + DR, generator=g)
    return q.to(dtype), kv.to(dtype), table, torch.tensor(lengths, dtype=torch.int32)


def naive(q, kv, table, lens, dv, scale, causal=True):
    """float64, one token row and one head at a time: the scores' two parts computed apart."""
    b, s_q, h, d = q.shape
    out = torch.zeros(b, s_q, h, dv, dtype=torch.float64)
    lse = torch.full((b, h, s_q), -math.inf, dtype=torch.float64)
    for i in range(b):
        n = int(lens[i])
        rows = torch.stack([kv[int(table[i, p // BS]), p % BS] for p in range(n)]).double() if n else None
        for qi in range(s_q):
            mask = torch.tensor([(p <= n - s_q + qi) or not causal for p in range(n)], dtype=torch.bool)
            if n == 0 or not mask.any():
                continue
            for hh in range(h):
                qq = q[i, qi, hh].double()
                s = (rows[:, :dv] @ qq[:dv] + rows[:, dv:] @ qq[dv:]) * scale
                s = s.masked_fill(~mask, -math.inf)
                lse[i, hh, qi] = torch.logsumexp(s, 0)
                out[i, qi, hh] = torch.softmax(s, 0) @ rows[:, :dv]
    return out, lse


def assert_close(out, lse, ref_out, ref_lse, rtol):
    """Relative to the output's scale; -inf LSEs (rows that see nothing) must match exactly."""
    assert torch.isfinite(out).all(), "an output element was not written (NaN poison survived)"
    assert not torch.isnan(lse).any(), "an LSE element was not written (NaN poison survived)"
    scale = ref_out.double().abs().max().clamp_min(1e-6)
    assert (out.double() - ref_out.double()).abs().max() / scale <= rtol
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse.to(lse.dtype)))
    fin = torch.isfinite(ref_lse)
    assert (lse.double()[fin] - ref_lse.double()[fin]).abs().max() <= rtol * 10


# ---------------------------------------------------------------- reference vs naive

@pytest.mark.parametrize("lengths,heads,s_q,causal", [
    ([1], 1, 1, True), ([63, 64, 65], 4, 1, True), ([65, 2, 130], 3, 2, True),
    ([1, 0, 70], 2, 2, True),  # an empty sequence and one shorter than s_q: rows that see nothing
    ([65, 9], 2, 2, False),
])
def test_reference_matches_naive(lengths, heads, s_q, causal):
    q, kv, table, lens = make_case(lengths, heads, s_q)
    out, lse = flash_mla_reference(q, kv, table, lens, DC, 0.3, causal)
    ref_out, ref_lse = naive(q, kv, table, lens, DC, 0.3, causal)
    assert out.shape == (len(lengths), s_q, heads, DC) and lse.shape == (len(lengths), heads, s_q)
    assert_close(out, lse, ref_out, ref_lse, 1e-5)
    if 0 in lengths:
        assert (out[lengths.index(0)] == 0).all() and torch.isinf(lse[lengths.index(0)]).all()


def test_causal_masking_matters():
    """s_q = 2: the first query must not see the newest token, so causal and non-causal differ."""
    q, kv, table, lens = make_case([40], 2, 2)
    causal, _ = flash_mla_reference(q, kv, table, lens, DC, 0.3, True)
    full, _ = flash_mla_reference(q, kv, table, lens, DC, 0.3, False)
    assert torch.equal(causal[:, 1], full[:, 1]) and not torch.allclose(causal[:, 0], full[:, 0])


# ---------------------------------------------------------------- kernel (interpreter) vs reference

@pytest.mark.parametrize("lengths,heads,s_q,splits", [
    ([1], 1, 1, 1), ([64], 4, 1, 2), ([63, 65], 4, 2, 1), ([1, 64, 65, 130], 2, 1, 3),
    ([65, 0, 1, 200], 8, 2, 4),  # empty row, row shorter than s_q, splits with nothing to do
    ([129, 70], 16, 2, None),  # 32 rows: two row groups (block_m 16 below); heuristic splits
])
def test_interp_kernel_matches_reference_fp32(interpret, lengths, heads, s_q, splits):
    q, kv, table, lens = make_case(lengths, heads, s_q, seed=len(lengths) + heads)
    block_m = 16 if heads == 16 else None
    out, lse = interpret.flash_mla_triton(q, kv, table, lens, DC, 0.25, num_splits=splits, block_m=block_m)
    ref_out, ref_lse = flash_mla_reference(q, kv, table, lens, DC, 0.25)
    assert out.dtype == torch.float32 and lse.dtype == torch.float32
    assert_close(out, lse, ref_out, ref_lse, 1e-4)


def test_interp_kernel_non_causal_and_sub_page_tiles(interpret):
    """causal=False, and 16-token tiles (4 per page) split over 5 programs."""
    q, kv, table, lens = make_case([100, 37], 4, 2, seed=3)
    out, lse = interpret.flash_mla_triton(q, kv, table, lens, DC, 0.2, False, num_splits=5, block_n=16)
    assert_close(out, lse, *naive(q, kv, table, lens, DC, 0.2, False), 1e-4)


@pytest.mark.parametrize("dtype,splits", [(torch.bfloat16, 1), (torch.bfloat16, 3), (torch.float16, 2)])
def test_interp_kernel_matches_reference_half(interpret, dtype, splits):
    q, kv, table, lens = make_case([65, 130, 7], 4, 2, dtype=dtype, seed=5)
    out, lse = interpret.flash_mla_triton(q, kv, table, lens, DC, 0.25, num_splits=splits)
    ref_out, ref_lse = flash_mla_reference(q, kv, table, lens, DC, 0.25)
    assert out.dtype == dtype
    assert_close(out, lse, ref_out, ref_lse, 1e-2)


def test_split_heuristic():
    from llmlab.kernels.flash_mla_triton import choose_num_splits

    assert choose_num_splits(1, 1, 256, num_sms=132) == 32  # one sequence: spread it wide (capped)
    assert choose_num_splits(2, 8, 128, num_sms=132) == 17  # ~2 programs per SM
    assert choose_num_splits(128, 8, 256, num_sms=132) == 1  # big batch fills the GPU alone
    assert choose_num_splits(1, 1, 6, num_sms=132) == 1  # short: >= 4 tiles per split


# ---------------------------------------------------------------- dispatch

def test_dispatch_reference_on_cpu_without_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert flash_mla_path("cpu") == "reference"
    if dispatch._HAVE_TRITON:
        assert flash_mla_path("cuda") == ("triton-interpret" if dispatch._triton_interpreted() else "triton")
        from llmlab.kernels import flash_mla_triton as fmt
        monkeypatch.setattr(fmt, "flash_mla_triton", lambda *a, **k: pytest.fail("took the Triton path"))
    q, kv, table, lens = make_case([5], 2, 1)
    out, _ = flash_mla_decode(q, kv, table, lens, DC, 0.3)
    assert torch.equal(out, flash_mla_reference(q, kv, table, lens, DC, 0.3)[0])


def test_interp_dispatch_takes_kernel(interpret, monkeypatch):
    calls = []
    real = interpret.flash_mla_triton
    monkeypatch.setattr(interpret, "flash_mla_triton", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setattr(flash_mla, "flash_mla_reference", lambda *a, **k: pytest.fail("took the reference"))
    assert flash_mla_path("cpu") == "triton-interpret"
    q, kv, table, lens = make_case([70], 2, 1)
    out, lse = flash_mla_decode(q, kv, table, lens, DC, 0.3)
    assert calls == [1]
    assert_close(out, lse, *naive(q, kv, table, lens, DC, 0.3), 1e-4)
    monkeypatch.setattr(dispatch, "_HAVE_TRITON", False)  # Triton not importable: reference
    assert flash_mla_path("cpu") == "reference" and flash_mla_path("cuda") == "reference"


def test_dispatch_interpreter_requested_too_late(monkeypatch):
    """TRITON_INTERPRET set after triton was imported: the interpreter cannot run; reference + warning."""
    pytest.importorskip("triton")
    if dispatch._triton_interpreted():
        pytest.skip("this process's Triton is in interpreter mode")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(dispatch, "_warned", False)
    with pytest.warns(UserWarning, match="too late"):
        assert flash_mla_path("cpu") == "reference"
    q, kv, table, lens = make_case([5], 2, 1)
    assert torch.equal(flash_mla_decode(q, kv, table, lens, DC, 0.3)[1],
                       flash_mla_reference(q, kv, table, lens, DC, 0.3)[1])


def test_interpreter_suite_in_subprocess(request):
    """The test_interp_* tests, in a child process started with TRITON_INTERPRET=1."""
    pytest.importorskip("triton")
    if dispatch._triton_interpreted():
        pytest.skip("this process runs the interpreter tests itself")
    env = dict(os.environ, TRITON_INTERPRET="1",
               PYTHONPATH=os.pathsep.join([str(REPO / "src")] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", __file__,
                          "-k", "interp_"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    passed = re.search(r"(\d+) passed", run.stdout)
    expected = sum("test_interp_" in item.name for item in request.session.items)
    assert passed and int(passed.group(1)) == expected and "skipped" not in run.stdout, run.stdout[-3000:]


def test_input_errors():
    q, kv, table, lens = make_case([5], 2, 1)
    with pytest.raises(ValueError, match="int32"):
        flash_mla_reference(q, kv, table.long(), lens, DC, 0.3)
    with pytest.raises(ValueError, match="last dim"):
        flash_mla_reference(q[..., :-1], kv, table, lens, DC, 0.3)
    with pytest.raises(ValueError, match="exceeds its block table"):
        flash_mla_reference(q, kv, table, torch.tensor([BS + 1], dtype=torch.int32), DC, 0.3)


# ---------------------------------------------------------------- paged cache

def test_paged_cache_allocation_and_release():
    cache = PagedLatentCache(n_layer=2, num_blocks=6, width=DC + DR, max_batch=3, max_blocks_per_seq=3)
    assert cache.bytes_per_token() == 2 * (DC + DR) * 4
    cache.reserve([1, 64, 65])
    assert [len(cache.blocks(r)) for r in range(3)] == [1, 1, 2] and cache.num_free_blocks == 2
    assert cache.seqlens.tolist() == [1, 64, 65] and cache.seqlens.dtype == torch.int32
    assert cache.block_table.dtype == torch.int32 and cache.block_table[2, :2].tolist() == cache.blocks(2)
    cache.reserve([129], rows=[0])  # grows by two blocks: pool now full
    assert cache.num_free_blocks == 0 and len(cache.blocks(0)) == 3
    before = (cache.block_table.clone(), cache.lengths())
    with pytest.raises(LlmlabError, match="exhausted"):
        cache.reserve([65, 65], rows=[1, 2])  # row 1 needs one more block: none free
    assert torch.equal(cache.block_table, before[0]) and cache.lengths() == before[1]  # all or nothing
    with pytest.raises(LlmlabError, match="does not fit"):
        cache.reserve([3 * 64 + 1], rows=[1])
    freed = set(cache.blocks(0))
    cache.release(0)
    assert cache.num_free_blocks == 3 and cache.lengths()[0] == 0 and cache.seqlens[0] == 0
    cache.reserve([100], rows=[0])
    assert set(cache.blocks(0)) <= freed  # reused
    all_blocks = [blk for r in range(3) for blk in cache.blocks(r)]
    assert len(all_blocks) == len(set(all_blocks))  # no block owned twice


def grow(cache, lat, steps):
    """Append each row's tokens in chunks (rows take turns), writing layer 1; `lat[r]` (n_r, W)."""
    done = [0] * len(lat)
    for step in steps:  # step: (row, number of new tokens)
        r, t = step
        cache.reserve([done[r] + t], rows=[r])
        cache.write(1, lat[r][None, done[r]:done[r] + t], rows=[r])
        done[r] += t


def contiguous(lat, heads, s_q, g):
    """The same sequences laid out contiguously (blocks 0, 1, ... in order)."""
    per = [-(-len(x) // BS) for x in lat]
    kv = torch.zeros(sum(per), BS, DC + DR)
    table = torch.zeros(len(lat), max(per), dtype=torch.int32)
    start = 0
    for r, x in enumerate(lat):
        kv.view(-1, DC + DR)[start * BS:start * BS + len(x)] = x
        table[r, :per[r]] = torch.arange(start, start + per[r], dtype=torch.int32)
        start += per[r]
    lens = torch.tensor([len(x) for x in lat], dtype=torch.int32)
    return kv, table, lens


def test_paged_cache_scattered_equals_contiguous_and_reuse_is_clean():
    scattered_and_reused(flash_mla_reference)


def test_interp_paged_cache_kernel(interpret):
    scattered_and_reused(interpret.flash_mla_triton)


def scattered_and_reused(attend):
    g = torch.Generator().manual_seed(7)
    cache = PagedLatentCache(n_layer=2, num_blocks=8, width=DC + DR, max_batch=2, max_blocks_per_seq=3)
    old = torch.randn(150, DC + DR, generator=g) * 10
    grow(cache, [old, old[:0]], [(0, 150)])  # a first sequence fills blocks 0, 1, 2 ...
    assert cache.blocks(0) == [0, 1, 2]
    cache.release(0)  # ... and finishes: its tokens stay in the freed blocks
    lat = [torch.randn(130, DC + DR, generator=g), torch.randn(70, DC + DR, generator=g)]
    # rows take turns, so each gets blocks out of order and interleaved with the other's
    grow(cache, lat, [(1, 10), (0, 60), (1, 60), (0, 5), (1, 0), (0, 65)])
    assert cache.blocks(0) != sorted(cache.blocks(0)) or cache.blocks(0)[1] != cache.blocks(0)[0] + 1
    assert set(cache.blocks(0)) & {0, 1, 2} and set(cache.blocks(1)) & {0, 1, 2}  # reused blocks
    q = torch.randn(2, 2, 4, DC + DR, generator=g)
    kv, table, lens = cache.kernel_args(1)
    out, lse = attend(q, kv, table, lens, DC, 0.2)
    assert_close(out, lse, *naive(q, *contiguous(lat, 4, 2, g), DC, 0.2), 1e-4)
    # stale rows of the old sequence sit in the tails of reused blocks; overwrite every row past
    # each sequence's length (and the free blocks) with garbage: the result must not move
    live = torch.zeros(kv.shape[:2], dtype=torch.bool)
    for r in range(2):
        for p in range(cache.lengths()[r]):
            live[cache.blocks(r)[p // BS], p % BS] = True
    cache.pool[1][~live] = float("nan")
    out2, lse2 = attend(q, *cache.kernel_args(1), DC, 0.2)
    assert torch.equal(out2, out) and torch.equal(lse2, lse)
    assert torch.isnan(cache.pool[0]).sum() == 0  # other layers untouched by layer-1 writes


def test_paged_cache_write_positions():
    cache = PagedLatentCache(n_layer=1, num_blocks=4, width=3, max_batch=2, max_blocks_per_seq=2)
    cache.reserve([66, 2])
    x = torch.arange(2 * 2 * 3, dtype=torch.float32).reshape(2, 2, 3)
    cache.write(0, x)  # default: each row's last 2 positions (64, 65 and 0, 1)
    b0, b1 = cache.blocks(0), cache.blocks(1)
    assert torch.equal(cache.pool[0, b0[1], :2], x[0]) and torch.equal(cache.pool[0, b1[0], :2], x[1])
    cache.write(0, x[:1, :1], positions=torch.tensor([[0]]), rows=[1])  # overwrite row 1's first token
    assert torch.equal(cache.pool[0, b1[0], 0], x[0, 0]) and torch.equal(cache.pool[0, b1[0], 1], x[1, 1])
    with pytest.raises(ValueError, match="reserve first"):
        cache.write(0, x[:1, :1], positions=torch.tensor([[2]]), rows=[1])


# ---------------------------------------------------------------- GPU benchmark script

def test_gpu_benchmark_tiny_cpu_path():
    pytest.importorskip("triton")
    run = subprocess.run([sys.executable, str(REPO / "benchmarks" / "flash_mla_gpu.py"), "--interpret", "--tiny"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "tiny correctness check passed" in run.stdout and "FAIL" not in run.stdout


@pytest.mark.filterwarnings("ignore:TRITON_DEFAULT_FP_FUSION")
def test_kernels_compile_for_sm90_without_gpu():
    """The compiler path the interpreter never takes: both kernels (bf16, 4 splits, default launch
    config) compiled for sm_90 down to a cubin, within the 227 KB of shared memory a block can use."""
    triton = pytest.importorskip("triton")
    if dispatch._triton_interpreted():
        pytest.skip("this process's Triton is in interpreter mode: it cannot compile")
    if "nvidia" not in triton.backends.backends:
        pytest.skip("this Triton build has no NVIDIA backend")
    from llmlab.kernels.flash_mla_triton import compile_for_gpu

    assert compile_for_gpu(90, "bf16", num_splits=4)["shared"] <= 227 * 1024
