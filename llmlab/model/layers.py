"""Norms and MLPs, each picked by name from the config."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from llmlab.config import ModelConfig
from llmlab.registry import lookup, register

# x / rms(x) * g (Llama); computed in fp32 inside torch
register("norm", "rmsnorm")(lambda config: nn.RMSNorm(config.n_embd, eps=config.norm_eps))
register("norm", "layernorm")(lambda config: nn.LayerNorm(config.n_embd, eps=config.norm_eps, bias=config.bias))


def linear_weight(linear: nn.Module) -> torch.Tensor:
    """The matrix a linear layer applies, for code that reads it instead of calling the layer (MLA's
    absorbed decode). A layer wrapped with LoRA adapters (llmlab.lora, peft's layers: the weight in
    `base_layer`) applies its base weight plus each active, unmerged adapter's delta (alpha/r)·B·A."""
    base = getattr(linear, "base_layer", None)
    if base is None:
        return linear.weight
    w = base.weight
    if not linear.disable_adapters:
        for name in linear.active_adapters:
            if name in linear.lora_A and name not in linear.merged_adapters:
                w = w + linear.get_delta_weight(name)
    return w


def build_norm(config: ModelConfig) -> nn.Module:
    return lookup("norm", config.norm)(config)


@register("mlp", "gelu", "gelu_tanh")
class MLP(nn.Module):
    """GPT-2 feed-forward: proj(gelu(fc(x))). gelu_tanh is GPT-2's own tanh approximation."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.fc = nn.Linear(config.n_embd, config.ffn_size, bias=config.bias)
        self.proj = nn.Linear(config.ffn_size, config.n_embd, bias=config.bias)
        self.proj.residual_proj = True  # scaled init (see Transformer._init_weights)
        self.approximate = "tanh" if config.mlp == "gelu_tanh" else "none"
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.proj(F.gelu(self.fc(x), approximate=self.approximate)))


@register("mlp", "swiglu")
class SwiGLU(nn.Module):
    """Llama feed-forward: down(silu(gate(x)) * up(x)). gate and up are one fused matmul (`fc`),
    gate rows first, so a Llama checkpoint maps by concatenating gate_proj and up_proj."""

    def __init__(self, config: ModelConfig, hidden: Optional[int] = None):  # hidden: MoE experts' width
        super().__init__()
        hidden = config.ffn_size if hidden is None else hidden
        self.fc = nn.Linear(config.n_embd, 2 * hidden, bias=config.bias)
        self.proj = nn.Linear(hidden, config.n_embd, bias=config.bias)
        self.proj.residual_proj = True
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.fc(x).chunk(2, dim=-1)
        return self.dropout(self.proj(F.silu(gate) * up))


def build_mlp(config: ModelConfig, layer: int = 0) -> nn.Module:
    return lookup("mlp", config.mlp_for_layer(layer))(config)
