"""Training, one concern a module (imports flow one way, from loop down):

    args.py       TrainArgs: the settings of `llmlab train`
    plan.py       plan_run(): RunPlan, every decision before work (resume merging, batch, schedule)
    loop.py       train(): the loop, evals, checkpoints, resume
    step.py       StepConfig, TrainStep (one optimizer step), make_optimizer
    schedule.py   LRSchedule: warmup + cosine
    device.py     pick_device, autocast_for
    evaluate.py   mean_loss: the one loss-over-windows evaluation
    parallel.py   torch.distributed: process group, DDP / FSDP2 wrapping, per-rank batches
    checkpoints.py metrics.jsonl and last/ + best/ (single-process or sharded)
    dcp.py        sharded checkpoints (torch.distributed.checkpoint, safetensors shards)
    dcp_legacy.py the earlier pickle-based sharded format, read without running code
"""
from llmlab.training.args import TrainArgs
from llmlab.training.loop import train
from llmlab.training.plan import RunPlan, plan_run

__all__ = ["TrainArgs", "train", "plan_run", "RunPlan"]
