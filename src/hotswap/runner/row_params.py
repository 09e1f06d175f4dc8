"""Sampling parameters per batch row, kept on the host between steps.

A request's parameters do not change while it runs, yet a decode step at batch 256 used to rebuild
every row from its SamplingParams (six Python passes and a nested-list conversion per step). Here a
request's row is made once (`SamplerRow`, cached on its sequence by the batcher) and a persistent
table rewrites only the rows whose request changed: a new request in the slot, or the rows after one
that finished, shifted up. The output step, which changes every step, is written for all rows in one
vectorised pass. The decode CUDA graphs copy the table's first rows into their staged inputs (the one
upload a step already makes) and the eager sampler uploads them once.
"""

from __future__ import annotations

from operator import attrgetter
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from hotswap.errors import BatchRowError

if TYPE_CHECKING:
    from hotswap.runner.batch_entry import BatchEntry
    from hotswap.sampling_params import SamplingParams


class SamplerRow(NamedTuple):
    """One request's row, as submitted (converted when a table writes it, so a value the door missed fails
    that request alone): temperature (0 = greedy), top_p, min_p, top_k (<= 0 = off), seed, what it asks
    back (logprobs, top-logprobs count, its kept ids), and whether penalties or biases change its logits
    (SamplingParams.has_penalties, read for every row of every step)."""

    temperature: float
    top_p: float
    min_p: float
    top_k: int
    seed: int
    return_logprob: bool
    top_logprobs_num: int
    return_top_p_token_ids: bool
    penalized: bool

    @classmethod
    def of(cls, params: SamplingParams, seed: int) -> SamplerRow:
        return cls(0.0 if params.greedy else params.temperature, params.top_p, params.min_p, params.top_k, seed,
                   params.return_logprob, params.top_logprobs_num, params.return_top_p_token_ids, params.has_penalties)


class RowSummary(NamedTuple):
    """What the sampler needs to know about a batch's rows as a whole (runner.sampling_batch)."""

    all_greedy: bool
    needs_logprobs: bool
    max_top_logprobs: int
    needs_filter: bool  # some row has top-p, top-k or min-p
    keep_greedy_rows: list[int]  # rows asking for their keep-set (return_top_p_token_ids): greedy ones
    keep_filtered_rows: list[int]  # and sampled ones with a filter


_ROW, _STEP = attrgetter("row"), attrgetter("step")  # a step reads these of every entry: `map` passes in C

# the device copies of the table hold a multiple of this many rows, so every float32 / int64 column starts 16-byte
# aligned whatever the batch size: Triton specialises the sampling kernels on their pointers' alignment
ROW_ALIGN = 4


def aligned_rows(n: int) -> int:
    return -(-n // ROW_ALIGN) * ROW_ALIGN


class RowParamTable:
    """float32 [3, rows] (temperature, 0 = greedy; top_p; min_p), int64 [3, rows] (top_k, vocab = off; the
    seed's low 64 bits, which is all the noise reads; output step) and int64 [4, rows] (greedy,
    return_logprob, top_logprobs_num, return_top_p_token_ids). Row r holds `rows[r]`'s values; `update` rewrites a row
    only when the entry in that position brings another SamplerRow (compared by value, identity first)."""

    def __init__(self, vocab: int, capacity: int = 64):
        self.vocab = vocab
        self.floats = np.zeros((3, capacity), dtype=np.float32)
        self.ints = np.zeros((3, capacity), dtype=np.int64)
        self.flags = np.zeros((4, capacity), dtype=np.int64)
        self.rows: list[SamplerRow | None] = [None] * capacity
        self._summary: tuple[int, RowSummary] | None = None  # (rows, their summary) until a row is rewritten

    def update(self, entries: list[BatchEntry]) -> int:
        """Make the first len(entries) rows those of `entries`; how many rows were rewritten (steps aside).
        A row whose values do not convert raises BatchRowError naming its entry; the table stays valid
        (that row is marked unfilled, rows before it are kept)."""
        n = len(entries)
        if n > len(self.rows):
            self._grow(n)
        new = list(map(_ROW, entries))
        written = 0
        if new != self.rows[:n]:
            rows = self.rows
            for r, row in enumerate(new):
                if row is not rows[r] and row != rows[r]:
                    self._write(r, row, entries[r])
                    written += 1
        self.ints[2, :n] = np.fromiter(map(_STEP, entries), dtype=np.int64, count=n)
        return written

    def summary(self, n: int) -> RowSummary:
        """The first n rows' summary: computed again only after a row was rewritten (or for another n); a
        steady decode batch keeps its rows, and a dozen numpy calls a step add up on the host."""
        if self._summary is None or self._summary[0] != n:
            floats, ints, flags = self.floats[:, :n], self.ints[:, :n], self.flags[:, :n]
            needs_logprobs, max_top, any_keep = flags[1:].max(axis=1).tolist()
            greedy, keep = flags[0] != 0, flags[3] != 0
            filters = (floats[1] < 1.0) | (ints[0] < self.vocab) | (floats[2] > 0)
            self._summary = n, RowSummary(
                all_greedy=bool(greedy.all()), needs_logprobs=bool(needs_logprobs), max_top_logprobs=max_top,
                needs_filter=bool(filters.any()),
                keep_greedy_rows=np.flatnonzero(keep & greedy).tolist() if any_keep else [],
                keep_filtered_rows=np.flatnonzero(keep & ~greedy & filters).tolist() if any_keep else [])
        return self._summary[1]

    def _write(self, r: int, row: SamplerRow, entry: BatchEntry) -> None:
        self.rows[r] = None  # unfilled until every column converted
        self._summary = None
        try:
            self.floats[:, r] = (row.temperature, row.top_p, row.min_p)
            self.ints[0, r] = row.top_k if row.top_k > 0 else self.vocab
            self.ints[1, r] = (row.seed + 2**63) % 2**64 - 2**63  # the low 64 bits as int64: no seed overflows
            self.flags[:, r] = (row.temperature == 0.0, row.return_logprob, row.top_logprobs_num, row.return_top_p_token_ids)
        except (OverflowError, TypeError, ValueError) as exc:
            raise BatchRowError(entry, f"this request's sampling parameters cannot run: {exc}") from exc
        self.rows[r] = row

    def _grow(self, n: int) -> None:
        cap = max(n, 2 * len(self.rows))
        for name in ("floats", "ints", "flags"):
            old = getattr(self, name)
            grown = np.zeros((old.shape[0], cap), dtype=old.dtype)
            grown[:, : old.shape[1]] = old
            setattr(self, name, grown)
        self.rows += [None] * (cap - len(self.rows))
