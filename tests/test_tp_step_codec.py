"""A tensor-parallel worker rebuilds every batch rank 0 runs from the compact step messages: whole steps
for prefill and mixed batches, small ADVANCE deltas for decode steps, through joins, finishes, chunked
prefill, page allocations, preemption, shared prefix pages and steps without the overlap. No processes:
the protocol's encoder feeds its decoder directly."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import numpy as np
import pytest

from hotswap.runner.batch_entry import BatchEntry
from hotswap.runner.host_batch import HostBatch
from hotswap.runner.row_params import SamplerRow
from hotswap.runner.tp_protocol import HEADER_ARGS, Op, decode_step, encode_step
from hotswap.runner.tp_step_codec import StepMode, StepReplica
from hotswap.sampling_params import SamplingParams

PAGE = 4
PARAMS = SamplingParams()


@dataclass
class Seq:
    prompt: int  # tokens to prefill
    pages: list[int]
    computed: int = 0
    sampled_row: int = -1  # its row among the last step's sampled ids, -1 when it did not sample there
    extra_page: bool = False  # the allocator hands this one a page ahead of need


@dataclass
class Scheduler:
    """Forms batches like the real batcher: running sequences keep their order, joins go last, prefill in
    chunks, every decode input comes from the step before (overlap) unless `overlap` is off."""

    rng: random.Random
    free: list[int] = field(default_factory=lambda: list(range(1, 400)))
    running: list[Seq] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.rng.shuffle(self.free)

    def join(self, prompt: int, share_with: Seq | None = None) -> None:
        seq = Seq(prompt=prompt, pages=[])
        if share_with is not None and share_with.computed >= PAGE:  # a prefix-cache hit: its first page, computed
            seq.pages, seq.computed = [share_with.pages[0]], PAGE
        seq.extra_page = self.rng.random() < 0.3
        self.running.append(seq)

    def finish(self, seq: Seq) -> None:
        self.running.remove(seq)
        self.free += [p for p in seq.pages if all(p not in s.pages for s in self.running)]

    def step(self, chunk: int, overlap: bool) -> tuple[list[BatchEntry], np.ndarray | None]:
        entries, stepped, budget = [], [], chunk
        for seq in self.running:
            left = seq.prompt - seq.computed
            n = 1 if left <= 0 else min(left, budget)
            if n <= 0:
                seq.sampled_row = -1
                continue
            budget -= n if left > 0 else 0
            end = seq.computed + n
            need = -(-end // PAGE) + (1 if seq.extra_page else 0)
            while len(seq.pages) < need:
                seq.pages.append(self.free.pop())
            sample = end >= seq.prompt
            from_device = left <= 0 and overlap and seq.sampled_row >= 0
            ids = [0] if from_device else [self.rng.randrange(1000) for _ in range(n)]
            entries.append(BatchEntry(input_ids=ids, start_pos=seq.computed, pages=list(seq.pages), sample=sample, params=PARAMS,
                                      row=SamplerRow.of(PARAMS, 0), step=0, prev_row=seq.sampled_row if from_device else -1))
            stepped.append(seq)
            seq.computed = end
        row = 0
        for seq, e in zip(stepped, entries):
            seq.sampled_row = row if e.sample else -1
            row += e.sample
        hb = HostBatch.build(entries, PAGE)
        pairs = [(int(hb.cu_seqlens_q[i]), e.prev_row) for i, e in enumerate(entries) if e.prev_row >= 0]
        return entries, hb, (np.array(pairs, dtype=np.int64).T.copy() if pairs else None)


def _assert_same(a: HostBatch, b: HostBatch) -> None:
    for name in ("input_ids", "positions", "slot_mapping", "cu_seqlens_q", "seq_lens", "page_table", "logits_indices", "prompt_rows"):
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype and x.shape == y.shape and (x == y).all(), name
    assert (a.max_q_len, a.is_decode) == (b.max_q_len, b.is_decode)


class Link:
    """Rank 0's replica and a worker's, joined by the protocol's encoder and decoder."""

    def __init__(self) -> None:
        self.sender, self.worker = StepReplica(), StepReplica()
        self.ops: list[Op] = []
        self.words: list[int] = []

    def send(self, hb: HostBatch, fix: np.ndarray | None, mode: StepMode = StepMode.EAGER) -> None:
        op, args, payload = encode_step(self.sender, hb, fix, mode)
        header = np.zeros(HEADER_ARGS, dtype=np.int64)
        header[: len(args)] = args
        got, got_fix, got_mode = decode_step(self.worker, op, header, payload.copy(), PAGE)
        _assert_same(got, hb)
        assert (got_fix is None) == (fix is None)
        if fix is not None:
            assert got_fix.dtype == np.int64 and (got_fix == fix).all()
        assert got_mode is mode
        self.ops.append(op)
        self.words.append(len(payload))


def test_steady_decode_travels_as_a_few_words():
    sched, link = Scheduler(random.Random(0)), Link()
    for prompt in (5, 9, 3):
        sched.join(prompt)
    for _ in range(3):  # prefill (chunks of 8), then decode
        link.send(*sched.step(8, overlap=True)[1:])
    for _ in range(6):
        link.send(*sched.step(8, overlap=True)[1:], StepMode.DECODE_GRAPH)
    assert link.ops[:2] == [Op.STEP, Op.STEP] and set(link.ops[3:]) == {Op.ADVANCE}
    # same rows, inputs from the device, every row samples: only the page cells a row crossed into
    assert max(link.words[3:]) <= 2 * 3 * 2


def test_joins_finishes_chunks_and_preemption():
    sched, link = Scheduler(random.Random(1)), Link()
    sched.join(6)
    sched.join(13)
    for _ in range(4):
        link.send(*sched.step(8, overlap=True)[1:])
    sched.finish(sched.running[0])  # finished
    link.send(*sched.step(8, overlap=True)[1:])
    sched.join(10, share_with=sched.running[0])  # joins on a shared prefix page; its prefill is chunked
    for _ in range(3):
        link.send(*sched.step(4, overlap=True)[1:])
    victim = sched.running[0]
    sched.finish(victim)  # preempted: its pages go back, it comes back later from scratch
    link.send(*sched.step(8, overlap=True)[1:])
    sched.join(victim.computed + 1)
    for _ in range(4):
        link.send(*sched.step(8, overlap=False)[1:])  # inputs known on the host: real ids in the message
    assert Op.ADVANCE in link.ops and Op.STEP in link.ops


def test_a_step_scoring_prompt_rows_travels_whole():
    """Prompt rows (prompt logprobs) are not predicted by an ADVANCE: such a step is sent whole, rows and all,
    and the next decode step is an ADVANCE against it."""
    sched, link = Scheduler(random.Random(3)), Link()
    sched.join(5)
    sched.join(2)
    for _ in range(3):
        link.send(*sched.step(8, overlap=True)[1:])
    _, hb, fix = sched.step(8, overlap=True)
    assert hb.is_decode
    hb.prompt_rows = np.array([1], dtype=np.int64)  # a one-token chunk whose row is scored
    link.send(hb, fix)
    link.send(*sched.step(8, overlap=True)[1:])
    assert link.ops[-2:] == [Op.STEP, Op.ADVANCE]


@pytest.mark.parametrize("seed", range(6))
def test_random_schedules_rebuild_exactly(seed):
    rng = random.Random(seed)
    sched, link = Scheduler(rng), Link()
    for _ in range(120):
        r = rng.random()
        if r < 0.15 and len(sched.running) < 12:
            share = rng.choice(sched.running) if sched.running and rng.random() < 0.3 else None
            sched.join(rng.randrange(1, 30), share_with=share)
        elif r < 0.25 and sched.running:
            sched.finish(rng.choice(sched.running))  # finished or preempted
        if not sched.running:
            sched.join(rng.randrange(1, 30))
        _, hb, fix = sched.step(rng.choice((4, 8, 16)), overlap=rng.random() < 0.8)
        link.send(hb, fix, rng.choice(list(StepMode)) if hb.is_decode else rng.choice((StepMode.EAGER, StepMode.EXTEND_GRAPH)))
    assert link.ops.count(Op.ADVANCE) > 20


def test_an_advance_without_a_whole_step_first_is_refused():
    sched = Scheduler(random.Random(2))
    sched.join(3)
    sender = StepReplica()
    encode_step(sender, *sched.step(8, overlap=True)[1:], StepMode.EAGER)
    op, args, payload = encode_step(sender, *sched.step(8, overlap=True)[1:], StepMode.EAGER)
    assert op is Op.ADVANCE
    header = np.zeros(HEADER_ARGS, dtype=np.int64)
    header[: len(args)] = args
    with pytest.raises(ValueError, match="out of step"):
        decode_step(StepReplica(), op, header, payload, PAGE)
