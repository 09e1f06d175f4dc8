"""The kept decode batch (scheduler/kept_decode.py: the last batch's leading decode entries advanced in place)
plans exactly what building every row again plans, field by field, step for step: through rows finishing
mid-batch, aborted with a token in flight, preempted under a small KV pool, retracted, drained for a control
request, a weight update between steps, new arrivals joining a running batch, penalties and prefix-cache hits;
and an engine serving with it sends the runner the same arrays and returns the same tokens and logprobs."""

from __future__ import annotations

import random

import numpy as np
from engine_support import make_engine
from hf_reference import prompt_ids
from test_batcher import read_back
from test_decode_entries import make, run_scenario, snapshot

from hotswap.cache.page_allocator import PageAllocator
from hotswap.cache.radix_cache import RadixPrefixCache
from hotswap.runner.host_batch import HostBatch
from hotswap.scheduler import kept_decode
from hotswap.scheduler.batcher import Batcher, ScheduledBatch
from hotswap.scheduler.overlap import mark_sample_rows
from hotswap.scheduler.sequence import Sequence, Status


def count_kept_rows(monkeypatch) -> list[int]:
    """The rows each step took from the kept batch (recorded as `KeptDecode.advance` runs)."""
    taken: list[int] = []
    real = kept_decode.KeptDecode.advance

    def counted(self, running, budget, allocator, plan_penalties):
        entries = real(self, running, budget, allocator, plan_penalties)
        taken.append(len(entries))
        return entries

    monkeypatch.setattr(kept_decode.KeptDecode, "advance", counted)
    return taken


def test_kept_rows_plan_what_a_rebuild_plans_in_the_tight_scenario(monkeypatch):
    """tests/test_decode_entries.py's scenario: a tight pool (preemptions), a retract, penalties, prompt logprobs."""
    taken = count_kept_rows(monkeypatch)
    kept = run_scenario(keep_decode=True)
    assert sum(taken) > 100
    rebuilt = run_scenario(keep_decode=False)
    assert len(kept) == len(rebuilt)
    for i, (a, b) in enumerate(zip(kept, rebuilt)):
        assert a == b, f"step {i} differs"


def churn(keep_decode: bool, seed: int) -> list[list[tuple]]:
    """Decode runs broken by every membership change the scheduler makes, decided by a seeded generator that both
    runs consume alike for as long as their batches agree: stop tokens (a finish mid-batch, known at read-back),
    aborts with a token in flight, arrivals (some repeating a finished prompt: prefix-cache hits), drains before a
    control request, weight updates (a drain, then the cache invalidated), and preemptions in a small pool."""
    rng = random.Random(seed)
    alloc = PageAllocator(num_pages=40, page_size=4)
    batcher = Batcher(allocator=alloc, prefix_cache=RadixPrefixCache(alloc), max_running_requests=12, max_num_batched_tokens=40,
                      max_context_len=80, chunked_prefill_size=12, fail=lambda seq, message: batcher.finish(seq),
                      eos_token_ids=frozenset([2]), keep_decode=keep_decode)
    steps: list[list[tuple]] = []
    prompts: list[list[int]] = []
    inflight: ScheduledBatch | None = None
    rid = 0


    for step in range(400):
        if step < 250 and rng.random() < 0.15:
            for _ in range(rng.choice([1, 1, 2, 4])):
                seq = make(rid, rng.randrange(2, 14), rng.randrange(3, 40))
                if prompts and rng.random() < 0.4:  # a prompt seen before: its full pages come from the prefix cache
                    seq.req.input_ids = list(rng.choice(prompts))
                prompts.append(seq.req.input_ids)
                batcher.add(seq)
                rid += 1
        event = rng.random()
        if event < 0.06 and inflight is not None:  # a control request: the step in flight is read back first
            read_back(inflight, batcher, token=lambda seq: rng.randrange(3, 40), stops=lambda seq: rng.random() < 0.03)
            inflight = None
            if event < 0.02:  # a weight update: KV computed before may not be cached, mid-prefill rows recompute
                batcher.invalidate_cache()
        elif event < 0.09 and batcher.running:  # an abort, whatever is in flight
            batcher.finish(rng.choice(batcher.running))
        batch = batcher.schedule()
        if batch is not None:
            mark_sample_rows(batch.seqs, batch.entries)
            steps.append(snapshot(batch))
        if inflight is not None:
            read_back(inflight, batcher, token=lambda seq: rng.randrange(3, 40), stops=lambda seq: rng.random() < 0.03)
        inflight = batch
        if step > 250 and not batcher.has_work and inflight is None:
            break
    assert not batcher.has_work
    return steps


def test_kept_rows_plan_what_a_rebuild_plans_through_membership_changes(monkeypatch):
    taken = count_kept_rows(monkeypatch)
    for seed in range(3):
        taken.clear()
        kept = churn(True, seed)
        assert sum(taken) > 200 and len(taken) > 50
        rebuilt = churn(False, seed)
        assert len(kept) == len(rebuilt)
        for i, (a, b) in enumerate(zip(kept, rebuilt)):
            assert a == b, f"seed {seed}: step {i} differs"


def few_rows(keep_decode: bool, num_pages: int, finish_at: int | None = None, steps: int = 12) -> tuple[Batcher, list, list[Sequence]]:
    """Three greedy rows decoding (every read-back appends token 5); `finish_at`: the step before which the first
    row finishes with its token in flight (an abort). The batcher, every step's snapshot and the rows."""
    alloc = PageAllocator(num_pages=num_pages, page_size=4)
    batcher = Batcher(allocator=alloc, prefix_cache=None, max_running_requests=4, max_num_batched_tokens=64, max_context_len=64,
                      chunked_prefill_size=64, fail=lambda seq, message: batcher.finish(seq), keep_decode=keep_decode)
    seqs = [make(4 * i, 3, 40) for i in range(3)]  # KINDS[0]: greedy, no penalties
    for s in seqs:
        batcher.add(s)
    inflight, snaps = None, []
    for step in range(steps):
        if step == finish_at:
            batcher.finish(seqs[1])
        batch = batcher.schedule()
        mark_sample_rows(batch.seqs, batch.entries)
        snaps.append(snapshot(batch))
        if inflight is not None:
            for s in inflight.seqs:
                s.pending -= 1
                if s.status is not Status.FINISHED:
                    s.output_ids.append(5)
        inflight = batch
    return batcher, snaps, seqs


def test_a_row_at_a_page_boundary_without_a_free_page_goes_to_the_general_loop():
    """The kept rows take a page only when one is free; otherwise the general loop preempts, as it did before."""
    batcher, kept, _ = few_rows(True, num_pages=7)
    assert batcher.num_preemptions >= 1
    assert kept == few_rows(False, num_pages=7)[1]


def test_a_kept_row_whose_sequence_left_is_not_advanced():
    """A finished row ahead of kept ones: the rows before it are advanced, it and the rows after are planned again."""
    batcher, kept, seqs = few_rows(True, num_pages=64, finish_at=4, steps=5)
    assert [row[0] for row in kept[-1]] == [seqs[0].rid, seqs[2].rid]
    assert [row[6] for row in kept[-1]] == [0, 2]  # prev_row: the in-flight step still held the finished row
    assert batcher.kept.seqs == [seqs[0], seqs[2]]
    assert kept == few_rows(False, num_pages=64, finish_at=4, steps=5)[1]


def _record(engine) -> tuple[list, list]:
    """Every step's entries as the runner got them and the host arrays built from them."""
    entries_seen, arrays = [], []
    runner = engine.model_runner
    run, build = runner.run, HostBatch.build

    def recording_run(entries, prev=None):
        entries_seen.append([(e.start_pos, e.step, e.prev_row, list(e.pages), e.sample, e.row, list(e.input_ids),
                              None if e.output_ids is None else list(np.asarray(e.output_ids)), e.banned_ids) for e in entries])
        out = run(entries, prev)
        n = sum(e.sample for e in entries)
        arrays.append(("rows", runner.row_params.floats[:, :n].tolist(), runner.row_params.ints[:, :n].tolist()))
        return out

    def recording_build(entries, page_size, page_table=None):
        hb = build(entries, page_size, page_table)
        arrays.append(tuple(np.asarray(getattr(hb, f)).tolist() for f in HostBatch.__slots__))
        return hb

    runner.run = recording_run
    HostBatch.build = recording_build
    return entries_seen, arrays


def test_an_engine_with_the_kept_batch_runs_the_same_steps(tiny_qwen3, monkeypatch):
    """One generate call (admitted at once, so both runs form the same steps): ragged lengths (finishes
    mid-batch), a small pool (preemptions), penalties, seeded sampling with logprobs, shared prompt heads."""
    head = prompt_ids(7, 8)
    prompts = [head + prompt_ids(50 + i, 3 + i % 5) if i % 3 == 0 else prompt_ids(50 + i, 6 + i % 7) for i in range(10)]
    params = [{"max_new_tokens": 10 + 4 * (i % 5), "temperature": 1.0 if i % 2 else 0.0, "top_p": 0.9, "ignore_eos": True,
               **({"frequency_penalty": 0.4, "min_new_tokens": 4} if i % 4 == 1 else {})} for i in range(10)]
    taken = count_kept_rows(monkeypatch)
    runs = []
    real_build = HostBatch.build
    try:
        for keep in (True, False):
            with make_engine(tiny_qwen3, num_pages=30, max_running_requests=8) as engine:
                engine.scheduler.batcher.keep_decode = keep
                seen = _record(engine)
                outs = engine.generate(input_ids=prompts, sampling_params=params, return_logprob=True)
                runs.append((seen, [(o["output_ids"], o["meta_info"]["output_token_logprobs"]) for o in outs],
                             engine.scheduler.batcher.num_preemptions))
                HostBatch.build = real_build
    finally:
        HostBatch.build = real_build
    (kept_seen, kept_out, kept_pre), (re_seen, re_out, re_pre) = runs
    assert kept_pre == re_pre > 0 and sum(taken) > 80
    assert kept_out == re_out
    assert len(kept_seen[0]) == len(re_seen[0])
    for i, (a, b) in enumerate(zip(kept_seen[0], re_seen[0])):
        assert a == b, f"step {i}: entries differ"
    for i, (a, b) in enumerate(zip(kept_seen[1], re_seen[1])):
        assert a == b, f"array record {i} differs"


def test_a_kept_row_that_fails_at_launch_fails_alone(tiny_qwen3, monkeypatch):
    """A kept decode row whose parameters cannot run at step 5 (`BatchRowError` at launch): that request ends alone
    (abort, its tokens so far) and the others decode on, in place, to the tokens of a run without the fault and of
    a run that builds every row."""
    from hotswap.errors import BatchRowError
    from hotswap.runner.row_params import RowParamTable

    prompts = [prompt_ids(80 + i, 5 + i) for i in range(4)]
    params = [{"max_new_tokens": 11 if i == 2 else 12, "temperature": 0.0, "ignore_eos": True} for i in range(4)]
    update = RowParamTable.update
    failed: list[int] = []

    def failing_update(self, entries):
        for entry in entries:
            if entry.params.max_new_tokens == 11 and entry.step == 5 and not failed:
                failed.append(entry.step)
                raise BatchRowError(entry, "this request's sampling parameters cannot run: injected")
        return update(self, entries)

    def run(keep: bool, fault: bool) -> list[tuple[list[int], str]]:
        failed.clear()
        with monkeypatch.context() as m:
            if fault:
                m.setattr(RowParamTable, "update", failing_update)
            with make_engine(tiny_qwen3) as engine:
                engine.scheduler.batcher.keep_decode = keep
                outs = engine.generate(input_ids=prompts, sampling_params=params)
        return [(o["output_ids"], o["meta_info"]["finish_reason"]["type"]) for o in outs]

    clean = run(keep=True, fault=False)
    taken = count_kept_rows(monkeypatch)
    kept = run(keep=True, fault=True)
    assert failed == [5] and sum(taken) > 10  # the fault hit a decode step served from the kept batch
    assert kept == run(keep=False, fault=True)
    assert [kind for _, kind in kept] == ["length", "length", "abort", "length"]
    assert [ids for i, (ids, _) in enumerate(kept) if i != 2] == [ids for i, (ids, _) in enumerate(clean) if i != 2]
    assert kept[2][0] == clean[2][0][: len(kept[2][0])] and len(kept[2][0]) < 11  # its tokens before the fault
