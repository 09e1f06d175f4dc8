"""Compact step messages for tensor-parallel workers: each side keeps a replica of the last batch sent.

A decode step mostly advances every running sequence by one token: positions move to the last step's
sequence lengths, page tables stay (a sequence crossing a page boundary adds one cell), and the inputs
are the last step's sampled ids, still on the device. So rank 0 sends an ADVANCE: which row of the last
batch each row continues (nothing when the rows are the same, in the same order), plus corrections where
the batch differs from what that predicts. Both sides predict with the same function (`predict`), so the
worker's rebuilt batch equals rank 0's by construction; the prediction only decides how small the message
is. Any other step (prefill, chunked or mixed) travels whole and becomes the new replica.

Message args (HEADER_ARGS words) of an ADVANCE: rows, table width, flags (FLAG_SAME_ROWS, the StepMode
shifted left by one), then the number of corrections
of input ids, of positions and of page-table cells, the number of sampled rows (-1: every row, in order)
and of pending-input rows (-1: as predicted). The payload: the source rows (unless FLAG_SAME_ROWS), each
correction list as indices then values, the sampled rows, the pending-input pairs.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

import numpy as np

from hotswap.runner.host_batch import HostBatch

FLAG_SAME_ROWS = 1  # row i continues row i of the last batch, for every row of both; the step's mode above it


class StepMode(IntEnum):
    """How every rank runs the step (rank 0 decides; the collectives inside must pair)."""

    EAGER = 0
    DECODE_GRAPH = 1  # the decode bucket's graph; the sampled ids reach the workers inside it
    EXTEND_GRAPH = 2  # the token bucket's extend graph, then the LM head eagerly

_PAD_PAGE = 0  # HostBatch.build's default padding, which rank 0 sends


@dataclass(slots=True)
class Prediction:
    input_ids: np.ndarray
    positions: np.ndarray
    page_table: np.ndarray
    fix: np.ndarray | None


def sampled_rank(hb: HostBatch) -> np.ndarray:
    """For each row of `hb`: its row among the step's sampled ids, or -1 when it did not sample."""
    rank = np.full(len(hb.seq_lens), -1, dtype=np.int64)
    last = hb.cu_seqlens_q[1:].astype(np.int64) - 1
    rank[np.searchsorted(last, hb.logits_indices)] = np.arange(len(hb.logits_indices))
    return rank


def predict(prev: HostBatch, src: np.ndarray, width: int) -> Prediction:
    """The decode batch that continues rows `src` of `prev` (-1: a row with nothing to continue)."""
    n = len(src)
    cont = src >= 0
    s = src[cont]
    positions = np.zeros(n, dtype=np.int64)
    positions[cont] = prev.seq_lens[s]
    table = np.full((n, width), _PAD_PAGE, dtype=np.int32)
    keep = min(width, prev.page_table.shape[1])
    table[cont, :keep] = prev.page_table[s, :keep]
    rank = np.full(n, -1, dtype=np.int64)
    rank[cont] = sampled_rank(prev)[s]
    rows = np.flatnonzero(rank >= 0)
    fix = np.stack([rows, rank[rows]]).astype(np.int64) if len(rows) else None
    return Prediction(np.zeros(n, dtype=np.int64), positions, table, fix)


def decode_batch(positions: np.ndarray, table: np.ndarray, input_ids: np.ndarray, logits: np.ndarray, page_size: int) -> HostBatch:
    """A decode batch from what an ADVANCE fixes; the rest follows (one token per row)."""
    n = len(positions)
    slots = table[np.arange(n), positions // page_size].astype(np.int64) * page_size + positions % page_size
    return HostBatch(input_ids, positions, slots, np.arange(n + 1, dtype=np.int32), (positions + 1).astype(np.int32), table,
                     logits, 1, True)


def match_rows(prev: HostBatch, hb: HostBatch) -> np.ndarray:
    """The last batch's row each row of `hb` most likely continues (same first page, starting where that row
    ended), -1 where none does. Only the message's size depends on it."""
    n = len(hb.positions)
    first, prev_first = hb.page_table[:, 0], prev.page_table[:, 0]
    if len(prev_first) == n and (first == prev_first).all() and (hb.positions == prev.seq_lens).all():
        return np.arange(n, dtype=np.int64)
    where: dict[tuple[int, int], list[int]] = {}
    for r in range(len(prev_first) - 1, -1, -1):
        where.setdefault((int(prev_first[r]), int(prev.seq_lens[r])), []).append(r)
    src = np.full(n, -1, dtype=np.int64)
    for i in range(n):
        rows = where.get((int(first[i]), int(hb.positions[i])))
        if rows:
            src[i] = rows.pop()
    return src


def _corrections(actual: np.ndarray, predicted: np.ndarray) -> np.ndarray:
    idx = np.flatnonzero(actual.reshape(-1) != predicted.reshape(-1))
    return np.concatenate([idx, actual.reshape(-1)[idx]]).astype(np.int64)


def _same_fix(a: np.ndarray | None, b: np.ndarray | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return a.shape == b.shape and bool((a == b).all())


@dataclass(kw_only=True, slots=True)
class StepReplica:
    """The last batch both sides know. Rank 0 encodes each batch against it; a worker decodes; both then
    hold the new batch."""

    last: HostBatch | None = None

    def encode_advance(self, hb: HostBatch, fix: np.ndarray | None, mode: StepMode) -> tuple[list[int], np.ndarray] | None:
        """(args, payload) of an ADVANCE for this batch, or None when it must travel whole (not a decode
        step, a step scoring prompt rows, nothing to continue, or an ADVANCE would not be smaller). Does not change the replica."""
        prev = self.last
        if prev is None or not hb.is_decode or len(hb.prompt_rows):
            return None
        n, width = hb.page_table.shape
        src = match_rows(prev, hb)
        same_rows = len(prev.seq_lens) == n and bool((src == np.arange(n)).all())
        p = predict(prev, src, width)
        ids, pos, table = _corrections(hb.input_ids, p.input_ids), _corrections(hb.positions, p.positions), _corrections(hb.page_table, p.page_table)
        all_sample = len(hb.logits_indices) == n and bool((hb.logits_indices == np.arange(n)).all())
        fix_predicted = _same_fix(fix, p.fix)
        k = -1 if fix_predicted else (0 if fix is None else fix.shape[1])
        parts = [] if same_rows else [src]
        parts += [ids, pos, table]
        if not all_sample:
            parts.append(hb.logits_indices)
        if k > 0:
            parts.append(fix.reshape(-1))
        payload = np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, dtype=np.int64)
        if len(payload) >= _whole_len(hb, fix):
            return None
        flags = (FLAG_SAME_ROWS if same_rows else 0) | int(mode) << 1
        args = [n, width, flags, len(ids) // 2, len(pos) // 2, len(table) // 2, -1 if all_sample else len(hb.logits_indices), k]
        return args, payload

    def decode_advance(self, args: np.ndarray, payload: np.ndarray, page_size: int) -> tuple[HostBatch, np.ndarray | None]:
        """The batch an ADVANCE describes, rebuilt from the replica (which it then replaces)."""
        if self.last is None:
            raise ValueError("an ADVANCE step arrived before any whole step: the replicas are out of step")
        n, width, flags, n_ids, n_pos, n_table, n_logits, k = (int(x) for x in args[:8])
        at = 0

        def take(count: int) -> np.ndarray:
            nonlocal at
            at += count
            return payload[at - count : at]

        src = np.arange(n, dtype=np.int64) if flags & FLAG_SAME_ROWS else take(n)
        p = predict(self.last, src, width)
        for target, count in ((p.input_ids, n_ids), (p.positions, n_pos), (p.page_table, n_table)):
            idx, values = take(count), take(count)
            target.reshape(-1)[idx] = values
        logits = np.arange(n, dtype=np.int64) if n_logits < 0 else take(n_logits).copy()
        fix = p.fix if k < 0 else (take(2 * k).reshape(2, k).copy() if k else None)
        if at != len(payload):
            raise ValueError(f"an ADVANCE step of {len(payload)} words held {at}: the replicas are out of step")
        hb = decode_batch(p.positions, p.page_table, p.input_ids, logits, page_size)
        self.last = hb
        return hb, fix


def _whole_len(hb: HostBatch, fix: np.ndarray | None) -> int:
    """Words of the same batch sent whole (tp_protocol.send_step)."""
    t, n = len(hb.input_ids), len(hb.seq_lens)
    return 3 * t + 2 * n + 1 + hb.page_table.size + len(hb.logits_indices) + len(hb.prompt_rows) + (0 if fix is None else fix.size)
