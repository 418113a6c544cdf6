"""Flash MLA decode kernel on a GPU: correctness against the PyTorch reference, then speed.

    python benchmarks/flash_mla_gpu.py                      # CUDA: check, sweep launch configs, time
    python benchmarks/flash_mla_gpu.py --batch 64 --lengths 4096 --s-q 1
    python benchmarks/flash_mla_gpu.py --interpret --tiny   # CPU, Triton's interpreter: correctness only
    python benchmarks/flash_mla_gpu.py --compile-only       # no GPU: compile every config for sm_90

Shapes are DeepSeek-V2-like: 128 heads, d_c 512 (= head_dim_v), d_r 64, blocks of 64 tokens,
bf16. Every sequence of a batch has the given cache length; block tables are a random permutation
of the pool, so pages are scattered as in serving. Bytes counted per call: the latent rows read
(batch * length * 576 * 2), q read and out written; FLOPs: 2 * rows * length * (576 + 512) with
rows = batch * s_q * heads. The copy bandwidth is a large device-to-device `copy_` (read + write).
A memory-bound kernel should reach >= 70% of it.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402


# Launch configurations tried (the first is the default); all fit sm_90's shared memory (--compile-only).
CONFIGS = [dict(block_m=bm, block_n=bn, num_warps=w, num_stages=st) for bm, bn, w, st in
           [(16, 32, 4, 2), (32, 32, 4, 2), (32, 64, 8, 2), (64, 32, 8, 2), (16, 64, 4, 1), (64, 64, 8, 1)]]


def make_inputs(batch, length, s_q, heads, d_c, d_r, dtype, device, block=64, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    per_seq = -(-length // block)
    num_blocks = batch * per_seq
    q = torch.randn(batch, s_q, heads, d_c + d_r, generator=g).to(device, dtype)
    kv = torch.randn(num_blocks, block, d_c + d_r, generator=g).to(device, dtype)
    table = torch.randperm(num_blocks, generator=g).reshape(batch, per_seq).to(device, torch.int32)
    lens = torch.full((batch,), length, dtype=torch.int32, device=device)
    return q, kv, table, lens


def check(device, dtype, shapes, d_c, d_r, splits_list):
    """Kernel vs reference on a few shapes, ragged lengths included; raises on mismatch."""
    from llmlab.kernels import flash_mla_reference
    from llmlab.kernels.flash_mla_triton import flash_mla_triton

    tol = 1e-4 if dtype == torch.float32 else 1e-2
    for batch, length, s_q, heads in shapes:
        q, kv, table, lens = make_inputs(batch, length, s_q, heads, d_c, d_r, dtype, device)
        lens = (lens - torch.arange(batch, device=device, dtype=torch.int32) * 37).clamp_min(s_q)  # ragged
        scale = (d_c + d_r) ** -0.5
        ref_o, ref_l = flash_mla_reference(q, kv, table, lens, d_c, scale)
        for ns in splits_list:
            o, lse = flash_mla_triton(q, kv, table, lens, d_c, scale, num_splits=ns)
            err = ((o.float() - ref_o.float()).abs().max() / ref_o.float().abs().max()).item()
            lerr = (lse - ref_l).abs().max().item()
            ok = err <= tol and lerr <= tol * 10 and torch.isfinite(o).all().item()
            print(f"check {str(dtype):15s} batch {batch:3d} len {length:5d} s_q {s_q} heads {heads:3d} "
                  f"splits {ns if ns else 'auto':>4}: max rel err out {err:.2e}, lse {lerr:.2e}  {'ok' if ok else 'FAIL'}")
            if not ok:
                raise SystemExit("flash_mla_gpu: kernel does not match the reference")


def copy_bandwidth(device) -> float:
    """GB/s of a 1 GiB device-to-device copy (bytes read + written)."""
    import triton.testing

    src = torch.empty(1 << 29, dtype=torch.float16, device=device)
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=50, rep=200)
    return 2 * src.numel() * src.element_size() / ms / 1e6


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--interpret", action="store_true", help="run on CPU through Triton's interpreter (sets TRITON_INTERPRET=1)")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes, correctness check only")
    ap.add_argument("--batch", default="64,128")
    ap.add_argument("--lengths", default="1024,2048,4096,8192")
    ap.add_argument("--s-q", default="1,2")
    ap.add_argument("--heads", type=int, default=128)
    ap.add_argument("--no-sweep", action="store_true", help="time only the default launch configuration")
    ap.add_argument("--compile-only", action="store_true",
                    help="no GPU needed: compile the kernels for --arch (down to a cubin) in every swept configuration")
    ap.add_argument("--arch", type=int, default=90, help="CUDA compute capability for --compile-only (90: H100/H200)")
    args = ap.parse_args(argv)
    if args.compile_only:
        from llmlab.kernels.flash_mla_triton import compile_for_gpu

        for cfg in CONFIGS:
            for splits in (1, 4):
                res = compile_for_gpu(args.arch, **cfg, num_splits=splits)
                print(f"sm_{args.arch} bf16 splits {splits} {cfg}: compiled, {res['shared']:,} B shared memory")
        return

    if args.interpret:
        if "triton" in sys.modules:
            raise SystemExit("flash_mla_gpu: triton was imported before --interpret could set TRITON_INTERPRET=1")
        os.environ["TRITON_INTERPRET"] = "1"  # must be set before triton is first imported
        device = torch.device("cpu")
    elif not torch.cuda.is_available():
        raise SystemExit("flash_mla_gpu: no CUDA device; nothing timed "
                         "(--interpret --tiny checks correctness on CPU)")
    else:
        device = torch.device("cuda")
    try:
        import triton  # noqa: F401
    except ImportError:
        raise SystemExit("flash_mla_gpu: triton is not installed (pip install -e '.[kernels]')")

    if args.tiny:
        shapes = [(1, 1, 1, 4), (3, 130, 2, 8)]
        for dt in (torch.float32, torch.bfloat16):
            check(device, dt, shapes, d_c=32, d_r=16, splits_list=[1, 3, None])
        print("flash_mla_gpu: tiny correctness check passed (interpreter)" if args.interpret
              else "flash_mla_gpu: tiny correctness check passed")
        return
    if args.interpret:
        raise SystemExit("flash_mla_gpu: --interpret needs --tiny (full shapes take hours in the interpreter)")
    run_gpu(args, device)


def run_gpu(args, device) -> None:
    import triton.testing

    from llmlab.kernels.flash_mla_triton import flash_mla_triton

    d_c, d_r, dt = 512, 64, torch.bfloat16
    print(f"device {torch.cuda.get_device_name(device)}, torch {torch.__version__}, triton {triton.__version__}")
    check(device, torch.float32, [(4, 700, 2, 16)], d_c, d_r, [1, 4, None])
    check(device, dt, [(8, 3000, 1, args.heads), (4, 1500, 2, args.heads)], d_c, d_r, [1, 4, None])
    copy_bw = copy_bandwidth(device)
    print(f"device-to-device copy: {copy_bw:,.0f} GB/s (read + write)")

    # untuned kernel: try a few launch configurations, report the best
    configs = CONFIGS[:1] if args.no_sweep else CONFIGS
    print(f"\n{'batch':>5} {'len':>5} {'s_q':>3} {'us':>9} {'GB/s':>8} {'TFLOP/s':>8} {'of copy':>8}  config")
    for s_q in [int(x) for x in args.s_q.split(",")]:
        for batch in [int(x) for x in args.batch.split(",")]:
            for length in [int(x) for x in args.lengths.split(",")]:
                q, kv, table, lens = make_inputs(batch, length, s_q, args.heads, d_c, d_r, dt, device)
                best = None
                for cfg in configs:
                    try:
                        ms = triton.testing.do_bench(lambda: flash_mla_triton(q, kv, table, lens, d_c, 0.1, **cfg),
                                                     warmup=10, rep=50)
                    except Exception as e:  # e.g. out of shared memory for this configuration
                        print(f"  config {cfg} failed: {type(e).__name__}: {str(e)[:100]}")
                        continue
                    if best is None or ms < best[0]:
                        best = (ms, cfg)
                if best is None:
                    continue
                ms, cfg = best
                rows = batch * s_q * args.heads
                nbytes = batch * length * (d_c + d_r) * 2 + q.numel() * 2 + rows * d_c * 2
                gbs = nbytes / ms / 1e6
                tflops = 2 * rows * length * (2 * d_c + d_r) / ms / 1e9
                print(f"{batch:5d} {length:5d} {s_q:3d} {ms * 1e3:9.1f} {gbs:8,.0f} {tflops:8.1f} {gbs / copy_bw:7.0%}  "
                      f"m{cfg['block_m']} n{cfg['block_n']} w{cfg['num_warps']} s{cfg['num_stages']}")
                del q, kv, table, lens


if __name__ == "__main__":
    main()
