"""What rank 0 and its tensor-parallel workers say to each other on the control group (gloo, host memory).

A command is one int64 message of MESSAGE_LEN words: the op, the payload's length in words, up to
HEADER_ARGS op-specific integers, then as much of the payload as fits; a longer payload's rest follows in
a second broadcast. The payload is a batch's host metadata (STEP: a decode batch of a hundred sequences
fits in the message, so a step costs one broadcast; ADVANCE: a decode step as a delta against the replica
of the last batch that both sides keep, `runner/tp_step_codec.py`) or UTF-8 JSON (every other op). Outcomes travel back
as JSON through `exchange`. Nothing is pickled. Rank 0 waits at most `timeout_s` for any of these (a hung
worker must not hang the engine); workers wait for commands without a limit (an idle engine is normal).
"""

from __future__ import annotations

import json
from enum import IntEnum

import numpy as np
import torch
import torch.distributed as dist

from hotswap.runner.host_batch import HostBatch
from hotswap.runner.tp_step_codec import StepMode, StepReplica
from hotswap.wire.process_group import wait_work

MESSAGE_LEN = 2048
HEADER_ARGS = 9  # a STEP's: tokens, rows, table width, sampled rows, pending-input rows, max q len, is_decode, StepMode, prompt rows
_INLINE = MESSAGE_LEN - 2 - HEADER_ARGS


class Op(IntEnum):
    STEP = 1  # a batch to forward; the sampled ids follow on the device group when it samples (inside a decode graph)
    SHUTDOWN = 2
    AGREE = 3  # report the outcome of the ops since the last AGREE (exchange), then forget it
    COMMIT = 4  # the update session committed: drop the saved originals
    ROLLBACK = 5  # the update session failed somewhere: restore the saved originals
    APPLY_DISK = 6  # {"model_path"}: load this rank's slices of a checkpoint
    RELAY = 7  # {"names", "dtypes", "shapes"}: a flattened bucket follows from rank 0 on the device group: load it
    RECEIVE = 8  # {"group", "names", "dtypes", "shapes", "load_format"}: receive a trainer's broadcast bucket
    APPLY_RECEIVED = 9  # load the bucket RECEIVE took
    INIT_GROUP = 10  # join a trainer's weights update group (in a thread; outcome through the store)
    DESTROY_GROUP = 11  # {"group"}
    GATHER = 12  # {"names"}: send this rank's slice of each (not replicated) tensor to rank 0, in order
    RESET = 13  # zero every parameter (check_weights reset_tensors)
    RELEASE = 14  # {"tags", "keep_weights_on_host"}
    RESUME = 15  # {"tags"}
    ADVANCE = 16  # a decode step as a delta against the last step (tp_step_codec); then as STEP


def _broadcast(t: torch.Tensor, group, timeout_s: float | None) -> None:
    wait_work(dist.broadcast(t, src=0, group=group, async_op=True), timeout_s)


def _send(group, op: Op, args: list[int], payload: np.ndarray, timeout_s: float) -> None:
    msg = np.zeros(MESSAGE_LEN, dtype=np.int64)
    inline = min(len(payload), _INLINE)
    msg[0], msg[1] = op, len(payload)
    msg[2 : 2 + len(args)] = args
    msg[2 + HEADER_ARGS : 2 + HEADER_ARGS + inline] = payload[:inline]
    _broadcast(torch.from_numpy(msg), group, timeout_s)
    if len(payload) > inline:
        _broadcast(torch.from_numpy(np.ascontiguousarray(payload[inline:])), group, timeout_s)


def send_command(group, op: Op, args: dict | None, timeout_s: float) -> None:
    """Rank 0: a JSON command to every worker."""
    data = json.dumps(args or {}).encode()
    words = np.frombuffer(data + b"\0" * (-len(data) % 8), dtype=np.int64)
    _send(group, op, [len(data)], words, timeout_s)


def encode_step(replica: StepReplica, hb: HostBatch, fix: np.ndarray | None, mode: StepMode) -> tuple[Op, list[int], np.ndarray]:
    """Rank 0: the message of one batch's host metadata (and pending-input rows): an ADVANCE against
    `replica` when that is smaller, else STEP (whole). `replica` then holds `hb`. `mode`: how every
    rank runs it."""
    advance = replica.encode_advance(hb, fix, mode)
    replica.last = hb
    if advance is not None:
        return Op.ADVANCE, *advance
    n, width = hb.page_table.shape
    k = 0 if fix is None else fix.shape[1]
    parts = [hb.input_ids, hb.positions, hb.slot_mapping, hb.cu_seqlens_q, hb.seq_lens, hb.page_table.reshape(-1), hb.logits_indices,
             hb.prompt_rows]
    if fix is not None:
        parts.append(fix.reshape(-1))
    args = [len(hb.input_ids), n, width, len(hb.logits_indices), k, hb.max_q_len, int(hb.is_decode), int(mode), len(hb.prompt_rows)]
    return Op.STEP, args, np.concatenate(parts).astype(np.int64, copy=False)


def send_step(group, replica: StepReplica, hb: HostBatch, fix: np.ndarray | None, mode: StepMode, timeout_s: float) -> None:
    """Rank 0: one batch to every worker (`encode_step`)."""
    _send(group, *encode_step(replica, hb, fix, mode), timeout_s)


def recv_command(group) -> tuple[Op, np.ndarray, np.ndarray]:
    """A worker: the next command's op, header args and payload (int64 words)."""
    msg = torch.zeros(MESSAGE_LEN, dtype=torch.int64)
    _broadcast(msg, group, None)
    m = msg.numpy()
    n = int(m[1])
    payload = torch.empty(n, dtype=torch.int64)
    inline = min(n, _INLINE)
    payload[:inline] = msg[2 + HEADER_ARGS : 2 + HEADER_ARGS + inline]
    if n > inline:
        _broadcast(payload[inline:], group, None)
    return Op(int(m[0])), m[2 : 2 + HEADER_ARGS], payload.numpy()


def decode_step(replica: StepReplica, op: Op, args: np.ndarray, payload: np.ndarray, page_size: int) -> tuple[HostBatch, np.ndarray | None, StepMode]:
    """A worker: the batch of a STEP or ADVANCE (which becomes the replica), its pending-input rows, and
    how every rank runs it."""
    if op is Op.ADVANCE:
        hb, fix = replica.decode_advance(args, payload, page_size)
        return hb, fix, StepMode(int(args[2]) >> 1)
    t, n, w, n_logits, k, max_q_len, is_decode, mode, n_prompt = (int(x) for x in args[:9])
    cuts = np.cumsum([t, t, t, n + 1, n, n * w, n_logits, n_prompt])
    ids, positions, slots, cu, lens, table, logits, prompt_rows, fix = np.split(payload, cuts)
    hb = HostBatch(input_ids=ids, positions=positions, slot_mapping=slots, cu_seqlens_q=cu.astype(np.int32), seq_lens=lens.astype(np.int32),
                   page_table=table.astype(np.int32).reshape(n, w), logits_indices=logits, max_q_len=max_q_len, is_decode=bool(is_decode),
                   prompt_rows=prompt_rows)
    replica.last = hb
    return hb, fix.reshape(2, k) if k else None, StepMode(mode)


def decode_json(args: np.ndarray, payload: np.ndarray) -> dict:
    return json.loads(payload.tobytes()[: int(args[0])].decode())


def exchange(group, size: int, outcome: dict, timeout_s: float | None) -> list[dict]:
    """Every rank's JSON outcome, in rank order (all-gather of sizes, then of padded bytes)."""
    data = json.dumps(outcome).encode()
    n = torch.tensor([len(data)], dtype=torch.int64)
    sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(size)]
    wait_work(dist.all_gather(sizes, n, group=group, async_op=True), timeout_s)
    width = int(max(s.item() for s in sizes))
    mine = torch.zeros(width, dtype=torch.uint8)
    mine[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    parts = [torch.zeros(width, dtype=torch.uint8) for _ in range(size)]
    wait_work(dist.all_gather(parts, mine, group=group, async_op=True), timeout_s)
    return [json.loads(p[: int(s.item())].numpy().tobytes().decode()) for p, s in zip(parts, sizes)]
