"""The one generic decoder-only Transformer. Every rung of the ladder is this class with another
ModelConfig; attention, positions, norms and MLPs are modules built from the config's kinds."""
from __future__ import annotations

import math
from typing import Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from llmlab.config import ModelConfig
from llmlab.errors import LlmlabError
from llmlab.model import attention, mla, moe  # noqa: F401 - register attention="mha", "mla", the backends, mlp="moe"
from llmlab.model.cache import InferenceCache
from llmlab.model.layers import build_mlp, build_norm
from llmlab.model.positions import build_positions
from llmlab.registry import lookup


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: ModelConfig, layer: int = 0):
        super().__init__()
        self.norm1 = build_norm(config)
        self.attn = lookup("attention", config.attention)(config)
        self.norm2 = build_norm(config)
        self.mlp = build_mlp(config, layer)  # an MoE model's first layers may stay dense

    def forward(self, x, rotary=None, view=None, layer: int = 0):
        x = x + self.attn(self.norm1(x), rotary, view, layer)
        return x + self.mlp(self.norm2(x))


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        config.validate()
        self.config = config
        # Building the modules draws their default inits from torch's RNG; init_weights() below redraws
        # them in the same order from the same state, so the weights equal the plain build's at any seed
        # and a model built on the meta device gets the same ones from init_weights() after to_empty().
        rng = torch.get_rng_state()
        self.tok_emb = nn.Embedding(config.vocab_size, config.n_embd)
        self.pos = build_positions(config, lookup("attention", config.attention).rotary_dim(config))
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.norm_f = build_norm(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        torch.set_rng_state(rng)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """(Re)initialise every parameter and non-persistent buffer (rope/sinusoidal tables): each
        submodule's own reset_parameters() in construction order, then GPT-2's init. Used after
        building on the meta device and sharding (llmlab.training.parallel), where to_empty() left
        garbage in them."""
        if self.config.tie_embeddings and self.lm_head.weight is not self.tok_emb.weight:
            self.lm_head.weight = self.tok_emb.weight  # to_empty() gives each module its own tensor
        for module in self.modules():
            if module is not self and hasattr(module, "reset_parameters"):
                module.reset_parameters()
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        """GPT-2 init: N(0, 0.02) everywhere; projections into the residual stream get
        0.02/sqrt(2·n_layer) so the residual's variance does not grow with depth."""
        if isinstance(module, nn.Linear):
            std = 0.02
            if getattr(module, "residual_proj", False):
                std /= math.sqrt(2 * self.config.n_layer)
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    # ---- sizes ----------------------------------------------------------------------------
    def num_params(self, non_embedding: bool = False) -> int:
        """Unique parameters (a tied head counts once). non_embedding drops the token and position
        tables, as in the scaling-law papers."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.tok_emb.weight.numel()
            n -= sum(p.numel() for p in self.pos.parameters())
        return n

    def num_active_params(self, non_embedding: bool = False) -> int:
        """Parameters one token runs through: num_params() less, in each MoE layer, the routed experts
        it is not sent to ((n_routed_experts - num_experts_per_tok) experts' weights)."""
        return self.num_params(non_embedding) - sum(m.idle_params() for m in self.modules() if isinstance(m, moe.MoE))

    # ---- inference cache -----------------------------------------------------------------
    def new_cache(self, batch: int, max_len: int, dtype: Optional[torch.dtype] = None,
                  device=None) -> InferenceCache:
        """Allocate every layer's cache for `batch` rows of up to `max_len` tokens."""
        for name, value in (("batch", batch), ("max_len", max_len)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise LlmlabError(f"new_cache: {name} must be a positive integer, got {value!r}")
        limit = self.pos.max_positions
        if limit is not None and max_len > limit:
            raise LlmlabError(f"cache length {max_len} exceeds block_size {limit} of learned positions")
        self.pos.ensure_length(max_len)
        param = self.tok_emb.weight
        dtype, device = dtype or param.dtype, device or param.device
        if getattr(self.blocks[0].attn, "paged", False):  # the attention kind keeps one paged pool
            return self.blocks[0].attn.new_paged_cache(len(self.blocks), batch, max_len, dtype, device)
        layers = [blk.attn.new_cache(batch, max_len, dtype, device) for blk in self.blocks]
        return InferenceCache(layers, batch, max_len, device)

    # ---- forward --------------------------------------------------------------------------
    def forward(self, idx: torch.Tensor, cache: Optional[InferenceCache] = None,
                input_pos: Union[torch.Tensor, int, None] = None) -> torch.Tensor:
        """idx (B, T) -> logits (B, T, vocab).

        Without a cache the T tokens sit at positions 0..T-1 (plain causal attention). With one,
        they are written at cache slots `input_pos` (a (T,) tensor, or the int of the first slot)
        and attend to everything cached before them."""
        b, t = idx.shape
        if cache is None:
            limit = self.pos.max_positions
            if limit is not None and t > limit:
                raise LlmlabError(f"sequence length {t} exceeds block_size {limit}; "
                                  "crop the input (learned positions end there)")
            self.pos.ensure_length(t)  # a Python int: no host sync in the (compiled) forward
            pos = torch.arange(t, device=idx.device)
            view = None  # plain causal: SDPA's is_causal / the manual tril mask
        else:  # the cache's tables were sized by new_cache
            if isinstance(input_pos, int) or input_pos is None:
                input_pos = torch.arange(input_pos or 0, (input_pos or 0) + t, device=idx.device)
            pos, view = cache.begin(input_pos, b, self.tok_emb.weight.dtype)
        x = self.drop(self.pos.embed(self.tok_emb(idx), pos))
        rotary = self.pos.rotary(pos)
        for i, block in enumerate(self.blocks):
            x = block(x, rotary, view, i)
        return self.lm_head(self.norm_f(x))

    def loss(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross-entropy of logits(idx) against targets (B, T)."""
        logits = self(idx)
        return F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.reshape(-1))
