"""Kept for existing imports: training lives in llmlab.training (see its __init__ for the layout)."""
from llmlab.training.args import TrainArgs
from llmlab.training.checkpoints import MetricsLog
from llmlab.training.device import pick_device
from llmlab.training.loop import train

__all__ = ["TrainArgs", "train", "MetricsLog", "pick_device"]
