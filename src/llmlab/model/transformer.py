"""The one generic decoder-only Transformer. Every rung of the ladder is this class with another
ModelConfig (what the weights are) and Runtime (how they run); attention, positions, norms and MLPs
are modules built from the config's kinds, the attention implementation from the runtime's."""
from __future__ import annotations

import math
from typing import Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from llmlab.config import ModelConfig
from llmlab.errors import LlmlabError
from llmlab.model import attention, mla, moe  # noqa: F401 - register attention="mha"/"mla", their implementations, mlp="moe"
from llmlab.model.cache import CacheStep, DenseCache
from llmlab.model.layers import build_mlp, build_norm
from llmlab.model.paged_cache import PagedCache
from llmlab.model.positions import build_positions
from llmlab.registry import lookup
from llmlab.runtime import Runtime

CACHES = {"dense": DenseCache, "paged": PagedCache}


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: ModelConfig, layer: int = 0):
        super().__init__()
        self.norm1 = build_norm(config)
        self.attn = lookup("attention", config.attention)(config)
        self.norm2 = build_norm(config)
        self.mlp = build_mlp(config, layer)  # an MoE model's first layers may stay dense

    def forward(self, x, rotary=None, step=None, layer: int = 0):
        x = x + self.attn(self.norm1(x), rotary, step, layer)
        return x + self.mlp(self.norm2(x))


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig, runtime: Optional[Runtime] = None):
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
        self.use_runtime(runtime or Runtime())

    def use_runtime(self, runtime: Runtime) -> "Transformer":
        """Run with `runtime` from now on: each attention layer takes its implementation (chosen
        here, once); generation's cache kind and compile default come from it. Weights unchanged."""
        runtime.validate(self.config)
        impl = lookup("attention_impl", runtime.attention)
        for block in self.blocks:
            block.attn.use_impl(impl)
        self.runtime = runtime
        return self

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
    def new_cache(self, batch: int, max_len: int, dtype: Optional[torch.dtype] = None, device=None,
                  kind: Optional[str] = None, num_blocks: Optional[int] = None):
        """Every layer's cache for `batch` rows of up to `max_len` tokens, of `kind` (dense or
        paged; default: the runtime's, dense for a runtime that recomputes), holding what the
        attention kind keeps per token. `num_blocks` (paged only): blocks in the pool, shared by
        the rows (default: enough for every row at max_len); a server admits by free blocks."""
        for name, value in (("batch", batch), ("max_len", max_len), ("num_blocks", num_blocks)):
            if value is None and name == "num_blocks":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise LlmlabError(f"new_cache: {name} must be a positive integer, got {value!r}")
        kind = kind or (self.runtime.cache if self.runtime.uses_cache else "dense")
        if kind not in CACHES:
            raise LlmlabError(f"new_cache: kind must be one of {', '.join(CACHES)}, got {kind!r}")
        if num_blocks is not None and kind != "paged":
            raise LlmlabError(f"new_cache: num_blocks sizes a paged pool; a {kind} cache has one block per row")
        limit = self.pos.max_positions
        if limit is not None and max_len > limit:
            raise LlmlabError(f"cache length {max_len} exceeds block_size {limit} of learned positions")
        self.pos.ensure_length(max_len)
        param = self.tok_emb.weight
        dtype, device = dtype or param.dtype, device or param.device
        spec = lookup("attention", self.config.attention).cache_spec(self.config)
        extra = {"block_size": self.runtime.block_size, "num_blocks": num_blocks} if kind == "paged" else {}
        return CACHES[kind](spec, len(self.blocks), batch, max_len, dtype, device, self.pos.tables(max_len), **extra)

    # ---- forward --------------------------------------------------------------------------
    def forward(self, idx: torch.Tensor, cache=None, input_pos: Union[torch.Tensor, int, None] = None,
                step: Optional[CacheStep] = None) -> torch.Tensor:
        """idx (B, T) -> logits (B, T, vocab).

        Without a cache the T tokens sit at positions 0..T-1 (plain causal attention). With one,
        they are written at cache slots `input_pos` (the int of the first slot, or a (T,) tensor)
        and attend to everything cached before them. `step`: a CacheStep already made (the
        compiled decode step makes its own; see llmlab.compiled)."""
        b, t = idx.shape
        if step is None and cache is not None:
            start = 0 if input_pos is None else input_pos if isinstance(input_pos, int) else int(input_pos[0])
            cache.prepare(start, t, b)  # host work (a paged cache places the tokens), before the forward
            slots = torch.arange(start, start + t, device=idx.device)
            step = cache.begin(slots, b, prefill=start == 0)
        if step is None:
            limit = self.pos.max_positions
            if limit is not None and t > limit:
                raise LlmlabError(f"sequence length {t} exceeds block_size {limit}; "
                                  "crop the input (learned positions end there)")
            self.pos.ensure_length(t)  # a Python int: no host sync in the (compiled) forward
            pos, tables = torch.arange(t, device=idx.device), ()
        else:  # the cache's tables were sized by new_cache
            pos, tables = step.positions, step.tables
        x = self.drop(self.pos.embed(self.tok_emb(idx), pos, tables))
        rotary = self.pos.rotary(pos, tables)
        for i, block in enumerate(self.blocks):
            x = block(x, rotary, step, i)
        return self.lm_head(self.norm_f(x))

    def loss(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross-entropy of logits(idx) against targets (B, T)."""
        logits = self(idx)
        return F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.reshape(-1))
