"""Mutation check: do the tests notice a bug? Two sets of one-line bugs: the core maths (outside
llmlab/training, the default) and training + infrastructure (`--set infra`, in mutations_infra.py).

Each mutation below is one small, plausible slip in the maths (a wrong scale, an off-by-one
mask, a swapped pair, a dropped term) written as (file, exact original snippet, mutated snippet,
the tests that should notice). For each one the harness

  1. copies the tree (llmlab/, tests/, benchmarks/, pyproject.toml) into a temporary directory
     once; the worktree itself is never written to,
  2. replaces the snippet in the copy (it must occur exactly once in its file, and the mutated
     file must still compile, so the list stays honest as the code changes),
  3. runs that mutation's tests on the copy (`pytest -x -q -m "not slow"`, hypothesis seeded, with a
     timeout; `--slow` includes the slow tests: without it, a bug only a slow test catches is
     reported as a survivor),
  4. puts the original file back (in a `finally`; the copy is deleted at exit, Ctrl-C included).

A mutation is *killed* when its tests fail (a timeout counts as killed and is shown as such),
*survived* when they all pass. Before the mutations it runs every listed test file once on the
unmutated copy, so a kill always means the mutation, never a test that fails anyway.

    python benchmarks/mutation_check.py                 # baseline + every mutation: table + JSON line
    python benchmarks/mutation_check.py --check         # only verify each snippet occurs exactly once
    python benchmarks/mutation_check.py --only rope_    # mutations whose name contains "rope_"
    python benchmarks/mutation_check.py --list          # names, files and tests

Equivalent mutations (ones no test can notice because nothing observable changes) are listed in
EQUIVALENT with the reason, and are not run or counted.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
COPIED = ("src", "tests", "benchmarks", "pyproject.toml", "README.md")
PYTEST = ("-x", "-q", "-m", "not slow", "-p", "no:cacheprovider", "--hypothesis-seed=0")  # repeatable


@dataclass(frozen=True)
class Mutation:
    name: str
    file: str  # relative to the repository root
    original: str  # must occur exactly once in the file
    mutated: str
    tests: tuple[str, ...]  # pytest arguments: test files / node ids, optionally "-k", "EXPR"
    why: str = field(default="", compare=False)  # the bug it stands for (shown by --list)


M = Mutation
ATT, POS, LAY, TRF = "llmlab/model/attention.py", "llmlab/model/positions.py", "llmlab/model/layers.py", \
    "llmlab/model/transformer.py"
MLA, CACHE, PAGED = "llmlab/model/mla.py", "llmlab/model/cache.py", "llmlab/model/paged_cache.py"
GEN, FLASH, TRITON = "llmlab/generation.py", "llmlab/kernels/flash_mla.py", "llmlab/kernels/flash_mla_triton.py"

# Test selections. -k keeps out the slow dynamo-tracing / CLI tests that check no maths.
T_MODEL = ("tests/test_model.py", "tests/test_positions_gqa.py", "-k", "not traces_as_one_graph")
T_HF = ("tests/test_hf.py", "-k", "parity or greedy or round_trip")
T_HF_MODEL = ("tests/test_model.py", "tests/test_positions_gqa.py", "tests/test_hf.py",
              "-k", "not traces_as_one_graph and (not test_hf or parity or greedy or round_trip)")
T_GEN = ("tests/test_sampling_eval.py", "tests/test_generate.py", "-k", "not compile")  # hand references first
T_CACHE = ("tests/test_sampling_eval.py", "tests/test_generate.py", "tests/test_positions_gqa.py",
           "-k", "not compile")
T_MLA = ("tests/test_mla.py", "tests/test_hf_deepseek.py", "-k", "not training_steps")
T_FLASH = ("tests/test_flash_mla.py", "tests/test_flash_mla_model.py", "-k", "not sm90 and not benchmark")
T_PAGED = ("tests/test_cache_seam.py", "-k", "paged and not compiled")  # every cached rung read through the pool

MUTATIONS: list[Mutation] = [
    # ---- attention -------------------------------------------------------------------------
    M("attn_scale_1_over_d", ATT, "* (1.0 / math.sqrt(hd))  # (B, Hkv, G, T, S)",
      "* (1.0 / hd)  # (B, Hkv, G, T, S)", T_MODEL, "scores scaled by 1/d instead of 1/sqrt(d)"),
    M("causal_mask_off_by_one", ATT, ".tril(diagonal=s - t)", ".tril(diagonal=s - t + 1)", T_MODEL,
      "each query also sees the next token"),
    M("softmax_wrong_dim", ATT, "att = F.softmax(att, dim=-1)", "att = F.softmax(att, dim=-2)", T_MODEL,
      "softmax over queries instead of keys"),
    M("gqa_grouping_interleaved", ATT, "q = q.view(b, hkv, h // hkv, t, hd)  # (B, Hkv, G, T, hd)",
      "q = q.view(b, h // hkv, hkv, t, hd).transpose(1, 2)", T_MODEL,
      "query head i shares kv head i % n_kv instead of i // group"),
    M("sdpa_not_causal", ATT, "is_causal=mask is None, enable_gqa=gqa)", "is_causal=False, enable_gqa=gqa)",
      T_MODEL, "SDPA backend forgets the causal mask"),
    M("decode_attention_scale", ATT, "(qg * k.unsqueeze(2)).sum(-1) * (1.0 / math.sqrt(hd))",
      "(qg * k.unsqueeze(2)).sum(-1) * (1.0 / hd)", T_GEN, "fused one-token decode scaled by 1/d"),
    # ---- positions -------------------------------------------------------------------------
    M("rope_rotation_sign", POS, "rotated = torch.cat([-x2, x1], dim=-1)", "rotated = torch.cat([x2, -x1], dim=-1)",
      T_HF_MODEL, "RoPE rotates the other way (sin sign)"),
    M("rope_pairing_interleaved", POS, "angles = torch.cat([angles, angles], dim=-1)  # (n, d)",
      "angles = angles.repeat_interleave(2, dim=-1)  # (n, d)", T_HF_MODEL,
      "angle table in the adjacent-pair layout, rotation in the half split"),
    M("rope_theta_exponent", POS,
      "inv_freq = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)",
      "inv_freq = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / (dim - 2))", T_HF_MODEL,
      "frequencies theta^(-2i/(d-2)) instead of theta^(-2i/d)"),
    M("sinusoidal_sin_cos_swapped", POS, "table[:, 0::2] = torch.sin(pos * inv)",
      "table[:, 0::2] = torch.cos(pos * inv)", T_MODEL, "even channels get cos"),
    M("learned_positions_offset", POS, "return x + self.weight[pos]", "return x + self.weight[pos - 1]",
      T_HF_MODEL, "token p gets position row p-1 (row 0 never used)"),
    M("padded_rows_positions", CACHE, "positions = (slots[None, :] - pad[:, None]).clamp_min(0)  # (B, T)",
      "positions = slots[None, :].expand(batch, -1)  # (B, T)", T_CACHE, "left-padded rows start at position pad, not 0"),
    M("yarn_ramp_reversed", "llmlab/model/yarn.py", "return plain / s * (1 - extrapolate) + plain * extrapolate",
      "return plain / s * extrapolate + plain * (1 - extrapolate)", ("tests/test_hf_yarn.py",),
      "YaRN interpolates the fast dimensions and keeps the slow ones"),
    M("yarn_mla_score_factor_dropped", MLA, "return self.attend(q * self.score_factor if self.score_factor != 1.0 else q,",
      "return self.attend(q,", ("tests/test_hf_yarn.py",), "MLA's prefill forgets YaRN's mscale_all_dim score factor"),
    # ---- norms, MLPs, the block ------------------------------------------------------------
    M("rmsnorm_eps_dropped", LAY, "nn.RMSNorm(config.n_embd, eps=config.norm_eps)", "nn.RMSNorm(config.n_embd)",
      T_HF_MODEL, "RMSNorm uses torch's default eps instead of the config's"),
    M("layernorm_bias_dropped", LAY, "eps=config.norm_eps, bias=config.bias))", "eps=config.norm_eps, bias=False))",
      T_HF_MODEL, "LayerNorm without its bias"),
    M("swiglu_gate_up_swapped", LAY, "self.proj(F.silu(gate) * up)", "self.proj(F.silu(up) * gate)", T_HF_MODEL,
      "silu applied to the up half"),
    M("gelu_approximate_flag", LAY, 'self.approximate = "tanh" if config.mlp == "gelu_tanh" else "none"',
      'self.approximate = "none"', T_HF_MODEL, "gelu_tanh computed as exact GELU"),
    M("residual_dropped", TRF, "x = x + self.attn(self.norm1(x), rotary, step, layer)",
      "x = self.attn(self.norm1(x), rotary, step, layer)", T_HF_MODEL, "attention output replaces the stream"),
    M("final_norm_skipped", TRF, "return self.lm_head(self.norm_f(x))", "return self.lm_head(x)", T_HF_MODEL,
      "no final norm before the head"),
    M("tied_head_not_retied", TRF, "self.lm_head.weight = self.tok_emb.weight  # to_empty()",
      "pass  # to_empty()", ("tests/test_init_weights.py",),
      "init_weights() after to_empty() leaves the head untied"),
    M("residual_init_unscaled", TRF, "std /= math.sqrt(2 * self.config.n_layer)", "std /= 1.0", T_MODEL,
      "GPT-2's 1/sqrt(2L) init of residual projections dropped"),
    # ---- MLA -------------------------------------------------------------------------------
    M("mla_scale_nope_only", MLA, "self.scale = self.score_factor / math.sqrt(q_dim)",
      "self.scale = self.score_factor / math.sqrt(self.d_nope)",
      T_MLA, "absorbed scores scaled by 1/sqrt(d_nope), forgetting d_r"),
    M("mla_absorbed_wuk_wuv_swapped", MLA, "return w[:, : self.d_nope], w[:, self.d_nope:]",
      "return w[:, self.d_nope:], w[:, : self.d_nope]", T_MLA, "W_UK and W_UV exchanged in absorption"),
    M("mla_latent_norm_skipped", MLA, "kv = torch.cat([self.kv_norm(c_kv), k_pe], dim=-1)",
      "kv = torch.cat([c_kv, k_pe], dim=-1)", T_MLA, "latent c_kv cached without its RMSNorm"),
    M("mla_k_pe_not_rotated", MLA, "k_pe = apply_rope(k_pe.unsqueeze(1), *rotary).squeeze(1)",
      "k_pe = k_pe", T_MLA, "the shared rope key is never rotated"),
    M("mla_absorbed_softmax_dim", MLA, "p = F.softmax(scores, dim=-1, dtype=torch.float32)",
      "p = F.softmax(scores, dim=-2, dtype=torch.float32)", T_MLA, "absorbed decode softmax over heads/queries"),
    # ---- caches ----------------------------------------------------------------------------
    M("cache_write_slot", CACHE, "pool[self.write_block, self.write_offset] = x",
      "pool[self.write_block, self.write_offset - 1] = x", T_CACHE, "every cached tensor written one slot early"),
    M("latent_cache_write_slot_mla", CACHE, "pool[self.write_block, self.write_offset] = x",
      "pool[self.write_block, (self.write_offset + 1) % pool.shape[1]] = x", T_MLA,
      "MLA latents (the same write path) written one slot late"),
    M("padding_mask_pad_visible", CACHE, "allowed = ((s <= q) & (s >= self.start[:, None, None])) | (s == q)",
      "allowed = (s <= q) | (s == q)", T_CACHE, "real tokens attend to left padding"),
    M("paged_store_offset", PAGED, "offset.append(p % bs if p >= 0 else 0)",
      "offset.append((p + 1) % bs if p >= 0 else 0)", T_FLASH, "paged store one row late inside its block"),
    M("paged_gather_block_index", CACHE, "g = pool.index_select(0, self.table.reshape(-1).long()).view(",
      "g = pool.index_select(0, self.table.reshape(-1).long() * 0).view(", T_PAGED,
      "a paged read takes every token from the pool's first block"),
    # ---- generation ------------------------------------------------------------------------
    M("top_k_keeps_k_plus_1", GEN, "kth = torch.topk(logits, int(k.max()), dim=-1).values.gather(-1, (k - 1)[:, None])",
      "kth = torch.topk(logits, int(k.max()) + 1, dim=-1).values.gather(-1, k[:, None])", T_GEN,
      "top-k keeps k+1 tokens"),
    M("top_p_boundary", GEN, "drop_sorted = (probs.cumsum(dim=-1) - probs >= p)",
      "drop_sorted = (probs.cumsum(dim=-1) - probs > p)", T_GEN,
      "a token whose preceding mass is exactly p is kept"),
    M("temperature_twice", GEN, "/ t).float()", "/ t / t).float()", T_GEN,
      "temperature applied twice"),
    M("greedy_argmax_dim", GEN, "return logits.argmax(dim=-1)", "return logits.argmax(dim=0)", T_GEN,
      "greedy argmax over the batch"),
    M("stop_token_not_repeated", GEN, "nxt = torch.where(done, stops[0], nxt)", "nxt = torch.where(done, nxt, nxt)",
      T_GEN, "rows that stopped keep generating"),
    M("rolled_window_padding", GEN, "pad = (pad - 1).clamp_min(0)", "pad = pad.clamp_min(0)",
      ("tests/test_infrastructure.py", "-k", "rolls"), "the rolled window forgets that padding moved left"),
    # ---- Flash MLA kernels -----------------------------------------------------------------
    M("flash_ref_causal_limit", FLASH, "last = n - s_q + torch.arange(s_q, device=q.device)",
      "last = n - s_q - 1 + torch.arange(s_q, device=q.device)", T_FLASH, "a query does not see its own token"),
    M("flash_ref_partial_block", FLASH, "blocks = block_table[i, : -(-n // bs)].long()",
      "blocks = block_table[i, : n // bs].long()", T_FLASH, "the last partial block is never read"),
    M("triton_merge_lse_base", TRITON, "w = tl.exp(lse_s - m_safe)  # empty splits", "w = tl.exp2(lse_s - m_safe)  # empty splits",
      T_FLASH, "split merge weighs natural-log LSEs in base 2"),
    M("triton_online_rescale", TRITON, "alpha = tl.exp2(m - m_safe)", "alpha = tl.exp2(m_safe - m)", T_FLASH,
      "online softmax rescales the old sum the wrong way"),
    # ---- tokenizers, data ------------------------------------------------------------------
    M("char_ids_from_1", "llmlab/tokenizer.py", "self._stoi = {c: i for i, c in enumerate(self.chars)}",
      "self._stoi = {c: i for i, c in enumerate(self.chars, 1)}", ("tests/test_tokenizer.py",),
      "char ids start at 1: encode/decode off by one"),
    M("byte_decode_range", "llmlab/tokenizer.py", "if 0 <= i < 256:", "if 0 < i < 256:", ("tests/test_tokenizer.py",),
      "byte 0 decodes to U+FFFD"),
    M("sampler_y_not_shifted", "llmlab/data.py", "x, y = both[:, :-1].contiguous(), both[:, 1:].contiguous()",
      "x, y = both[:, :-1].contiguous(), both[:, :-1].contiguous()", ("tests/test_data.py",),
      "targets equal inputs (no next-token shift)"),
    M("sampler_last_window_never_drawn", "llmlab/data.py", "torch.randint(len(self.ids) - self.block_size, ",
      "torch.randint(len(self.ids) - self.block_size - 1, ", ("tests/test_data.py",),
      "starts drawn from one fewer window than nanoGPT"),
    M("token_cache_int16", "llmlab/data.py", "np.dtype(np.uint16 if vocab_size < 65536 else np.uint32)",
      "np.dtype(np.int16 if vocab_size < 65536 else np.uint32)", ("tests/test_data.py",),
      "ids stored as int16: ids >= 32768 cannot be cached"),
    # ---- Hugging Face mapping --------------------------------------------------------------
    M("hf_gpt2_c_proj_not_transposed", "llmlab/hf/weights.py", '("attn.proj", "attn.c_proj", True)',
      '("attn.proj", "attn.c_proj", False)', T_HF, "GPT-2 Conv1D c_proj taken as [out, in]"),
    M("hf_llama_qkv_order", "llmlab/hf/weights.py", 'for p in "qkv")', 'for p in "kqv")', T_HF,
      "fused qkv built from k, q, v rows"),
    M("hf_deepseek_rope_not_reordered", "llmlab/hf/deepseek.py",
      "half_split = torch.cat([torch.arange(0, d_r, 2), torch.arange(1, d_r, 2)])",
      "half_split = torch.arange(d_r)", ("tests/test_hf_deepseek.py",),
      "DeepSeek rope rows kept in HF's adjacent-pair layout"),
]

# The second set, training and infrastructure (benchmarks/mutations_infra.py): `--set infra`.
sys.path.insert(0, str(Path(__file__).resolve().parent))
from mutations_infra import mutations as _infra  # noqa: E402

INFRA: list[Mutation] = _infra(M)
SETS = {"core": MUTATIONS, "infra": INFRA, "all": MUTATIONS + INFRA}

# Mutations that change nothing observable: not run, not counted (kept here so nobody re-adds them).
EQUIVALENT: list[tuple[Mutation, str]] = [
    (M("tied_head_untied_in_init", TRF, "            self.lm_head.weight = self.tok_emb.weight\n        torch.set_rng_state",
       "            pass\n        torch.set_rng_state", ()),
     "Transformer.__init__ ends with init_weights(), which ties the head again whenever it is not tied"),
    (M("triton_merge_no_max_shift", TRITON, "w = tl.exp(lse_s - m_safe)  # empty splits",
       "w = tl.exp(lse_s)  # empty splits", ()),
     "the max shift cancels in w / sum(w) (it only guards against overflow, far beyond test scores)"),
    (M("token_cache_dtype_le", "llmlab/data.py", "vocab_size < 65536", "vocab_size <= 65536", ()),
     "a vocabulary of exactly 65536 has ids up to 65535, which still fit uint16"),
]


# ---- running ----------------------------------------------------------------------------------
def located(root: Path, file: str) -> Path:
    """A mutation's file in the tree: the package's modules (named llmlab/...) live under src/."""
    return root / "src" / file if file.startswith("llmlab/") else root / file


def check(mutations: list[Mutation], root: Path = REPO) -> list[str]:
    """Problems with the list: a snippet not found exactly once, a no-op, a file that no longer compiles."""
    problems, names = [], set()
    for m in mutations:
        if m.name in names:
            problems.append(f"{m.name}: duplicate name")
        names.add(m.name)
        path = located(root, m.file)
        if not path.is_file():
            problems.append(f"{m.name}: {m.file} not found")
            continue
        text = path.read_text()
        n = text.count(m.original)
        if n != 1:
            problems.append(f"{m.name}: original snippet found {n} times in {m.file} (must be exactly 1): {m.original!r}")
            continue
        if m.mutated == m.original:
            problems.append(f"{m.name}: mutated snippet equals the original")
            continue
        try:
            compile(text.replace(m.original, m.mutated), m.file, "exec")
        except SyntaxError as e:
            problems.append(f"{m.name}: mutated {m.file} does not compile ({e.msg}, line {e.lineno})")
    return problems


def copy_tree(dst: Path) -> None:
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".pytest_cache", ".hypothesis")
    for name in COPIED:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, dst / name, ignore=ignore)
        elif src.is_file():
            shutil.copy2(src, dst / name)


def run_pytest(root: Path, args: tuple[str, ...], timeout: float) -> tuple[str, float, str]:
    """("pass" | "fail" | "timeout", seconds, first failing test or last output line)."""
    env = dict(os.environ, PYTHONPATH=str(root / "src"), PYTHONDONTWRITEBYTECODE="1")  # no stale .pyc of a mutant
    shakespeare = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"
    if "LLMLAB_SHAKESPEARE" not in env and shakespeare.is_file():
        env["LLMLAB_SHAKESPEARE"] = str(shakespeare)  # conftest looks next to the (copied) repo
    cmd = [sys.executable, "-m", "pytest", *PYTEST, *args]
    start = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # pytest and any child it started
        proc.communicate()
        return "timeout", time.monotonic() - start, f"no result after {timeout:.0f} s"
    except BaseException:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    seconds = time.monotonic() - start
    if proc.returncode == 0:
        return "pass", seconds, ""
    first = re.search(r"^(?:FAILED|ERROR) (\S+)", out, re.M)
    if proc.returncode == 5:  # nothing collected: a broken selection, never a kill
        raise SystemExit(f"no tests selected by {' '.join(args)}:\n{out[-2000:]}")
    lines = out.strip().splitlines()
    return "fail", seconds, first.group(1) if first else (lines[-1] if lines else f"exit {proc.returncode}")


def baseline_args(mutations: list[Mutation]) -> tuple[str, ...]:
    """Every test file any mutation names, unfiltered: a superset of each mutation's selection."""
    files: list[str] = []
    for m in mutations:
        skip = False
        for a in m.tests:
            if skip or a == "-k":
                skip = a == "-k"
                continue
            f = a.split("::")[0]
            if f not in files:
                files.append(f)
    return tuple(files)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", action="append", default=[], help="run mutations whose name contains this (repeatable)")
    ap.add_argument("--check", action="store_true", help="only verify the list against the code")
    ap.add_argument("--list", action="store_true", help="print the mutations and exit")
    ap.add_argument("--no-baseline", action="store_true", help="skip the unmutated run of the test files")
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds per test run (default 900)")
    ap.add_argument("--set", choices=SETS, default="core",
                    help="core: the maths (default); infra: training and infrastructure; all: both")
    ap.add_argument("--slow", action="store_true",
                    help='also run tests marked slow (by default `-m "not slow"`: a bug only a slow test '
                         "catches then shows as a survivor)")
    args = ap.parse_args(argv)
    global PYTEST
    if args.slow:
        PYTEST = tuple(a for a in PYTEST if a not in ("-m", "not slow"))

    problems = check(SETS["all"] + [m for m, _ in EQUIVALENT])
    if problems:
        print("mutation list out of date:\n  " + "\n  ".join(problems), file=sys.stderr)
        return 2
    chosen = [m for m in SETS[args.set] if not args.only or any(s in m.name for s in args.only)]
    if args.list:
        for m in chosen:
            print(f"{m.name:34} {m.file:32} {m.why}\n{'':34} tests: {' '.join(m.tests)}")
        for m, why in EQUIVALENT:
            print(f"{m.name:34} {m.file:32} EQUIVALENT: {why}")
        return 0
    if args.check:
        print(f"{len(MUTATIONS)} core + {len(INFRA)} infrastructure mutations + {len(EQUIVALENT)} equivalent ones: "
              "every snippet found exactly once")
        return 0
    if not chosen:
        print("no mutation matches --only", file=sys.stderr)
        return 2

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # finally-blocks run on kill too
    t0 = time.monotonic()
    rows = []
    with tempfile.TemporaryDirectory(prefix="llmlab-mutation-") as tmp:
        root = Path(tmp)
        copy_tree(root)
        if not args.no_baseline:
            files = baseline_args(chosen)
            status, secs, detail = run_pytest(root, files, args.timeout)
            print(f"baseline (unmutated): {status} in {secs:.0f} s  [{' '.join(files)}]", flush=True)
            if status != "pass":
                print(f"the unmutated tests do not pass ({detail}); fix that first", file=sys.stderr)
                return 2
        print(f"{'mutation':34} {'result':9} {'seconds':>7}  first failing test", flush=True)
        for m in chosen:
            path = located(root, m.file)
            original = path.read_text()
            try:
                path.write_text(original.replace(m.original, m.mutated, 1))
                status, secs, detail = run_pytest(root, m.tests, args.timeout)
            finally:
                path.write_text(original)
            result = {"pass": "SURVIVED", "fail": "killed", "timeout": "timeout"}[status]
            rows.append({"name": m.name, "file": m.file, "result": result, "seconds": round(secs, 1),
                         "detail": detail})
            print(f"{m.name:34} {result:9} {secs:7.1f}  {detail}", flush=True)
    killed = sum(r["result"] != "SURVIVED" for r in rows)
    survivors = [r["name"] for r in rows if r["result"] == "SURVIVED"]
    rate = killed / len(rows)
    total = time.monotonic() - t0
    print(f"\nkilled {killed}/{len(rows)} ({100 * rate:.1f} %), timeouts counted as killed: "
          f"{sum(r['result'] == 'timeout' for r in rows)}; survivors: {', '.join(survivors) or 'none'}; "
          f"{len(EQUIVALENT)} equivalent mutations not run; {total:.0f} s")
    print(json.dumps({"mutations": len(rows), "killed": killed, "kill_rate": round(rate, 4),
                      "survived": survivors, "equivalent_not_run": len(EQUIVALENT), "seconds": round(total, 1),
                      "results": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
