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
        changed = []
        if new != self.rows[:n]:
            rows = self.rows
            changed = [r for r, row in enumerate(new) if row is not rows[r] and row != rows[r]]
        if changed:
            try:
                self._write(changed, [new[r] for r in changed])
            except (OverflowError, TypeError, ValueError):  # some row does not convert: row by row, to fail only that one
                for r in changed:
                    try:
                        self._write([r], [new[r]])
                    except (OverflowError, TypeError, ValueError) as exc:
                        self.rows[r], self._summary = None, None  # unfilled: written again whatever comes in its place
                        raise BatchRowError(entries[r], f"this request's sampling parameters cannot run: {exc}") from exc
        self.ints[2, :n] = np.fromiter(map(_STEP, entries), dtype=np.int64, count=n)
        return len(changed)

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

    def _write(self, rs: list[int], rows: list[SamplerRow]) -> None:
        """Rows `rs` from `rows`, a column at a time (a batch of new requests: 64 rows were 256 numpy writes); every
        column is converted first, so a value that does not convert leaves the table as it was."""
        cols = SamplerRow._make(zip(*rows))  # each field: a tuple of the rows' values
        floats = np.array((cols.temperature, cols.top_p, cols.min_p), dtype=np.float32)
        ints = np.array(([k if k > 0 else self.vocab for k in cols.top_k],
                         [(s + 2**63) % 2**64 - 2**63 for s in cols.seed]), dtype=np.int64)  # the seed's low 64 bits: none overflows
        flags = np.array(([t == 0.0 for t in cols.temperature], cols.return_logprob, cols.top_logprobs_num, cols.return_top_p_token_ids),
                         dtype=np.int64)
        self.floats[:, rs], self.ints[:2, rs], self.flags[:, rs] = floats, ints, flags
        for r, row in zip(rs, rows):
            self.rows[r] = row
        self._summary = None

    def _grow(self, n: int) -> None:
        cap = max(n, 2 * len(self.rows))
        for name in ("floats", "ints", "flags"):
            old = getattr(self, name)
            grown = np.zeros((old.shape[0], cap), dtype=old.dtype)
            grown[:, : old.shape[1]] = old
            setattr(self, name, grown)
        self.rows += [None] * (cap - len(self.rows))
