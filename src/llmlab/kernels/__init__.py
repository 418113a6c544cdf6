"""Hand-written kernels, each behind one dispatch function with a PyTorch reference beside it."""
from llmlab.kernels.flash_mla import flash_mla_decode, flash_mla_decode_op, flash_mla_path, flash_mla_reference

__all__ = ["flash_mla_decode", "flash_mla_decode_op", "flash_mla_reference", "flash_mla_path"]
