"""A step's host-built batch (runner/host_batch.py): on mixed batches (prefill chunks, decode rows with and without
a token in flight, prompt-scoring rows, penalized rows, rows that do not sample) every field equals one built row
by row from the entries themselves, with the runner's kept page table across steps as with a table made for the
batch alone."""

from __future__ import annotations

import random

import numpy as np

from hotswap.runner.batch_entry import BatchEntry
from hotswap.runner.host_batch import HostBatch
from hotswap.runner.page_table import PageTable
from hotswap.runner.row_params import SamplerRow
from hotswap.sampling_params import SamplingParams

PAGE = 4
PLAIN = SamplingParams(temperature=0.9, top_p=0.8)
PENALIZED = SamplingParams(temperature=1.0, frequency_penalty=0.3, min_new_tokens=4)


def row_by_row(entries: list[BatchEntry]) -> dict[str, object]:
    """Every field of the batch, one entry at a time, straight from the definitions."""
    ids, positions, slots, cu, lens, logits, prompt_rows = [], [], [], [0], [], [], []
    width = max(len(e.pages) for e in entries)
    table = np.zeros((len(entries), width), dtype=np.int32)
    for i, e in enumerate(entries):
        table[i, : len(e.pages)] = e.pages
        for k, token in enumerate(e.input_ids):
            pos = e.start_pos + k
            ids.append(token)
            positions.append(pos)
            slots.append(e.pages[pos // PAGE] * PAGE + pos % PAGE)
        if e.sample:
            logits.append(cu[-1] + len(e.input_ids) - 1)
        if e.prompt_targets:
            prompt_rows += [cu[-1] + e.prompt_from + k for k in range(len(e.prompt_targets))]
        cu.append(cu[-1] + len(e.input_ids))
        lens.append(e.start_pos + len(e.input_ids))
    return {"input_ids": (ids, np.int64), "positions": (positions, np.int64), "slot_mapping": (slots, np.int64),
            "cu_seqlens_q": (cu, np.int32), "seq_lens": (lens, np.int32), "page_table": (table, np.int32),
            "logits_indices": (logits, np.int64), "prompt_rows": (prompt_rows, np.int64),
            "max_q_len": max(len(e.input_ids) for e in entries), "is_decode": all(len(e.input_ids) == 1 for e in entries)}


def assert_same(hb: HostBatch, expected: dict[str, object]) -> None:
    for name, want in expected.items():
        got = getattr(hb, name)
        if isinstance(want, tuple):
            values, dtype = want
            assert got.dtype == dtype, name
            assert np.array_equal(got, np.asarray(values, dtype=dtype).reshape(got.shape)) and got.size == np.size(values), name
        else:
            assert got == want and type(got) is type(want), name


def random_batch(rng: random.Random, pages: list[list[int]], steps: int, decode_only: bool) -> list[BatchEntry]:
    entries, prev = [], 0
    for p in pages:
        kind = "decode" if decode_only else rng.choice(["decode", "decode", "prefill", "scored", "unsampled"])
        capacity = len(p) * PAGE
        q = 1 if kind == "decode" else rng.randint(1, min(9, capacity))
        start = rng.randint(0, capacity - q)
        params = PENALIZED if rng.random() < 0.3 else PLAIN
        in_flight = kind == "decode" and rng.random() < 0.7
        e = BatchEntry(input_ids=[rng.randrange(1000) for _ in range(q)], start_pos=start, pages=p, sample=kind != "unsampled",
                       params=params, row=SamplerRow.of(params, rng.randrange(99)), step=steps + rng.randrange(5),
                       prev_row=prev if in_flight else -1)
        prev += in_flight
        if kind == "scored" and q > 1:
            e.prompt_from = rng.randrange(q - 1)
            e.prompt_targets = [rng.randrange(1000) for _ in range(q - 1 - e.prompt_from)]
        if params is PENALIZED:
            e.output_ids, e.banned_ids = [1, 2], [7]
        entries.append(e)
    return entries


def test_mixed_batches_equal_a_row_by_row_build():
    rng = random.Random(3)
    kept = PageTable(rows=2, width=2)
    running = [[rng.randrange(1, 500) for _ in range(rng.randint(1, 5))] for _ in range(12)]
    for step in range(60):
        if rng.random() < 0.3:
            running.pop(rng.randrange(len(running)))
        if rng.random() < 0.4 or not running:
            running.insert(rng.randrange(len(running) + 1), [rng.randrange(1, 500) for _ in range(rng.randint(1, 5))])
        for p in running:
            if rng.random() < 0.2:
                p.append(rng.randrange(1, 500))
        entries = random_batch(rng, running, step, decode_only=step % 3 == 0)
        expected = row_by_row(entries)
        assert_same(HostBatch.build(entries, PAGE, kept), expected)
        assert_same(HostBatch.build(entries, PAGE), expected)



def test_longest_first_orders_rows_by_kv_length_ties_in_batch_order():
    """The decode kernel's program order: every row once, longest KV first, equal lengths in batch order."""
    hb = HostBatch.build([BatchEntry(input_ids=[1], start_pos=n - 1, pages=list(range(-(-n // PAGE))), sample=True,
                                     params=PLAIN, row=SamplerRow.of(PLAIN, i), step=0)
                          for i, n in enumerate([5, 40, 5, 1, 40, 12])], PAGE)
    order = hb.longest_first()
    assert order.dtype == np.int32
    assert order.tolist() == [1, 4, 5, 0, 2, 3]
    assert hb.seq_lens[order].tolist() == [40, 40, 12, 5, 5, 1]


def test_one_input_rows_that_do_not_all_sample_equal_a_row_by_row_build():
    """`_build_decode` (every row one input) when some rows do not sample and some score a prompt token: a
    prompt chunk of one token can be both, and the decode path must then give the general path's arrays."""
    rng = random.Random(5)
    for trial in range(20):
        pages = [[rng.randrange(1, 500) for _ in range(rng.randint(1, 4))] for _ in range(rng.randint(1, 9))]
        entries = random_batch(rng, pages, trial, decode_only=True)
        for e in entries:
            if rng.random() < 0.3:
                e.sample = False
            elif rng.random() < 0.3:
                e.prompt_targets = [rng.randrange(1000)]
        expected = row_by_row(entries)
        assert expected["is_decode"] is True
        assert_same(HostBatch.build(entries, PAGE), expected)
