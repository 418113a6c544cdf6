"""A paged cache: one pool of fixed-size blocks shared by every sequence (vLLM's PagedAttention
layout), for every attention kind (MHA/GQA/MQA keys and values, MLA latents alike).

Each row (sequence) owns a list of blocks, in order, drawn from a free list; its row of the block
table lists them and its length says how many tokens it holds. Rows grow block by block (`reserve`,
all or nothing), and a finished row's blocks go back to the free list (`release`) and are reused
without clearing: a read covers only a row's first `length` tokens, so stale values in a reused
block are never attended (masked in the reference read, never loaded by the kernel).

Bookkeeping (free list, blocks, lengths) lives on the host, so allocating never waits on the device.
Before each forward, `prepare` (slots of a left-padded batch, as generation feeds them) or
`prepare_rows` (a batch of chosen rows with their own numbers of new tokens, as a server's
scheduler feeds them) works out where every new token goes and copies that metadata to the device
in one transfer (pinned on CUDA); the step's block table holds only the blocks its longest row
needs, so reads and attention cover the span in use, not max_len; `begin` then builds the CacheStep from those device tensors
alone, so the forward it feeds, a compiled one-token step included, never syncs with the host.
Left padding is never stored: its tokens are written to block 0, which no row owns.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from llmlab.errors import LlmlabError
from llmlab.model.cache import CachedTensor, CacheStep, allocate


def blocks_for(tokens: int, block_size: int) -> int:
    """Blocks of `block_size` that hold `tokens` tokens (the last one partly filled)."""
    return -(-tokens // block_size)


class PagedCache:
    kind = "paged"

    def __init__(self, spec: dict[str, CachedTensor], n_layer: int, max_batch: int, max_len: int, dtype,
                 device, tables: tuple = (), block_size: int = 64, num_blocks: Optional[int] = None,
                 trash_block: bool = True):
        if block_size < 1 or block_size & (block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {block_size}")
        self.spec, self.tables, self.block_size, self.max_len = spec, tables, block_size, max_len
        self.per_seq = blocks_for(max_len, block_size)
        usable = max_batch * self.per_seq if num_blocks is None else num_blocks
        first = 1 if trash_block else 0  # block 0 takes the writes nothing reads (left padding)
        self.pools = allocate(spec, n_layer, usable + first, block_size, dtype, device)
        self.device, self.batch = device, max_batch
        # host mirrors; the device sees each batch's part of them in the step's one copy
        self._table = torch.zeros(max_batch, self.per_seq, dtype=torch.int32)
        self._span = torch.arange(self.per_seq * block_size, device=device)
        # popped from the end: the lowest block is handed out first, a freed block is the next one reused
        self._free: list[int] = list(range(usable + first - 1, first - 1, -1))
        self._blocks: list[list[int]] = [[] for _ in range(max_batch)]
        self._lens: list[int] = [0] * max_batch
        self._pad: list[int] = [0] * max_batch
        self._step: Optional[tuple] = None

    # ---- bookkeeping ---------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    def blocks(self, row: int) -> list[int]:
        """The pool blocks of `row`, in sequence order."""
        return list(self._blocks[row])

    def lengths(self) -> list[int]:
        return list(self._lens)

    def reserve(self, lengths: Sequence[int] | torch.Tensor, rows: Sequence[int] | None = None) -> None:
        """Set the length (tokens, including new ones) of `rows` (default 0..len(lengths)-1),
        allocating blocks so each row can hold its length. All or nothing: if the pool cannot
        supply every block needed, raises LlmlabError and changes nothing. A shorter length keeps
        the row's blocks for when it grows again."""
        lengths = [int(n) for n in (lengths.tolist() if isinstance(lengths, torch.Tensor) else lengths)]
        rows = list(range(len(lengths))) if rows is None else [int(r) for r in rows]
        if len(rows) != len(lengths) or len(set(rows)) != len(rows):
            raise ValueError(f"need one length per distinct row, got rows {rows} and lengths {lengths}")
        need = {}
        for r, n in zip(rows, lengths):
            if not 0 <= r < self.batch:
                raise ValueError(f"row {r} out of range (max_batch {self.batch})")
            blocks = blocks_for(n, self.block_size)
            if n < 0 or blocks > self.per_seq:
                raise LlmlabError(f"row {r}: length {n} does not fit {self.per_seq} blocks of "
                                  f"{self.block_size} tokens (max {self.per_seq * self.block_size})")
            need[r] = max(0, blocks - len(self._blocks[r]))
        total = sum(need.values())
        if total > len(self._free):
            raise LlmlabError(f"paged cache exhausted: need {total} more blocks of {self.block_size} tokens, "
                              f"{len(self._free)} free; release finished sequences or build the cache with more blocks")
        for r, n in zip(rows, lengths):
            if need[r]:
                new = [self._free.pop() for _ in range(need[r])]
                start = len(self._blocks[r])
                self._blocks[r].extend(new)
                self._table[r, start:start + len(new)] = torch.tensor(new, dtype=torch.int32)
            self._lens[r] = n

    def release(self, row: int) -> None:
        """Return a finished sequence's blocks to the free list; its length becomes 0."""
        self._free.extend(reversed(self._blocks[row]))
        self._blocks[row] = []
        self._lens[row] = 0
        self._table[row] = 0

    def set_padding(self, pad: Optional[torch.Tensor]) -> None:
        """Left padding of each row of a slot-fed (generation) batch."""
        self._pad = [0] * self.batch
        if pad is not None:
            self._pad[: pad.shape[0]] = [int(p) for p in pad.tolist()]

    # ---- one forward ---------------------------------------------------------------------------
    def prepare(self, start: int, t: int, batch: int) -> None:
        """Slot-fed rows 0..batch-1 (left-padded generation): their tokens at slots start..start+t-1,
        row b's real ones from slot pad[b]. A forward from slot 0 starts the rows over (blocks kept)."""
        counts = [max(0, start + t - p) - max(0, start - p) for p in self._pad[:batch]]
        if start == 0:
            for r in range(batch):
                self._lens[r] = 0
        self.prepare_rows(range(batch), counts, t)

    def prepare_rows(self, rows: Sequence[int], counts: Sequence[int], t: Optional[int] = None) -> None:
        """The next forward is a batch whose i-th element appends counts[i] tokens to cache row
        rows[i], left-padded to t (default max(counts)). Reserves blocks (all or nothing) and sends
        where every token goes to the device in one copy."""
        rows, counts = [int(r) for r in rows], [int(c) for c in counts]
        t = max(counts) if t is None else t
        before = [self._lens[r] for r in rows]
        self.reserve([b + c for b, c in zip(before, counts)], rows)
        bs, block, offset, pos = self.block_size, [], [], []
        for r, b0, c in zip(rows, before, counts):
            blocks = self._blocks[r]
            for j in range(t):
                p = b0 + j - (t - c)  # this token's position in its row; < 0: left padding
                block.append(blocks[p // bs] if p >= 0 else 0)
                offset.append(p % bs if p >= 0 else 0)
                pos.append(max(p, 0))
        pads = [t - c for c in counts]
        lengths = [self._lens[r] for r in rows]
        width = self.table_width(max(lengths, default=0))
        table = self._table[rows, :width].reshape(-1).tolist()
        host = torch.tensor(block + offset + pos + pads + lengths + table, dtype=torch.long)
        if self.device is not None and torch.device(self.device).type == "cuda":
            host = host.pin_memory()
        dev = host if self.device is None else host.to(self.device, non_blocking=True)  # the step's one copy
        b, n = len(rows), len(rows) * t
        parts = dev.split([n, n, n, b, b, b * width])
        table = parts[5].view(b, width).int()
        torch._dynamo.maybe_mark_dynamic(table, 1)  # a compiled step keeps one graph as rows grow
        self._step = (parts[0], parts[1], parts[2].view(b, t), parts[3], parts[4].int(), table)

    def step(self, rows: Sequence[int], counts: Sequence[int], fused: bool = False) -> CacheStep:
        """prepare_rows + begin, for a caller that schedules rows itself (a server): the batch's i-th
        element appends counts[i] tokens (left-padded to the longest) to cache row rows[i]. A batch of
        rows that are all empty is a prefill (each attends over its own tokens)."""
        prefill = all(self._lens[int(r)] == 0 for r in rows)
        self.prepare_rows(rows, counts)
        return self.begin(None, len(rows), prefill, fused)

    def begin(self, slots: Optional[torch.Tensor], batch: int, prefill: bool, fused: bool = False) -> CacheStep:
        """The step `prepare` / `prepare_rows` set up (device tensors only)."""
        if self._step is None:
            raise RuntimeError("PagedCache.begin() before prepare(): the host has not placed the tokens yet")
        block, offset, positions, pads, lengths, table = self._step
        return CacheStep(self, positions, block, offset, positions, torch.zeros_like(pads), pads, prefill,
                         table, lengths, fused)

    def table_width(self, longest: int) -> int:
        """Blocks a step's table holds: those its longest row needs, so a read gathers (and attention
        scans) the span the batch uses, not every row's max_len. At least two (where rows have two):
        dynamo specialises a size-1 axis, so a compiled step that began at one block would compile
        again at two."""
        return min(self.per_seq, max(2, blocks_for(longest, self.block_size)))

    def span_indices(self, table=None) -> torch.Tensor:
        """0..S-1 over the span a read of `table` returns (its blocks' tokens)."""
        return self._span if table is None else self._span[: table.shape[1] * self.block_size]

    @property
    def block_table(self) -> torch.Tensor:
        """(max_batch, blocks per row) int32 on the pool's device: each row's blocks, in order."""
        return self._table.to(self.device)

    @property
    def seqlens(self) -> torch.Tensor:
        """(max_batch,) int32 on the pool's device: each row's length."""
        return torch.tensor(self._lens, dtype=torch.int32, device=self.device)

    def kernel_args(self, layer: int, batch: Optional[int] = None, name: str = "kv"):
        """(pool, block_table, cache_seqlens) of rows 0..batch-1 for llmlab.kernels.flash_mla_decode."""
        batch = self.batch if batch is None else batch
        return self.pools[layer][name], self.block_table[:batch], self.seqlens[:batch]

    def bytes_per_token(self) -> int:
        """Bytes the pool holds per cached token (all layers), measured from the allocated pool."""
        total = sum(p.numel() * p.element_size() for layer in self.pools for p in layer.values())
        blocks = next(iter(self.pools[0].values())).shape[0]
        return total // (blocks * self.block_size)

    def length_axes(self) -> list:
        return []  # static shapes: blocks of a fixed size, a table of a fixed width


class PagedLatentCache(PagedCache):
    """A paged cache of MLA latents only ([c_kv | k_pe] rows of `width`), addressed directly: the
    layout llmlab.kernels.flash_mla_decode reads (its tests and benchmark build one by hand).
    `pool` is (n_layer, num_blocks, block_size, width); every block is usable (no padding block)."""

    def __init__(self, n_layer: int, num_blocks: int, width: int, max_batch: int, max_blocks_per_seq: int,
                 block_size: int = 64, dtype: torch.dtype = torch.float32, device=None):
        super().__init__({"kv": CachedTensor((width,))}, 0, max_batch, max_blocks_per_seq * block_size, dtype,
                         device, block_size=block_size, num_blocks=num_blocks, trash_block=False)
        self.pool = torch.zeros(n_layer, num_blocks, block_size, width, dtype=dtype, device=device)
        self.pools = [{"kv": self.pool[i]} for i in range(n_layer)]

    def layer(self, i: int) -> torch.Tensor:
        return self.pool[i]

    def write(self, layer: int, latent: torch.Tensor, positions: Optional[torch.Tensor] = None,
              rows: Sequence[int] | torch.Tensor | None = None) -> None:
        """Write latent rows (N, T, width) of one layer for `rows` (default 0..N-1) at `positions`
        (N, T), default each row's last T positions. Positions must lie inside reserved lengths."""
        n, t, _ = latent.shape
        rows = list(range(n)) if rows is None else [int(r) for r in (rows.tolist() if torch.is_tensor(rows) else rows)]
        lens = torch.tensor([self._lens[r] for r in rows])
        positions = (lens[:, None] - t + torch.arange(t)) if positions is None else torch.as_tensor(positions).cpu()
        if (positions < 0).any() or (positions >= lens[:, None]).any():
            raise ValueError(f"positions {positions.tolist()} outside rows' lengths {lens.tolist()}; reserve first")
        blocks = torch.tensor([[self._blocks[r][p // self.block_size] for p in row.tolist()]
                               for r, row in zip(rows, positions)], dtype=torch.long).view(positions.shape)
        dev = self.pool.device
        self.pool[layer, blocks.to(dev), (positions % self.block_size).to(dev)] = latent.to(self.pool.dtype)
