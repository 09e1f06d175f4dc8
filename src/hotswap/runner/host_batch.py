"""One batch's metadata built on the host with numpy, shared by the eager and CUDA-graph paths."""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import chain
from operator import attrgetter

import numpy as np

from hotswap.runner.batch_entry import BatchEntry
from hotswap.runner.page_table import PageTable

# the entries' fields a build reads, as `map` passes in C
_INPUT_IDS, _START_POS, _PAGES, _SAMPLE = (attrgetter(name) for name in ("input_ids", "start_pos", "pages", "sample"))
_PROMPT_TARGETS = attrgetter("prompt_targets")


@dataclass(slots=True)
class HostBatch:
    input_ids: np.ndarray  # int64 [T]
    positions: np.ndarray  # int64 [T]
    slot_mapping: np.ndarray  # int64 [T]
    cu_seqlens_q: np.ndarray  # int32 [B+1]
    seq_lens: np.ndarray  # int32 [B]
    page_table: np.ndarray  # int32 [B, width]
    logits_indices: np.ndarray  # int64 [number of sampled entries]
    max_q_len: int
    is_decode: bool
    prompt_rows: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))  # token rows scored for prompt logprobs

    def longest_first(self) -> np.ndarray:
        """int32 [B]: the rows by KV length, longest first. The decode attention kernel starts its programs
        in this order, so a step's last wave holds short sequences, not the long ones of a rollout's tail."""
        return np.argsort(-self.seq_lens, kind="stable").astype(np.int32)

    @classmethod
    def build(cls, entries: list[BatchEntry], page_size: int, page_table: PageTable | None = None) -> HostBatch:
        """`page_table`: the runner's, kept between steps (only rows whose pages changed are rewritten); none:
        a table made for this batch alone. A decode batch (one input a row, the every-step case) takes
        `_build_decode`; the entries' fields are read with `map` over attribute getters (a pass in C, not a
        Python generator step per row)."""
        n = len(entries)
        id_lists = list(map(_INPUT_IDS, entries))
        q_list = list(map(len, id_lists))
        starts = np.fromiter(map(_START_POS, entries), dtype=np.int64, count=n)
        table = (PageTable(rows=n) if page_table is None else page_table).rows(list(map(_PAGES, entries)))
        if q_list.count(1) == n:  # one C pass, where min and max were two
            return cls._build_decode(entries, id_lists, starts, table, page_size)
        q_lens = np.array(q_list, dtype=np.int64)
        cu = np.zeros(n + 1, dtype=np.int32)
        np.cumsum(q_lens, out=cu[1:])
        ids = np.fromiter(chain.from_iterable(id_lists), dtype=np.int64, count=int(cu[-1]))
        rows = np.repeat(np.arange(n), q_lens)
        positions = np.arange(int(cu[-1]), dtype=np.int64) - np.repeat(cu[:-1].astype(np.int64) - starts, q_lens)
        slots = table[rows, positions // page_size].astype(np.int64) * page_size + positions % page_size
        sampled = np.fromiter(map(_SAMPLE, entries), dtype=bool, count=n)
        return cls(ids, positions, slots, cu, (starts + q_lens).astype(np.int32), table,
                   (cu[1:][sampled] - 1).astype(np.int64), int(q_lens.max()), False, _scored_rows(entries, cu))

    @classmethod
    def _build_decode(cls, entries: list[BatchEntry], id_lists: list[list[int]], starts: np.ndarray, table: np.ndarray,
                      page_size: int) -> HostBatch:
        """`build` of a batch whose every row has one input: row i is token i, so the cumulated query lengths
        are 0..n, the positions are the starts and the logits rows are the sampling rows' own indices: the same
        arrays, with about half the numpy calls a step."""
        n = len(entries)
        cu = np.arange(n + 1, dtype=np.int32)
        ids = np.fromiter(chain.from_iterable(id_lists), dtype=np.int64, count=n)
        page_of, offset = np.divmod(starts, page_size)
        slots = table[np.arange(n), page_of].astype(np.int64) * page_size + offset
        logits_indices = np.flatnonzero(np.fromiter(map(_SAMPLE, entries), dtype=bool, count=n)).astype(np.int64, copy=False)
        return cls(ids, starts, slots, cu, (starts + 1).astype(np.int32), table, logits_indices, 1, True, _scored_rows(entries, cu))


def _scored_rows(entries: list[BatchEntry], cu: np.ndarray) -> np.ndarray:
    """int64: the token rows whose logits score prompt tokens (prompt logprobs), in entry order; a batch
    without any is told by one pass in C."""
    if not any(map(_PROMPT_TARGETS, entries)):
        return np.zeros(0, dtype=np.int64)
    return np.concatenate([np.arange(len(e.prompt_targets), dtype=np.int64) + int(cu[i]) + e.prompt_from
                           for i, e in enumerate(entries) if e.prompt_targets])


def prefill_tiles(cu_seqlens_q: np.ndarray, seq_lens: np.ndarray, tile_tokens: int, width: int) -> np.ndarray:
    """The prefill kernel's work list, int32 [2, width]: (sequence, token block) per program, the blocks
    that attend the most KV first, padded with sequence -1."""
    q_lens = np.diff(cu_seqlens_q).astype(np.int64)
    blocks = -(-q_lens // tile_tokens)
    n = int(blocks.sum())
    if n > width:
        raise ValueError(f"{n} prefill tiles do not fit a work list of {width}")
    seq = np.repeat(np.arange(len(q_lens)), blocks)
    blk = np.arange(n) - np.repeat(np.cumsum(blocks) - blocks, blocks)
    work = (seq_lens.astype(np.int64) - q_lens)[seq] + np.minimum((blk + 1) * tile_tokens, q_lens[seq])
    order = np.argsort(-work, kind="stable")
    out = np.full((2, width), -1, dtype=np.int32)
    out[0, :n] = seq[order]
    out[1, :n] = blk[order]
    return out
