"""Position encodings. Each kind either adds a vector to the token embeddings (`embed`) or rotates
queries and keys inside attention (`rotary`); the model calls both and each kind does one of them.

`pos` is a LongTensor of positions, shape (T,) shared by all rows or (B, T) per row. Tables that
grow (sinusoidal, RoPE) are grown by the model before a forward (`ensure_length`, from Python ints:
no device-to-host sync inside the forward, so it compiles as one graph). A cache holds its own cut
of them (`tables(max_len)`), passed back as `tables`: the compiled decode step reads them as inputs
whose length stays dynamic, so growing the module's tables for a longer generation never
recompiles it.

RoPE rotates as many channels as the attention kind asks for (`rotary_dim`): the whole head for
multi-head attention, only the decoupled rope slice for multi-head latent attention.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn

from llmlab.config import ModelConfig
from llmlab.model import yarn
from llmlab.registry import lookup, register

Rotary = Optional[tuple[torch.Tensor, torch.Tensor]]  # (cos, sin), each (T, hd) or (B, 1, T, hd)


@register("position", "none")
class NoPositions(nn.Module):
    """No explicit positions (the causal mask alone orders tokens)."""

    max_positions: Optional[int] = None  # any length

    def __init__(self, config: Optional[ModelConfig] = None, rotary_dim: int = 0):
        super().__init__()

    def embed(self, x: torch.Tensor, pos: torch.Tensor, tables: tuple = ()) -> torch.Tensor:
        return x

    def rotary(self, pos: torch.Tensor, tables: tuple = ()) -> Rotary:
        return None

    def ensure_length(self, n: int) -> None:
        pass

    def tables(self, n: int) -> tuple:
        """This kind's fixed tables cut to `n` positions (views), for a cache to hand back."""
        return ()


@register("position", "learned")
class LearnedPositions(NoPositions):
    """GPT-2 / nanoGPT: a trained (block_size, C) table; cannot go past block_size."""

    def __init__(self, config: ModelConfig, rotary_dim: int = 0):
        super().__init__()
        self.max_positions = config.block_size
        self.weight = nn.Parameter(torch.randn(config.block_size, config.n_embd) * 0.02)

    def reset_parameters(self) -> None:  # Transformer.init_weights; draws what randn(...) * 0.02 draws
        nn.init.normal_(self.weight, std=0.02)

    def embed(self, x: torch.Tensor, pos: torch.Tensor, tables: tuple = ()) -> torch.Tensor:
        return x + self.weight[pos]


def sinusoidal_table(n: int, dim: int) -> torch.Tensor:
    """Vaswani et al. 2017: PE[p, 2i] = sin(p / 10000^(2i/d)), PE[p, 2i+1] = cos(same)."""
    pos = torch.arange(n, dtype=torch.float64)[:, None]
    inv = torch.exp(-math.log(10000.0) * torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    table = torch.zeros(n, dim, dtype=torch.float64)
    table[:, 0::2] = torch.sin(pos * inv)
    table[:, 1::2] = torch.cos(pos * inv[: dim // 2])
    return table.float()


# The std of Transformer._init_weights' token embeddings (GPT-2's N(0, 0.02)); the learned table
# starts at the same scale. The sinusoidal table is scaled to it (see SinusoidalPositions).
EMBED_INIT_STD = 0.02


@register("position", "sinusoidal")
class SinusoidalPositions(NoPositions):
    """Fixed sinusoids, no parameters, any length (the table grows on demand, never saved).

    Scale: the table is `sinusoidal_table · EMBED_INIT_STD · √2`. A row of sinusoids has RMS
    1/√2 (each sin/cos pair's squares sum to 1), while token embeddings start at std 0.02: added
    as is, position would outweigh token identity ~35x at init and the model first has to learn
    embeddings 35x larger (measured: 0.64 nats worse than a learned table after 300 steps). Vaswani
    et al. (§3.4) balance the two by multiplying the embeddings by √d_model instead; that would
    change the token embedding and the head tied to it, which every other rung shares, so here the
    fixed table is brought to the embeddings' scale: its RMS equals the std of the token
    embeddings and of the learned table at init, and this rung differs from kv_cache only in what
    the position vectors are (fixed sinusoids instead of learned noise), not in their size. Still a
    parameter-free fixed table: the scale is a constant, not a weight."""

    scale = EMBED_INIT_STD * math.sqrt(2.0)  # RMS of the scaled table = EMBED_INIT_STD

    def __init__(self, config: ModelConfig, rotary_dim: int = 0):
        super().__init__()
        self.dim = config.n_embd
        self.register_buffer("table", self._table(config.block_size), persistent=False)

    def _table(self, n: int) -> torch.Tensor:
        return sinusoidal_table(n, self.dim) * self.scale

    def reset_parameters(self) -> None:  # Transformer.init_weights: the table after to_empty()
        self.table = self._table(self.table.shape[0]).to(self.table.device)

    def ensure_length(self, n: int) -> None:
        if n > self.table.shape[0]:
            self.table = self._table(n).to(self.table.device)

    def tables(self, n: int) -> tuple:
        return (self.table[:n],)

    def embed(self, x: torch.Tensor, pos: torch.Tensor, tables: tuple = ()) -> torch.Tensor:
        table = tables[0] if tables else self.table
        return x + table[pos].to(x.dtype)


def rope_tables(n: int, dim: int, theta: float = 10000.0, config: Optional[ModelConfig] = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """RoFormer angles p * theta^(-2i/d) for i < d/2 (YaRN's blend where `config` asks for it,
    llmlab.model.yarn), repeated for the half-split layout: channel j and j + d/2 form one rotating
    pair (the layout of Llama checkpoints in transformers). YaRN's attention factor multiplies cos and sin."""
    inv_freq = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    factor = 1.0
    if config is not None and config.rope_scaling == "yarn":
        inv_freq, factor = yarn.inv_freq(inv_freq, config), yarn.attention_factor(config)
    angles = torch.arange(n, dtype=torch.float64)[:, None] * inv_freq[None, :]  # (n, d/2)
    angles = torch.cat([angles, angles], dim=-1)  # (n, d)
    return (angles.cos() * factor).float(), (angles.sin() * factor).float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each (x_j, x_{j+d/2}) pair by its angle: x*cos + rotate_half(x)*sin,
    rotate_half(x) = (-x2, x1). x: (B, H, T, hd); cos/sin broadcast to it."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)


@register("position", "rope")
class RotaryPositions(NoPositions):
    """RoPE: nothing added to embeddings; q and k are rotated by position-dependent angles so that
    q·k depends only on the position difference. cos/sin tables (rotary_dim wide) are
    non-persistent buffers."""

    def __init__(self, config: ModelConfig, rotary_dim: int):
        super().__init__()
        self.dim, self.config = rotary_dim, config
        cos, sin = rope_tables(config.block_size, self.dim, config.rope_theta, config)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def reset_parameters(self) -> None:  # Transformer.init_weights: the tables after to_empty()
        cos, sin = rope_tables(self.cos.shape[0], self.dim, self.config.rope_theta, self.config)
        self.cos, self.sin = cos.to(self.cos.device), sin.to(self.sin.device)

    def ensure_length(self, n: int) -> None:
        if n > self.cos.shape[0]:
            cos, sin = rope_tables(n, self.dim, self.config.rope_theta, self.config)
            self.cos, self.sin = cos.to(self.cos.device), sin.to(self.sin.device)

    def tables(self, n: int) -> tuple:
        return self.cos[:n], self.sin[:n]

    def rotary(self, pos: torch.Tensor, tables: tuple = ()) -> Rotary:
        cos, sin = tables if tables else (self.cos, self.sin)
        cos, sin = cos[pos], sin[pos]  # (T, hd) or (B, T, hd)
        if pos.dim() == 2:  # per-row positions: add the head axis -> (B, 1, T, hd)
            cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        return cos, sin


def build_positions(config: ModelConfig, rotary_dim: int) -> NoPositions:
    """The config's position kind; `rotary_dim` is how many channels of q and k the attention kind
    rotates (used by RoPE only)."""
    return lookup("position", config.position)(config, rotary_dim)
