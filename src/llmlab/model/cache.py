"""Inference caches and the one seam between a cache and attention.

Each attention kind declares what it keeps per token (`cache_spec`: named tensors, e.g. MHA's k and
v of (n_kv_head, head_dim), MLA's one latent row). A cache stores them for every layer in *blocks*
of tokens; a per-forward `CacheStep` is all an attention layer ever sees of it:

    positions (B, T)   each new token's position (rotary / embeddings)
    write(layer, ...)  stores the new tokens' tensors: one write path, through (block, offset) indices
    prefill            the forward starts every row at its beginning: attend over its own tokens
    own_mask()         (B, 1, T, T) for that: causal, left padding hidden
    read(layer, name)  otherwise: every stored token of each row, (B, ..., S, ...) over a span S
    mask()             (B, 1, T, S) for that
    table, lengths     a paged cache's block table and per-row lengths (None / unused for dense)
    fused              one-token steps as fused reductions (the compiled decode step)

Two caches implement it (the same layout, the same write):
  * DenseCache: one block per row (the block *is* the row: max_len tokens), read as a view, no
    gather. Rows are left-padded to a common prompt length: row b's token at slot s has position
    s - pad[b]. Its metadata is computed on the device from the slot, so a compiled decode step
    is one graph whose cache length stays dynamic (gpt-fast style static buffers).
  * PagedCache (llmlab.model.paged_cache): a pool of fixed-size blocks shared by every sequence,
    a block table and a length per row; sequences come and go between steps.

Caches are plain objects holding tensors, not nn.Modules: per-generation state, never part of a
checkpoint, and torch.compile treats plain tensor attributes as inputs (nn.Module buffers' shapes
would be forced static).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass(frozen=True)
class CachedTensor:
    """One tensor an attention kind caches per token: its per-token `shape`, and where the token
    axis sits among those dims when stored (`seq_dim`): k of (H, d) with seq_dim 1 is stored as
    (blocks, H, tokens, d), so a dense read is the (B, H, S, d) layout attention wants, no copy."""
    shape: tuple[int, ...]
    seq_dim: int = 0

    def layout(self, tokens: int) -> tuple[int, ...]:
        return (*self.shape[: self.seq_dim], tokens, *self.shape[self.seq_dim:])

    def values(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


def values_per_token(spec: dict[str, CachedTensor]) -> int:
    """Values a cache keeps per token and layer for an attention kind's spec."""
    return sum(t.values() for t in spec.values())


def allocate(spec: dict[str, CachedTensor], n_layer: int, blocks: int, tokens: int, dtype, device):
    """Per layer, {name: (blocks, *layout with `tokens` per block)} zeros."""
    return [{name: torch.zeros(blocks, *t.layout(tokens), dtype=dtype, device=device) for name, t in spec.items()}
            for _ in range(n_layer)]


class CacheStep:
    """One forward's view of a cache (see the module docstring)."""

    def __init__(self, cache, positions, write_block, write_offset, index, start, pad, prefill: bool,
                 table: Optional[torch.Tensor] = None, lengths: Optional[torch.Tensor] = None, fused: bool = False):
        self.cache, self.positions = cache, positions
        self.write_block, self.write_offset = write_block, write_offset  # (B*T,) where each new token goes
        self.index, self.start = index, start  # (B, T) each new token's place in its row's span; (B,) first real
        self.pad = pad  # (B,) left padding of this forward's tokens (the own mask hides it)
        self.prefill, self.table, self.lengths, self.fused = prefill, table, lengths, fused
        self._mask = None

    @property
    def tables(self):
        """The position tables the cache was sized for (rotary cos/sin, sinusoids), as its inputs."""
        return self.cache.tables

    def write(self, layer: int, **new: torch.Tensor) -> None:
        """Store each new token's tensors, given token-major: name=(B, T, *per-token shape)."""
        for name, x in new.items():
            spec = self.cache.spec[name]
            pool = self.cache.pools[layer][name].movedim(1 + spec.seq_dim, 1)  # (blocks, tokens, *shape)
            pool[self.write_block, self.write_offset] = x.reshape(-1, *spec.shape).to(pool.dtype)

    def read(self, layer: int, name: str) -> torch.Tensor:
        """Every stored token of each row: (B, *layout over the span S)."""
        pool = self.cache.pools[layer][name]
        b = self.positions.shape[0]
        if self.table is None:
            return pool[:b]  # dense: block b is row b
        spec = self.cache.spec[name]
        # (B, blocks, *layout of one block); index_select of the flat table: one gather kernel,
        # several times faster on a CPU than advanced indexing with the 2-D table
        g = pool.index_select(0, self.table.reshape(-1).long()).view(*self.table.shape, *pool.shape[1:])
        axis = 1 + spec.seq_dim  # the token axis of one block, once the blocks axis sits before it
        return g.movedim(1, axis).flatten(axis, axis + 1)

    def mask(self, dtype: torch.dtype) -> torch.Tensor:
        """(B, 1, T, S) additive: 0 where a new token may see a stored one (its own and earlier ones
        of its row), -inf elsewhere. Built once per forward, in the compute dtype."""
        if self._mask is None:
            s = self.cache.span_indices(self.table)[None, None, :]  # (1, 1, S)
            q = self.index[:, :, None]  # (B, T, 1)
            allowed = ((s <= q) & (s >= self.start[:, None, None])) | (s == q)
            self._mask = _additive(allowed, dtype)
        return self._mask

    def own_mask(self, dtype: torch.dtype) -> torch.Tensor:
        """(B, 1, T, T) for a prefill over its own tokens: causal, left padding hidden (a padded
        query sees only itself, so no softmax row is empty)."""
        t = self.positions.shape[1]
        u = torch.arange(t, device=self.positions.device)
        allowed = ((u[None, None, :] <= u[None, :, None]) & (u[None, None, :] >= self.pad[:, None, None])) \
            | (u[None, None, :] == u[None, :, None])
        return _additive(allowed, dtype)


def _additive(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    blocked = torch.full((), float("-inf"), dtype=dtype, device=allowed.device)
    return torch.where(allowed, 0.0, blocked).to(dtype).unsqueeze(1)


class DenseCache:
    """Every layer's cached tensors for `batch` rows of up to `max_len` tokens, one block a row
    (see the module docstring). `tables`: the model's position tables cut to max_len."""

    kind = "dense"

    def __init__(self, spec: dict[str, CachedTensor], n_layer: int, batch: int, max_len: int, dtype, device,
                 tables: tuple = ()):
        self.spec, self.batch, self.max_len, self.tables = spec, batch, max_len, tables
        self.pools = allocate(spec, n_layer, batch, max_len, dtype, device)
        self.pad = torch.zeros(batch, dtype=torch.long, device=device)
        self.slots = torch.arange(max_len, device=device)

    def set_padding(self, pad: Optional[torch.Tensor]) -> None:
        self.pad.zero_()
        if pad is not None:
            self.pad[: pad.shape[0]] = pad.to(self.pad.device)

    def span_indices(self, table=None) -> torch.Tensor:
        """0..S-1 over the span a read returns (a tensor, so the compiled step keeps S dynamic)."""
        return self.slots

    def prepare(self, start: int, t: int, batch: int) -> None:
        """Host work before a forward (none: the dense metadata is computed on the device)."""

    def begin(self, slots: torch.Tensor, batch: int, prefill: bool, fused: bool = False) -> CacheStep:
        """The step of `batch` rows whose tokens go to `slots` (T,) (the same slots in every row)."""
        t = slots.shape[0]
        pad = self.pad[:batch]
        positions = (slots[None, :] - pad[:, None]).clamp_min(0)  # (B, T)
        rows = torch.arange(batch, device=slots.device)
        return CacheStep(self, positions, rows.repeat_interleave(t), slots.repeat(batch),
                         slots[None, :].expand(batch, t), pad, pad, prefill, fused=fused)

    def bytes_per_token(self) -> int:
        """Bytes held per token of one sequence, measured from the allocated buffers."""
        total = sum(p.numel() * p.element_size() for layer in self.pools for p in layer.values())
        return total // (self.batch * self.max_len)

    def length_axes(self) -> list[tuple[torch.Tensor, int]]:
        """Every tensor with a max_len axis, and that axis (the compiled step keeps it dynamic)."""
        axes = [(self.slots, 0)] + [(t, 0) for t in self.tables]
        for layer in self.pools:
            axes += [(p, 1 + self.spec[name].seq_dim) for name, p in layer.items()]
        return axes
