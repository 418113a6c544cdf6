"""The model side of the server: a paged cache, one row per running sequence, and one step that
prefills the newcomers and then decodes every running sequence once.

Everything here runs in the engine process (llmlab.serve.core), driven by its scheduler
(llmlab.serve.scheduler); nothing here knows about HTTP, text or time.

Why every decode forward has the same shape. A row's logits must not depend on which other
requests share its batch: a seeded request gets the same tokens alone or in any batch, and a
greedy one the same text. A CPU GEMM is not batch-invariant (MKL picks other kernels, with
another summation order, for a matrix of 1, 2-15 or 16+ rows, so a row's last bits change with the
batch size), but at one fixed shape a row's result does not depend on its position or on the other
rows. So the decode forward always covers all `max_batch` rows of the cache, a sequence always
sits at its own row, and rows without a sequence ride along with no new token (their one padded
token is written to the cache's trash block; their logits are ignored). Prefill runs each newcomer
alone (batch 1, its own length): the same forward whether or not others wait. The fixed shape is
also the one graph the compiled step needs. The price: with few requests the step computes rows
nobody reads (measured in benchmarks/serve_load.py); `batch_invariant=False` (`llmlab serve
--no-batch-invariant`) decodes only the running rows instead, faster at low load, with tokens
that may differ from the same request alone once a near-tie meets a last-bit difference.
Attention reads only the blocks the batch's longest row needs; masked positions past a row's end
change nothing in it (the read's width differs with the batch; the tests check the tokens).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Optional, Sequence as Seq

import torch

from llmlab.compiled import DecodeStep
from llmlab.generation import sampling_probs
from llmlab.model.paged_cache import blocks_for


@dataclass(frozen=True)
class Sampling:
    """Per-request sampling (llmlab.generation.sampling_probs's rules): temperature 0 is greedy."""
    temperature: float = 1.0
    top_k: Optional[int] = None
    top_p: Optional[float] = None
    seed: Optional[int] = None


@dataclass(eq=False)
class Sequence:
    """One request inside the engine: its prompt ids, the tokens generated so far and its own
    random generator (a seed gives the same draws whatever else runs)."""
    prompt: list[int]
    max_tokens: int
    sampling: Sampling = field(default_factory=Sampling)
    stop_ids: frozenset = frozenset()
    row: Optional[int] = None
    tokens: list[int] = field(default_factory=list)
    done: bool = False  # no more tokens: max_tokens, a stop id, or the scheduler said so (stop string, cancel)
    generator: Optional[torch.Generator] = None

    @property
    def finish_reason(self) -> str:
        return "stop" if self.tokens and self.tokens[-1] in self.stop_ids else "length"


class Engine:
    """Owns the model and its paged cache of `max_batch` rows of up to `max_len` tokens
    (`num_blocks` blocks in the pool; default every row at full length)."""

    def __init__(self, model, max_batch: int, max_len: int, num_blocks: Optional[int] = None,
                 compile: Optional[bool] = None, batch_invariant: bool = True):
        self.model, self.max_batch, self.max_len = model, max_batch, max_len
        self.batch_invariant = batch_invariant  # decode all rows (see the module docstring)
        self.device = model.tok_emb.weight.device
        self.cache = model.new_cache(max_batch, max_len, kind="paged", num_blocks=num_blocks)
        self.block_size = self.cache.block_size
        self.total_blocks = self.cache.num_free_blocks
        compile = model.runtime.compile if compile is None else compile
        self.decoder = DecodeStep(model, self.cache, compile)
        self.free_rows = list(range(max_batch - 1, -1, -1))  # popped from the end: row 0 first

    def warm_up(self) -> None:
        """Prefill and decode throw-away sequences so the compiled step compiles here, before any
        request waits for it: one step of one sequence, and, decoding only the running rows (the
        batch size changes), one of two, which gives the graph every larger batch reuses."""
        for n in (1,) if self.batch_invariant or self.max_batch < 2 else (1, 2):
            seqs = [Sequence([0], 2, Sampling(0)) for _ in range(n)]
            for seq in seqs:
                self.attach(seq)
            try:
                self.step(seqs, [])
            finally:
                for seq in seqs:
                    self.release(seq)

    def blocks_for(self, tokens: int) -> int:
        return blocks_for(tokens, self.block_size)

    # ---- rows (called between steps) -------------------------------------------------------
    def attach(self, seq: Sequence) -> None:
        """Give `seq` a free row and its generator (the scheduler checked there is a row)."""
        seq.row = self.free_rows.pop()
        seed = seq.sampling.seed
        seq.generator = torch.Generator(device=self.device)
        seq.generator.manual_seed(seed if seed is not None else int.from_bytes(os.urandom(8), "little") >> 1)

    def release(self, seq: Sequence) -> None:
        """Return a finished or cancelled sequence's row and blocks."""
        if seq.row is not None:
            self.cache.release(seq.row)
            self.free_rows.append(seq.row)
            seq.row = None

    # ---- one step ----------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, newcomers: Seq[Sequence], running: Seq[Sequence]) -> None:
        """Prefill each newcomer and sample its first token, then decode every sequence of
        `running` + `newcomers` that is not done by one token."""
        self.prefill(newcomers)
        self.decode([s for s in (*running, *newcomers) if not s.done])

    @torch.no_grad()
    def prefill(self, newcomers: Seq[Sequence]) -> None:
        """Each newcomer's prompt (alone: batch 1, its own length) and its first token."""
        for seq in newcomers:
            ids = torch.tensor([seq.prompt], dtype=torch.long, device=self.device)
            logits = self.model(ids, step=self.cache.step([seq.row], [len(seq.prompt)]))[:, -1]
            self._sample([seq], logits)

    @torch.no_grad()
    def decode(self, decoding: Seq[Sequence]) -> None:
        """One token for each of `decoding` (none done). Appends to each one's `tokens` and sets
        `done` on a stop id or at max_tokens."""
        if not decoding:
            return
        if not self.batch_invariant:  # just the running rows
            self.cache.prepare_rows([s.row for s in decoding], [1] * len(decoding), 1)
            tok = torch.tensor([s.tokens[-1] for s in decoding], dtype=torch.long)
            self._sample(decoding, self.decoder.prepared(tok.to(self.device), same_shapes=False))
            return
        tok = torch.zeros(self.max_batch, dtype=torch.long)
        # rows without a sequence take no token (a newcomer done at its first token rewrites its last
        # slot with the padding's: harmless, it is released next)
        counts = [0] * self.max_batch
        for s in decoding:
            tok[s.row], counts[s.row] = s.tokens[-1], 1
        self.cache.prepare_rows(range(self.max_batch), counts, 1)
        logits = self.decoder.prepared(tok.to(self.device))
        self._sample(decoding, logits[[s.row for s in decoding]])

    def _sample(self, seqs: Seq[Sequence], logits: torch.Tensor) -> None:
        """Next token of each sequence from its logits row, by its own rules and generator: one
        argmax for the greedy rows, one filtering pass for the sampled ones (sampling_probs works
        row by row), then each sampled row's draw from its own generator."""
        picked = [0] * len(seqs)
        greedy = [i for i, s in enumerate(seqs) if s.sampling.temperature == 0]
        if greedy:
            for i, t in zip(greedy, logits[greedy].argmax(-1).tolist()):
                picked[i] = t
        drawn = [i for i, s in enumerate(seqs) if s.sampling.temperature != 0]
        if drawn:
            sp = [seqs[i].sampling for i in drawn]
            vocab = logits.shape[-1]
            probs = sampling_probs(
                logits[drawn], torch.tensor([s.temperature for s in sp], dtype=torch.float64),
                torch.tensor([s.top_k or vocab for s in sp]) if any(s.top_k for s in sp) else None,
                torch.tensor([1.0 if s.top_p is None else s.top_p for s in sp]) if any(s.top_p for s in sp) else None)
            for j, i in enumerate(drawn):
                picked[i] = int(torch.multinomial(probs[j:j + 1], 1, generator=seqs[i].generator))
        for s, tok in zip(seqs, picked):
            s.tokens.append(tok)
            s.done = tok in s.stop_ids or len(s.tokens) >= s.max_tokens
