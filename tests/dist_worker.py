"""One rank of a test run, started by torchrun from tests/test_parallel.py:

    torchrun --standalone --nproc_per_node=N tests/dist_worker.py '{"train": {...TrainArgs...}, ...}'

Options beside "train": "stop_after" (every rank stops once that step's loss is logged, like a
crash between checkpoints), "nan_rank"/"nan_from" (that rank's training loss becomes NaN from its
nan_from-th micro-batch on), "raise_rank" (that rank raises a plain error in its first step)."""
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


if __name__ == "__main__":
    sys.exit(run(json.loads(sys.argv[1])))
