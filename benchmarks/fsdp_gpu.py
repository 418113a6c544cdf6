"""FSDP2 bf16 training speed of the 124M GPT-2 shape on one GPU: tokens/s and MFU.

    python benchmarks/fsdp_gpu.py [--steps 20] [--batch-size 8] [--compile] [--peak-tflops 989]
    torchrun --standalone --nproc_per_node=8 benchmarks/fsdp_gpu.py     # the same on every GPU of a node

The model (GPT-2 small: 12 layers, 12 heads, 768 wide, 1024 context, vocab 50304, tied head) is
built on the meta device and sharded with llmlab's own --parallel fsdp code (bf16 parameters and
compute, fp32 gradient reduction), and trained by llmlab's TrainStep on random tokens (speed does
not depend on the data). MFU = achieved model FLOP/s over the GPU's peak dense bf16 FLOP/s, with
6 * params + 12 * layers * context * width FLOPs per token (PaLM, appendix B). Without CUDA it
prints one line and exits 2. Last line: {"tokens_per_s": ..., "mfu": ..., ...}
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO / "src"))

PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 70.0, "L4": 121.0,
                    "4090": 165.0}  # dense, SXM where there are two forms


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=20, help="timed steps after 3 warm-up steps")
    p.add_argument("--batch-size", type=int, default=8, help="rows of 1024 tokens per GPU and step")
    p.add_argument("--compile", action="store_true", help="compile each block before sharding")
    p.add_argument("--activation-checkpointing", action="store_true")
    p.add_argument("--peak-tflops", type=float, default=None, help="the GPU's dense bf16 peak (default: by name)")
    ns = p.parse_args(argv)

    import torch

    if not torch.cuda.is_available():
        print("fsdp_gpu: needs a CUDA GPU (none found); nothing measured", file=sys.stderr)
        return 2
    from llmlab.presets import preset_config
    from llmlab.training import parallel
    from llmlab.training.step import StepConfig, TrainStep, make_optimizer

    ranks, device = parallel.start("fsdp", "cuda")
    config = preset_config("flash", vocab_size=50304, n_layer=12, n_head=12, n_embd=768, block_size=1024,
                           dropout=0.0)
    built = parallel.build(config, "fsdp", device, ranks, seed=0,
                           activation_checkpointing=ns.activation_checkpointing, compile=ns.compile)
    model = built.model
    opt = make_optimizer(model, 0.1, (0.9, 0.95), 6e-4)
    step = TrainStep(model, opt, StepConfig(grad_accum=1, grad_clip=1.0, device=device), built.loss_fn,
                     built.sync, ranks.mean)
    gen = torch.Generator(device=device).manual_seed(ranks.rank)
    x = torch.randint(config.vocab_size, (ns.batch_size, config.block_size), device=device, generator=gen)
    times = []
    for i in range(3 + ns.steps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        step(lambda: (x, x.roll(-1, dims=1)), 6e-4)  # .item() of the loss waits for the step
        times.append(time.perf_counter() - t0)
    n_params = model.num_params()
    tokens = ns.batch_size * config.block_size * ranks.world
    sec = statistics.median(times[3:])
    flops_per_token = 6 * n_params + 12 * config.n_layer * config.block_size * config.n_embd
    name = torch.cuda.get_device_name()
    peak = ns.peak_tflops or next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
    mfu = None if peak is None else flops_per_token * tokens / sec / (peak * 1e12 * ranks.world)
    if ranks.is_main:
        print(f"{name} x{ranks.world}, torch {torch.__version__}: GPT-2 124M ({n_params / 1e6:.1f}M params), "
              f"FSDP2 bf16{', compiled' if ns.compile else ''}, batch {ns.batch_size}x{config.block_size} per GPU")
        print(f"median step {sec * 1000:.1f} ms: {tokens / sec:,.0f} tokens/s"
              + ("" if mfu is None else f", MFU {100 * mfu:.1f}% of {peak:.0f} TFLOP/s per GPU")
              + f", peak memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
        print(json.dumps({"tokens_per_s": round(tokens / sec, 1), "mfu": None if mfu is None else round(mfu, 4),
                          "step_ms": round(sec * 1000, 2), "gpus": ranks.world, "device": name}))
    ranks.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
