"""One batch's metadata built on the host with numpy, shared by the eager and CUDA-graph paths."""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import chain

import numpy as np

from hotswap.runner.batch_entry import BatchEntry
from hotswap.runner.page_table import PageTable


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
        a table made for this batch alone."""
        n = len(entries)
        q_lens = np.fromiter((len(e.input_ids) for e in entries), dtype=np.int64, count=n)
        starts = np.fromiter((e.start_pos for e in entries), dtype=np.int64, count=n)
        table = (PageTable(rows=n) if page_table is None else page_table).rows([e.pages for e in entries])
        cu = np.zeros(n + 1, dtype=np.int32)
        np.cumsum(q_lens, out=cu[1:])
        is_decode = bool((q_lens == 1).all())
        if is_decode:
            ids = np.fromiter((e.input_ids[0] for e in entries), dtype=np.int64, count=n)
            positions = starts
            rows = np.arange(n)
        else:
            ids = np.fromiter(chain.from_iterable(e.input_ids for e in entries), dtype=np.int64, count=int(cu[-1]))
            rows = np.repeat(np.arange(n), q_lens)
            positions = np.arange(int(cu[-1]), dtype=np.int64) - np.repeat(cu[:-1].astype(np.int64) - starts, q_lens)
        slots = table[rows, positions // page_size].astype(np.int64) * page_size + positions % page_size
        sampled = np.fromiter((e.sample for e in entries), dtype=bool, count=n)
        scored = [np.arange(len(e.prompt_targets), dtype=np.int64) + int(cu[i]) + e.prompt_from
                  for i, e in enumerate(entries) if e.prompt_targets]
        return cls(ids, positions, slots, cu, (starts + q_lens).astype(np.int32), table,
                   (cu[1:][sampled] - 1).astype(np.int64), int(q_lens.max()), is_decode,
                   np.concatenate(scored) if scored else np.zeros(0, dtype=np.int64))


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
