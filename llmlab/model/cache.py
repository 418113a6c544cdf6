"""Inference caches. Each attention kind builds its own per-layer cache (`attn.new_cache`), holding
only what that kind needs; `InferenceCache` bundles the layers with the per-row bookkeeping
(left padding) shared by all kinds.

Buffers are allocated once for (batch, max_len) and written in place at `input_pos` (slots), so a
decode step has static shapes (gpt-fast style) and never allocates a growing tensor.

Caches are plain objects holding tensors, not nn.Modules: they are per-generation state, never part
of a checkpoint, and torch.compile treats plain tensor attributes as ordinary inputs, so a compiled
decode step can keep the cache length dynamic (it forces nn.Module buffers' shapes static).
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch


class KVCache:
    """Keys and values of one multi-head (or GQA/MQA) layer: (B, n_kv_head, max_len, head_dim) each.
    Only n_kv_head heads are stored; query heads that share them are never expanded here."""

    def __init__(self, batch: int, n_kv_head: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str | None):
        shape = (batch, n_kv_head, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """Write k, v (B, H, T, hd) at slots input_pos (T,); return the whole buffers (B, H, S, hd)."""
        b = k.shape[0]
        self.k[:b, :, input_pos] = k
        self.v[:b, :, input_pos] = v
        return self.k[:b], self.v[:b]

    def length_axes(self) -> list[tuple[torch.Tensor, int]]:
        """Every tensor of this cache with its length axis (the compiled step keeps that axis dynamic)."""
        return [(self.k, 2), (self.v, 2)]


class LatentCache:
    """One multi-head latent attention layer (DeepSeek-V2 MLA): per token only the normed latent
    c_kv (d_c) and the rotated rope key k_pe (d_r, shared by all heads), stored side by side as
    [c_kv | k_pe] in one (B, max_len, d_c + d_r) buffer (the layout FlashMLA's paged cache uses).
    (d_c + d_r) values per token and layer, whatever the number of heads; keys and values are never
    expanded here."""

    def __init__(self, batch: int, max_len: int, latent_dim: int, rope_dim: int,
                 dtype: torch.dtype, device: torch.device | str | None):
        self.kv = torch.zeros(batch, max_len, latent_dim + rope_dim, dtype=dtype, device=device)

    def update(self, input_pos: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        """Write kv (B, T, d_c + d_r) at slots input_pos (T,); return the whole buffer (B, S, d_c + d_r)."""
        b = kv.shape[0]
        self.kv[:b, input_pos] = kv
        return self.kv[:b]

    def length_axes(self) -> list[tuple[torch.Tensor, int]]:
        return [(self.kv, 1)]


class CacheView(NamedTuple):
    """What one forward over a cache hands each attention layer. The interface every cache's view
    offers (this contiguous one and llmlab.model.paged_cache.PagedView):

    * `update(layer, *new)`: store the new tokens' tensors of one layer; return, per row, every
      stored one (B, ..., S, ...), which the layer attends over with
    * `mask`: (B, 1, T, S) additive, 0 where a query may see a stored token, -inf elsewhere;
    * `paged`: None here; a paged cache (block table + lengths) for kernels that read it directly;
    * `fused_decode`: compute one-token steps as fused reductions (set for the compiled step)."""
    layers: list
    input_pos: torch.Tensor  # (T,) slots
    mask: torch.Tensor
    fused_decode: bool
    paged = None

    def update(self, layer: int, *new: torch.Tensor):
        return self.layers[layer].update(self.input_pos, *new)


class InferenceCache:
    """All layers' caches for one generation, plus each row's left padding.

    Rows are left-padded to a common prompt length: row b's real tokens start at slot pad[b]. A
    token at slot s has position s - pad[b], and attends to slots j with pad[b] <= j <= s
    (a padded slot attends only to itself, so no softmax row is empty)."""

    def __init__(self, layers: list, batch: int, max_len: int, device: torch.device | str | None):
        self.layers = list(layers)  # one cache per attention layer, of that layer's kind
        self.batch, self.max_len = batch, max_len
        self.pad = torch.zeros(batch, dtype=torch.long, device=device)
        self.slots = torch.arange(max_len, device=device)
        self.fused_decode = False  # how a one-token step is computed, not what it computes

    def begin(self, input_pos: torch.Tensor, batch: int, dtype: torch.dtype) -> tuple[torch.Tensor, CacheView]:
        """One forward's bookkeeping: the (B, T) positions of its tokens and the view its layers use."""
        mask = self.mask(input_pos, batch, dtype)
        return self.positions(input_pos, batch), CacheView(self.layers, input_pos, mask, self.fused_decode)

    def set_padding(self, pad: Optional[torch.Tensor]) -> None:
        self.pad.zero_()
        if pad is not None:
            self.pad[: pad.shape[0]] = pad.to(self.pad.device)

    def positions(self, input_pos: torch.Tensor, batch: int) -> torch.Tensor:
        """(B, T) position ids of the tokens written at slots input_pos."""
        return (input_pos[None, :] - self.pad[:batch, None]).clamp_min(0)

    def mask(self, input_pos: torch.Tensor, batch: int, dtype: torch.dtype) -> torch.Tensor:
        """(B, 1, T, S) additive mask: 0 where query slot input_pos[t] may attend to slot s, else
        -inf. Built once per forward in the compute dtype, so no layer converts a boolean mask."""
        q = input_pos[:, None]  # (T, 1)
        s = self.slots[None, :]  # (1, S)
        real = s[None] >= self.pad[:batch, None, None]  # (B, 1, S)
        allowed = ((s <= q)[None] & real) | (s == q)[None]
        blocked = torch.full((), float("-inf"), dtype=dtype, device=allowed.device)
        return torch.where(allowed, 0.0, blocked).to(dtype).unsqueeze(1)

    def length_axes(self) -> list[tuple[torch.Tensor, int]]:
        return [(self.slots, 0)] + [axis for layer in self.layers for axis in layer.length_axes()]

    def bytes_per_token(self) -> int:
        """Bytes the cache holds per token of one sequence, measured from the allocated buffers."""
        total = sum(t.numel() * t.element_size() for layer in self.layers for t, _ in layer.length_axes())
        return total // (self.batch * self.max_len)
