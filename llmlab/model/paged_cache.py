"""A paged cache of MLA latents: one pool of fixed-size blocks shared by every sequence.

Each cached token is one row of `width` = d_c + d_r channels ([c_kv | k_pe]), the whole of what
MLA keeps per token and layer. Rows live in blocks of `block_size` (64) tokens drawn from a pool
of `num_blocks`; a sequence's blocks need not be contiguous or in order: its row of the block table
lists them, in order. Lengths grow block by block (`reserve`) and a finished sequence's blocks go
back to the free list (`release`), so sequences of very different lengths share the memory without
padding every row to the longest. `block_table` and `seqlens` are int32 tensors on the pool's
device, ready for `llmlab.kernels.flash_mla_decode`.

Bookkeeping (free list, each row's blocks and length) is mirrored in Python, so allocating never
waits on the device. Block-table entries past a row's blocks are 0 (a valid block), and the kernel
reads only a row's first ceil(len / block_size) entries and only its first len tokens, so stale
rows in a reused block are never attended.
"""
from __future__ import annotations

from typing import Sequence

import torch

from llmlab.errors import LlmlabError


class PagedLatentCache:
    """Per-layer pools (n_layer, num_blocks, block_size, width) + per-row block tables/lengths."""

    def __init__(self, n_layer: int, num_blocks: int, width: int, max_batch: int, max_blocks_per_seq: int,
                 block_size: int = 64, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None):
        if block_size < 1 or block_size & (block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {block_size}")
        self.block_size = block_size
        self.pool = torch.zeros(n_layer, num_blocks, block_size, width, dtype=dtype, device=device)
        self.block_table = torch.zeros(max_batch, max_blocks_per_seq, dtype=torch.int32, device=device)
        self.seqlens = torch.zeros(max_batch, dtype=torch.int32, device=device)
        # Popped from the end: block 0 is handed out first, and a freed block is the next one reused.
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))
        self._blocks: list[list[int]] = [[] for _ in range(max_batch)]
        self._lens: list[int] = [0] * max_batch

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    def blocks(self, row: int) -> list[int]:
        """The pool blocks of `row`, in sequence order."""
        return list(self._blocks[row])

    def lengths(self) -> list[int]:
        return list(self._lens)

    def layer(self, i: int) -> torch.Tensor:
        """Layer i's pool (num_blocks, block_size, width): the kernel's kv_cache."""
        return self.pool[i]

    def reserve(self, lengths: Sequence[int] | torch.Tensor, rows: Sequence[int] | None = None) -> None:
        """Set the length (tokens, including new ones) of `rows` (default 0..len(lengths)-1),
        allocating blocks so each row can hold its length. All or nothing: if the pool cannot
        supply every block needed, raises LlmlabError and changes nothing. A shorter length (e.g.
        rejected speculative tokens) keeps the row's blocks for when it grows again."""
        lengths = [int(n) for n in (lengths.tolist() if isinstance(lengths, torch.Tensor) else lengths)]
        rows = list(range(len(lengths))) if rows is None else [int(r) for r in rows]
        if len(rows) != len(lengths) or len(set(rows)) != len(rows):
            raise ValueError(f"need one length per distinct row, got rows {rows} and lengths {lengths}")
        max_blocks = self.block_table.shape[1]
        need = {}
        for r, n in zip(rows, lengths):
            if not 0 <= r < len(self._lens):
                raise ValueError(f"row {r} out of range (max_batch {len(self._lens)})")
            blocks = -(-n // self.block_size)
            if n < 0 or blocks > max_blocks:
                raise LlmlabError(f"row {r}: length {n} does not fit {max_blocks} blocks of "
                                  f"{self.block_size} tokens (max {max_blocks * self.block_size})")
            need[r] = max(0, blocks - len(self._blocks[r]))
        total = sum(need.values())
        if total > len(self._free):
            raise LlmlabError(f"paged cache exhausted: need {total} more blocks of {self.block_size} tokens, "
                              f"{len(self._free)} free of {self.pool.shape[1]}; release finished sequences "
                              f"or build the cache with more blocks")
        for r, n in zip(rows, lengths):
            if need[r]:
                new = [self._free.pop() for _ in range(need[r])]
                start = len(self._blocks[r])
                self._blocks[r].extend(new)
                self.block_table[r, start:start + len(new)] = torch.tensor(new, dtype=torch.int32)
            self._lens[r] = n
        self.seqlens[rows] = torch.tensor(lengths, dtype=torch.int32).to(self.seqlens.device)

    def release(self, row: int) -> None:
        """Return a finished sequence's blocks to the free list; its length becomes 0."""
        self._free.extend(reversed(self._blocks[row]))
        self._blocks[row] = []
        self._lens[row] = 0
        self.block_table[row] = 0
        self.seqlens[row] = 0

    def write(self, layer: int, latent: torch.Tensor, positions: torch.Tensor | None = None,
              rows: Sequence[int] | torch.Tensor | None = None) -> None:
        """Write latent rows (N, T, width) of one layer for `rows` (default 0..N-1) at `positions`
        (N, T), default the last T positions of each row (its newest tokens). Positions must lie
        inside each row's reserved length."""
        n, t, _ = latent.shape
        dev = self.block_table.device
        rows_t = (torch.arange(n) if rows is None else torch.as_tensor(rows)).to(dev, torch.long)
        host_lens = torch.tensor(self._lens)[rows_t.cpu()]
        if positions is None:
            positions = host_lens[:, None] - t + torch.arange(t)
        positions = torch.as_tensor(positions).to(torch.long)
        p_host = positions.cpu()
        if (p_host < 0).any() or (p_host >= host_lens[:, None]).any():
            raise ValueError(f"positions {p_host.tolist()} outside rows' lengths {host_lens.tolist()}; reserve first")
        positions = positions.to(dev)
        blocks = self.block_table[rows_t[:, None], positions // self.block_size].long()  # (N, T)
        self.pool[layer, blocks, positions % self.block_size] = latent.to(self.pool.dtype)

    def kernel_args(self, layer: int, batch: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(kv_cache, block_table, cache_seqlens) of rows 0..batch-1 for flash_mla_decode."""
        batch = self.block_table.shape[0] if batch is None else batch
        return self.pool[layer], self.block_table[:batch], self.seqlens[:batch]

    def bytes_per_token(self) -> int:
        """Bytes the pool holds per cached token (all layers), measured from the allocated pool:
        n_layer * width * element size; e.g. DeepSeek-V2's 512 + 64 channels in bf16: 1,152 per layer."""
        return self.pool.numel() * self.pool.element_size() // (self.pool.shape[1] * self.block_size)


class PagedView:
    """One forward's view of a PagedInferenceCache, with the interface of cache.CacheView:
    `update` stores the new latents and returns each row's stored ones gathered into (B, S, W)
    (prefill, decompressed attention), `store` only stores them (the paged decode reads the pool
    itself), `mask` says what each query sees, `paged` is the PagedLatentCache for the kernel."""

    fused_decode = False

    def __init__(self, cache: "PagedInferenceCache", positions: torch.Tensor, lengths: torch.Tensor, span: int):
        self.cache, self.paged = cache, cache.pages
        self.positions = positions  # (B, T) each new token's position in its row; < 0: left padding
        self.lengths, self.span = lengths, span  # (B,) tokens per row after this forward; their max
        self.batch = positions.shape[0]
        self._mask = None

    @property
    def mask(self) -> torch.Tensor:
        """(B, 1, T, S) additive; built only when asked (prefill), never for the kernel's decode step."""
        if self._mask is None:
            seen = torch.arange(self.span, device=self.positions.device)[None, None, :]  # (1, 1, S)
            allowed = (seen <= self.positions.clamp_min(0)[:, :, None]) & (seen < self.lengths[:, None, None])
            blocked = torch.full((), float("-inf"), dtype=self.cache.dtype, device=self.positions.device)
            self._mask = torch.where(allowed, 0.0, blocked).to(self.cache.dtype).unsqueeze(1)
        return self._mask

    def store(self, layer: int, kv: torch.Tensor) -> None:
        """Scatter the new tokens' rows (B, T, W) to their blocks; padding is not stored."""
        pages, bs = self.paged, self.paged.block_size
        rows = torch.arange(self.batch, device=kv.device)[:, None].expand_as(self.positions)
        pos, new = self.positions, kv
        if pos.shape[1] > 1:  # a prefill may hold left padding: keep the real tokens only
            real = pos >= 0
            rows, pos, new = rows[real], pos[real], kv[real]
        blocks = pages.block_table[rows, pos // bs].long()
        pages.pool[layer, blocks, pos % bs] = new.to(pages.pool.dtype)

    def update(self, layer: int, kv: torch.Tensor) -> torch.Tensor:
        self.store(layer, kv)
        pages, bs = self.paged, self.paged.block_size
        j = torch.arange(self.span, device=kv.device)
        blocks = pages.block_table[: self.batch, j // bs].long()  # (B, S)
        return pages.pool[layer][blocks, j % bs]  # (B, S, W); rows past a length are masked


class PagedInferenceCache:
    """The model-facing paged latent cache (the flash_mla rung): a PagedLatentCache sized for
    `batch` rows of up to `max_len` tokens, plus the slot bookkeeping generation uses.

    Generation feeds tokens at slots (prompts left-padded to a common length): row b's token at
    slot s has position s - pad[b]. Unlike the contiguous cache, padding is never stored and each
    row's length is its own, so the kernel reads only real tokens. Slots are filled in order; a
    forward starting at an earlier slot (a new prefill) rewinds the rows to it."""

    compilable = False  # the decode step runs the paged kernel, which is already one fused call

    def __init__(self, n_layer: int, batch: int, max_len: int, width: int, dtype: torch.dtype,
                 device: torch.device | str | None, block_size: int = 64):
        per_seq = -(-max_len // block_size)
        self.pages = PagedLatentCache(n_layer, batch * per_seq, width, batch, per_seq, block_size, dtype, device)
        self.batch, self.max_len, self.dtype = batch, max_len, dtype
        self.pad = torch.zeros(batch, dtype=torch.long, device=device)
        self.fused_decode = False

    def set_padding(self, pad: torch.Tensor | None) -> None:
        self.pad.zero_()
        if pad is not None:
            self.pad[: pad.shape[0]] = pad.to(self.pad.device)

    def begin(self, input_pos: torch.Tensor, batch: int, dtype: torch.dtype) -> tuple[torch.Tensor, PagedView]:
        """Reserve blocks for the new tokens at slots input_pos (T,); (positions (B, T), view)."""
        end = int(input_pos[-1]) + 1  # host bookkeeping: the block table is grown on the host
        positions = input_pos[None, :] - self.pad[:batch, None]  # (B, T)
        lengths = (end - self.pad[:batch]).clamp_min(0)
        host = lengths.tolist()
        self.pages.reserve(host, rows=range(batch))
        return positions.clamp_min(0), PagedView(self, positions, lengths, max(host))

    def bytes_per_token(self) -> int:
        return self.pages.bytes_per_token()

    def length_axes(self) -> list:
        return []
