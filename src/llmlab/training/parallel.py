"""torch.distributed in one place: start the process group, build the model for DDP or FSDP2, and
give each rank its slice of the step's batch. The model code does not change; parallelism wraps it
from outside, in torchtitan's order: activation checkpointing -> compile -> FSDP (per block, then
the root, which holds the embedding and the head, so a tied pair stays one parameter in one unit).

The ranks are started by torchrun (which sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT);
without it, --parallel runs as a group of one process (same code path, same checkpoint format)."""
from __future__ import annotations

import os
import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, ContextManager, Optional

import torch
import torch.distributed as dist
import torch.nn as nn

from llmlab import lora
from llmlab.config import ModelConfig
from llmlab.errors import LlmlabError, one_line
from llmlab.lora import LoraSettings
from llmlab.model import Transformer
from llmlab.runtime import Runtime
from llmlab.training.device import use_bf16


@dataclass
class Ranks:
    """Where this process stands: rank, world size, and the collectives train() needs."""
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    active: bool = False  # a process group is up (--parallel)

    @property
    def is_main(self) -> bool:  # writes the logs, the progress bar, metrics and run files
        return self.rank == 0

    def mean(self, value: float) -> float:
        """The mean of `value` over the ranks (every rank gets it)."""
        if not self.active:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=_reduce_device())
        dist.all_reduce(t)
        return t.item() / self.world

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        """`t` summed over the ranks (one all-reduce; every rank gets it)."""
        if not self.active:
            return t
        t = t.clone()
        dist.all_reduce(t)
        return t

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def close(self) -> None:
        if self.active and dist.is_initialized():
            dist.destroy_process_group()
        self.active = False


def _reduce_device() -> str:
    return f"cuda:{torch.cuda.current_device()}" if dist.get_backend() == "nccl" else "cpu"


def launched_ranks() -> int:
    """WORLD_SIZE as torchrun set it (1 when started without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def start(parallel: str, device: str) -> tuple[Ranks, str]:
    """Join the process group for --parallel ddp|fsdp (nccl on CUDA, gloo on CPU); returns the
    ranks and this rank's device (cuda:LOCAL_RANK on GPUs)."""
    if parallel == "none":
        if launched_ranks() > 1:
            raise LlmlabError(f"started with {launched_ranks()} processes (torchrun) but without --parallel: "
                              "add --parallel ddp or --parallel fsdp")
        return Ranks(), device
    if device.startswith("mps"):
        raise LlmlabError(f"--parallel {parallel} runs on CUDA (nccl) or CPU (gloo), not on mps; use --device cpu")
    cuda = device.startswith("cuda")
    backend = "nccl" if cuda else "gloo"
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # torchrun
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if cuda:
            device = f"cuda:{local_rank}"
            torch.cuda.set_device(device)
        dist.init_process_group(backend, device_id=torch.device(device) if cuda else None)
    else:  # one process, no launcher: an in-memory store, nothing listens on the network
        local_rank = 0
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return Ranks(dist.get_rank(), dist.get_world_size(), local_rank, active=True), device


# ---- the model -------------------------------------------------------------------------------
@dataclass
class Parallel:
    """What TrainStep needs from the wrapping: the loss to differentiate, the accumulation sync."""
    model: Transformer  # the module to evaluate and checkpoint (FSDP shards it in place)
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    sync: Optional[Callable[[bool], ContextManager]] = None


class _LossModule(nn.Module):
    """DDP syncs gradients through its own forward(): this module's forward is the model's loss."""

    def __init__(self, model: Transformer):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.model.loss(x, y)


def _checkpoint_activations(model: Transformer) -> None:
    """Recompute each block's activations in backward instead of keeping them (memory for time).
    The block's forward is replaced on the instance, so parameter names do not change."""
    from torch.utils.checkpoint import checkpoint

    for block in model.blocks:
        inner = block.forward
        block.forward = lambda *args, _f=inner, **kw: checkpoint(_f, *args, use_reentrant=False, **kw)


def _built(config: ModelConfig, seed: int, start: Optional[Callable[[], dict]] = None,
           adapters: Optional[LoraSettings] = None, copies: int = 4) -> Transformer:
    """The whole model in this process's memory, as one process starts it: initialised from torch's
    RNG at `seed`, or with the weights `start()` returns (--init-from), then LoRA adapters (drawn
    from the RNG after that). Refused in one line if `copies` of its weights (training: weights,
    gradients and AdamW's two moments) cannot fit."""
    from llmlab.checkpoint import build_model

    torch.manual_seed(seed)
    model = build_model(config, "train", copies=copies)
    if start is not None:
        try:
            model.load_state_dict(start())
        except RuntimeError as e:  # a source whose weights do not fit its own config
            raise LlmlabError(f"--init-from: the source's weights do not fit its model config "
                              f"({one_line(e)}); restore it or pass another source") from None
    return lora.inject(model, adapters) if adapters is not None else model


def build(config: ModelConfig, parallel: str, device: str, ranks: Ranks, seed: int,
          activation_checkpointing: bool = False, compile: bool = False, runtime: Optional[Runtime] = None,
          start: Optional[Callable[[], dict]] = None, adapters: Optional[LoraSettings] = None) -> Parallel:
    """The model for `parallel` ('none', 'ddp' or 'fsdp'), initialised from torch's RNG at `seed`
    (or from the weights `start()` returns) so that every world size starts from the weights one
    process would, with LoRA `adapters` if given; it runs with `runtime` (the attention
    implementation; saved with its checkpoints as the run's default)."""
    runtime = runtime or Runtime()
    if parallel == "none":  # TrainStep compiles model.loss
        return Parallel(_built(config, seed, start, adapters).use_runtime(runtime).to(device), loss_fn=None)
    if parallel == "ddp":
        model = _built(config, seed, start, adapters).use_runtime(runtime).to(device)
    else:
        torch.manual_seed(seed)
        with torch.device("meta"):  # no memory yet: the weights are allocated as shards below
            model = Transformer(config, runtime)
        if adapters is not None:
            lora.inject(model, adapters)
    if activation_checkpointing:
        _checkpoint_activations(model)
    if compile:  # per block, before sharding (torchtitan's order); FSDP's hooks stay outside the graphs
        from llmlab.compiled import CompiledOrEager

        for block in model.blocks:
            eager = block.forward
            block.forward = CompiledOrEager(eager, lambda f=eager: torch.compile(f), "a transformer block")
    if parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        ddp = DDP(_LossModule(model), device_ids=[ranks.local_rank] if device.startswith("cuda") else None)
        return Parallel(model, loss_fn=ddp, sync=lambda last: nullcontext() if last else ddp.no_sync())
    _shard(model, device, ranks)
    _init_sharded(model, config, device, seed, start, adapters)
    return Parallel(model, loss_fn=model.loss)


def _shard(model: Transformer, device: str, ranks: Ranks) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(torch.device(device).type, (ranks.world,))
    # GPU: bf16 parameters and compute, gradients reduced in fp32; CPU: all fp32
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if use_bf16(device) else None
    kw = {"mesh": mesh} | ({"mp_policy": mp} if mp else {})
    for block in model.blocks:
        fully_shard(block, **kw)
    fully_shard(model, **kw)  # the rest: tok_emb (= lm_head when tied), positions, final norm


def reshard(model: nn.Module) -> None:
    """After an eval forward: FSDP keeps the root's parameters gathered after forward (backward
    would need them at once), and with no backward they stay so; shard them again before the
    checkpoint and the optimizer see the module's parameters."""
    from torch.distributed.fsdp import FSDPModule

    if isinstance(model, FSDPModule):
        model.reshard()


@torch.no_grad()
def _init_sharded(model: Transformer, config: ModelConfig, device: str, seed: int,
                  start: Optional[Callable[[], dict]] = None, adapters: Optional[LoraSettings] = None) -> None:
    """Allocate this rank's shards, then initialise them after sharding with the model's own
    init_weights(). On CUDA, DTensor's random ops draw each shard's part of one stream. On CPU
    they draw every shard from the rank's own generator (torch supports sharded RNG on CUDA-like
    devices only), which would differ from one process's weights; there, and on any device when
    starting from existing weights or with LoRA adapters (init_weights knows neither), every rank
    builds the plain model as one process would in host memory and keeps its shard of it."""
    model.to_empty(device=device)
    torch.manual_seed(seed)
    if device.startswith("cpu") or start is not None or adapters is not None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="DTensor random operators")
            model.init_weights()  # the non-persistent buffers (rope tables) and the tie
        full = _built(config, seed, start, adapters, copies=1).state_dict()
        set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True))
    else:
        model.init_weights()


# ---- the data ----------------------------------------------------------------------------------
class RankBatches:
    """One sampler draws the step's global micro-batch (batch_size * world windows) from one RNG
    state; rank r trains on rows [r * batch_size, (r + 1) * batch_size). So 2 ranks x 4 rows see
    exactly the windows 1 rank x 8 rows sees, and a checkpoint's sampler state resumes at any world
    size. With one rank it is the sampler itself (batches made on the device as before)."""

    def __init__(self, sampler, ranks: Ranks, device: str):
        self.sampler, self.ranks, self.device = sampler, ranks, torch.device(device)

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.sampler.next()
        if self.ranks.world == 1:
            return x, y
        rows = x.shape[0] // self.ranks.world
        mine = slice(self.ranks.rank * rows, (self.ranks.rank + 1) * rows)
        x, y = x[mine].contiguous(), y[mine].contiguous()
        if self.device.type == "cuda":
            return x.pin_memory().to(self.device, non_blocking=True), y.pin_memory().to(self.device, non_blocking=True)
        return x.to(self.device), y.to(self.device)

    def reset(self) -> None:
        self.sampler.reset()

    def state_dict(self) -> dict:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state)
