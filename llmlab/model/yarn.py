"""YaRN: RoPE stretched to a longer context (Peng et al. 2023, arXiv 2309.00071), as DeepSeek-V2/V3
checkpoints (and some Llama ones) ship it.

With s = `rope_factor` and L = `rope_original_positions` (the pretraining context), each rotary
frequency θ_i = theta^(-2i/d) is blended between itself (fast-rotating dimensions, which complete
many turns within L: kept, "extrapolated") and θ_i / s (slow ones: "interpolated" into the longer
context), by a linear ramp over dimension index between

    dim(r) = d · ln(L / (2π r)) / (2 ln theta)   at r = beta_fast and r = beta_slow rotations,

floored and ceiled (and clamped to [0, d-1]):  θ'_i = θ_i/s · (1 - e_i) + θ_i · e_i, with
e_i = 1 - clamp((i - low) / (high - low), 0, 1). cos and sin are multiplied by the attention factor
mscale(s, m) / mscale(s, m_all) (mscale(s, m) = 0.1 m ln s + 1, or mscale(s, 1) alone when m or
m_all is 0), so q·k grows by its square; DeepSeek's MLA further multiplies its softmax scale by
mscale(s, m_all)² (`softmax_factor`). These are transformers' formulas, so converted checkpoints
give its logits (tested against it).
"""
from __future__ import annotations

import math

import torch

from llmlab.config import ModelConfig


def mscale(scale: float, m: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0


def attention_factor(config: ModelConfig) -> float:
    """What cos and sin are multiplied by (1.0 without YaRN)."""
    if config.rope_scaling != "yarn":
        return 1.0
    s, m, m_all = config.rope_factor, config.rope_mscale, config.rope_mscale_all_dim
    return mscale(s, m) / mscale(s, m_all) if m and m_all else mscale(s)


def softmax_factor(config: ModelConfig) -> float:
    """DeepSeek MLA's extra factor on 1/√d_qk (1.0 without YaRN or with rope_mscale_all_dim 0)."""
    if config.rope_scaling != "yarn" or not config.rope_mscale_all_dim:
        return 1.0
    return mscale(config.rope_factor, config.rope_mscale_all_dim) ** 2


def inv_freq(plain: torch.Tensor, config: ModelConfig) -> torch.Tensor:
    """YaRN's blend of plain RoPE's d/2 frequencies `plain` (float64)."""
    dim, base = 2 * plain.shape[0], config.rope_theta
    s, original = config.rope_factor, config.rope_original_positions

    def dim_of(rotations: float) -> float:
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(dim_of(config.rope_beta_fast)), 0)
    high = min(math.ceil(dim_of(config.rope_beta_slow)), dim - 1)
    if low == high:
        high += 0.001  # no singular ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    extrapolate = 1 - ramp
    return plain / s * (1 - extrapolate) + plain * extrapolate
