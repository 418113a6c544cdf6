"""One rank of a test run, started by torchrun from tests/test_parallel.py:

    torchrun --standalone --nproc_per_node=N tests/dist_worker.py '{"train": {...TrainArgs...}, ...}'

Options beside "train": "stop_after" (every rank stops once that step's loss is logged, like a
crash between checkpoints), "nan_rank"/"nan_from" (that rank's training loss becomes NaN from its
nan_from-th micro-batch on), "raise_rank" (that rank raises a plain error in its first step).

{"probe": NAME, ...} runs one of the PROBES below instead (plain `python tests/dist_worker.py`, a
process group of one) and prints its result as JSON: tests that need a process group run it in a
process of their own, with a timeout, never in pytest's (a group torn down by garbage collection
there once hung the suite)."""
import json
import os
import sys

from llmlab.cli import main as cli_main
from llmlab.model import Transformer
from llmlab.training import TrainArgs, checkpoints, train


class Stop(Exception):
    """Raised after the step named by spec["stop_after"]: ends this rank's run early (a kill stand-in)."""


def run(spec: dict) -> int:
    rank = int(os.environ.get("RANK", "0"))
    real_loss, real_write = Transformer.loss, checkpoints.MetricsLog.write
    calls = {"n": 0}

    def loss(self, x, y):
        out = real_loss(self, x, y)
        if self.training:
            calls["n"] += 1
            if rank == spec.get("raise_rank"):
                raise RuntimeError(f"rank {rank} broke on purpose")
            if rank == spec.get("nan_rank") and calls["n"] >= spec["nan_from"]:
                return out * float("nan")
        return out

    def write(self, **rec):
        real_write(self, **rec)
        if "loss" in rec and rec["step"] == spec.get("stop_after"):
            raise Stop

    Transformer.loss, checkpoints.MetricsLog.write = loss, write
    if "cli" in spec:  # through the command line: its one-line errors and exit status
        return cli_main(spec["cli"])
    try:
        train(TrainArgs(**spec["train"]))
    except Stop:
        return 0  # stopped on purpose, as asked
    return 0


def probe_activation_checkpointing(checkpointing: bool) -> dict:
    """Block forwards counted for one forward + backward through the DDP-wrapped loss."""
    import torch

    from llmlab.model.transformer import Block
    from llmlab.presets import preset_config
    from llmlab.training import parallel

    calls = []
    real = Block.forward
    Block.forward = lambda self, *a, **k: calls.append(1) or real(self, *a, **k)
    ranks, device = parallel.start("ddp", "cpu")
    try:
        config = preset_config("flash", vocab_size=50, n_layer=2, n_head=2, n_embd=16, block_size=8)
        built = parallel.build(config, "ddp", device, ranks, seed=0, activation_checkpointing=checkpointing)
        x = torch.randint(50, (2, 8))
        built.loss_fn(x, x).backward()
        del built
    finally:
        ranks.close()
    return {"block_forwards": len(calls), "n_layer": config.n_layer}


def probe_ddp_reductions(use_no_sync: bool) -> dict:
    """All-reduce calls (and buckets) of one optimizer step over 3 micro-batches."""
    import torch
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    from llmlab.presets import preset_config
    from llmlab.training import parallel
    from llmlab.training.step import StepConfig, TrainStep, make_optimizer

    ranks, device = parallel.start("ddp", "cpu")
    calls = []
    try:
        config = preset_config("flash", vocab_size=50, n_layer=1, n_head=2, n_embd=16, block_size=8)
        built = parallel.build(config, "ddp", device, ranks, seed=0)

        def counting(state, bucket):
            calls.append(bucket.index())
            return allreduce_hook(state, bucket)

        built.loss_fn.register_comm_hook(None, counting)
        opt = make_optimizer(built.model, 0.1, (0.9, 0.99), 1e-3)
        step = TrainStep(built.model, opt, StepConfig(grad_accum=3), built.loss_fn,
                         built.sync if use_no_sync else None, ranks.mean)
        x = torch.randint(50, (2, 8))
        step(lambda: (x, x), 1e-3)
        del built, step
    finally:
        ranks.close()
    return {"calls": len(calls), "buckets": len(set(calls))}


PROBES = {"activation_checkpointing": probe_activation_checkpointing, "ddp_reductions": probe_ddp_reductions}


if __name__ == "__main__":
    spec = json.loads(sys.argv[1])
    if "probe" in spec:
        print(json.dumps(PROBES[spec.pop("probe")](**spec)))
        sys.exit(0)
    sys.exit(run(spec))
