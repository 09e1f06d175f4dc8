"""The batcher's direct entry for a decoding row (`Batcher._decode_entry`, taken when the row's one input is
the token in flight) plans exactly what the general `_entry` plans: the same batches, step for step, through
rows gaining pages, finishing mid-batch, preempted for pages, retracted by a pause, penalties, prompt
logprobs and prompt chunks mixed with decodes, with one step in flight as the scheduler runs them."""

from __future__ import annotations

import numpy as np
from test_batcher import read_back

from hotswap.cache.page_allocator import PageAllocator
from hotswap.cache.radix_cache import RadixPrefixCache
from hotswap.protocol import GenerateRequest
from hotswap.sampling_params import SamplingParams
from hotswap.scheduler import batcher as batcher_module
from hotswap.scheduler.batcher import Batcher, ScheduledBatch
from hotswap.scheduler.overlap import DECODE, NOTHING, OTHER, mark_sample_rows
from hotswap.scheduler.sequence import Sequence

KINDS = [
    {"temperature": 0.0, "ignore_eos": True},
    {"temperature": 1.0, "top_p": 0.9, "return_logprob": True, "logprob_start_len": 0},  # prompt logprobs: scored chunks
    {"temperature": 1.0, "frequency_penalty": 0.5, "repetition_penalty": 1.2, "min_new_tokens": 6, "stop_token_ids": [9]},
    {"temperature": 0.7, "presence_penalty": 0.3, "ignore_eos": True},
]


def make(rid: int, prompt_len: int, max_new: int) -> Sequence:
    sp = SamplingParams(max_new_tokens=max_new, **KINDS[rid % len(KINDS)])
    prompt = [(rid * 13 + j) % 40 + 3 for j in range(prompt_len)]
    return Sequence(req=GenerateRequest(rid=f"r{rid}", input_ids=prompt, sampling_params=sp, seed=rid, sink=lambda out: None))


def snapshot(batch: ScheduledBatch) -> list[tuple]:
    def arr(a):
        return None if a is None else list(np.asarray(a))

    return [(s.rid, list(e.input_ids), e.start_pos, list(e.pages), e.sample, e.step, e.prev_row, e.row, e.params is s.req.sampling_params,
             arr(e.prompt_ids), arr(e.output_ids), e.banned_ids, e.prompt_from, e.prompt_targets) for s, e in zip(batch.seqs, batch.entries)]


def run_scenario(keep_decode: bool = False) -> list[list[tuple]]:
    """`keep_decode` off: every decode row planned by `_decode_entry` (tests/test_kept_decode.py compares the two)."""
    alloc = PageAllocator(num_pages=24, page_size=4)  # tight: rows preempt each other for pages
    batcher = Batcher(allocator=alloc, prefix_cache=RadixPrefixCache(alloc), max_running_requests=10, max_num_batched_tokens=48,
                      max_context_len=60, chunked_prefill_size=16, fail=lambda seq, message: batcher.finish(seq), eos_token_ids=frozenset([2]),
                      keep_decode=keep_decode)
    arrivals = {0: [(0, 9, 30), (1, 20, 12), (2, 5, 25), (3, 7, 8)], 6: [(4, 30, 10), (5, 6, 40)], 15: [(6, 12, 50), (7, 3, 5)]}
    steps, inflight = [], None
    for step in range(160):
        for rid, prompt_len, max_new in arrivals.get(step, []):
            batcher.add(make(rid, prompt_len, max_new))
        if step == 24:  # pause_generation(retract): the step in flight is read back first, as a control request sees none
            if inflight is not None:
                read_back(inflight, batcher, lambda s: (step * 7 + len(s.output_ids) + int(s.rid[1:])) % 30 + 3)
                inflight = None
            batcher.retract_all()
        batch = batcher.schedule()
        if batch is not None:
            mark_sample_rows(batch.seqs, batch.entries)
            steps.append(snapshot(batch))
        if inflight is not None:
            read_back(inflight, batcher, lambda s: (step * 7 + len(s.output_ids) + int(s.rid[1:])) % 30 + 3)
        inflight = batch
        if not batcher.has_work and inflight is None and step > 15:
            break
    assert not batcher.has_work and batcher.num_preemptions > 0
    return steps


def test_decode_rows_are_planned_as_the_general_path_plans_them(monkeypatch):
    decoding = []
    real = batcher_module.running_step

    def counted(seq: Sequence, max_context_len: int) -> int:
        decoding.append(real(seq, max_context_len) == DECODE)
        return real(seq, max_context_len)

    monkeypatch.setattr(batcher_module, "running_step", counted)
    fast = run_scenario()
    assert sum(decoding) > 100  # the direct path planned most rows
    monkeypatch.setattr(batcher_module, "running_step", lambda seq, limit: OTHER if real(seq, limit) == DECODE else real(seq, limit))
    general = run_scenario()
    assert len(fast) == len(general)
    for i, (a, b) in enumerate(zip(fast, general)):
        assert a == b, f"step {i} differs"


def test_running_step_is_the_two_overlap_rules():
    """`running_step` against the rules as written before it fused them: the token in flight is the last one
    (length limits), else the one input is the token in flight; every combination of a small state space."""
    for pending in (0, 1):
        for out_len in range(4):
            for max_new in range(1, 5):
                for max_ctx in range(4, 9):
                    for computed in range(3, 8):
                        seq = make(0, 3, max_new)
                        seq.output_ids, seq.pending, seq.num_computed = list(range(out_len)), pending, computed
                        last = bool(pending) and (out_len + pending >= max_new or 3 + out_len + pending >= max_ctx)
                        decoding = pending == 1 and computed == 3 + out_len
                        want = NOTHING if last else DECODE if decoding else OTHER
                        assert batcher_module.running_step(seq, max_ctx) == want, (pending, out_len, max_new, max_ctx, computed)
