"""The page table kept between steps (runner/page_table.py): whatever happens to the rows between two steps
(a row gains a page, finishes and the rows after it shift up, is preempted and comes back with other pages,
a page list edited in place, the batch growing past the table), each step's table equals one built from
scratch, and the table a step returned never changes afterwards."""

from __future__ import annotations

import random

import numpy as np

from hotswap.runner.batch_entry import BatchEntry
from hotswap.runner.host_batch import HostBatch
from hotswap.runner.page_table import PageTable
from hotswap.sampling_params import SamplingParams

PAD = 0


def scratch(pages: list[list[int]]) -> np.ndarray:
    width = max(map(len, pages), default=0)
    table = np.full((len(pages), width), PAD, dtype=np.int32)
    for r, p in enumerate(pages):
        table[r, : len(p)] = p
    return table


def test_rows_follow_every_change_between_steps():
    table = PageTable(rows=2, width=2)  # grows in both directions below
    a, b, c = [5, 6], [7], [8, 9, 10]
    steps = [
        [a, b],
        [a, b, c],  # a new row, wider than the table
        [a, b, c],  # nothing changed
        [b, c],  # the first row finished: the others shift up
        [c, b],  # reordered
        [[11], b],  # a shorter row where a longer one was: padding comes back
    ]
    for pages in steps:
        assert np.array_equal(table.rows(pages), scratch(pages))
    b.append(12)  # gains a page in place
    assert np.array_equal(table.rows([[11], b]), scratch([[11], b]))
    b[0] = 13  # edited in place, same length
    assert np.array_equal(table.rows([[11], b]), scratch([[11], b]))


def test_returned_table_is_the_callers():
    table = PageTable()
    pages = [[1, 2], [3]]
    first = table.rows(pages)
    pages[1].append(4)
    table.rows(pages)
    assert np.array_equal(first, [[1, 2], [3, PAD]])  # a tensor-parallel replica keeps the last batch's table


def test_random_batches_match_tables_built_from_scratch():
    """A running set of sequences over many steps: admissions, finishes anywhere in the batch, page growth,
    preemption (pages dropped, new ones on return), in random order."""
    rng = random.Random(7)
    table = PageTable(rows=4, width=2)
    next_page = iter(range(1, 10**6))
    running: list[list[int]] = []
    for _ in range(400):
        op = rng.random()
        if op < 0.2 and len(running) < 40:
            running.insert(rng.randrange(len(running) + 1), [next(next_page) for _ in range(rng.randint(1, 6))])
        elif op < 0.35 and running:
            running.pop(rng.randrange(len(running)))
        elif op < 0.45 and running:  # preempted and readmitted: a new list, a prefix possibly shared
            i = rng.randrange(len(running))
            running[i] = running[i][: rng.randint(0, len(running[i]))] + [next(next_page)]
        for p in running:
            if rng.random() < 0.2:
                p.append(next(next_page))
        if running:
            assert np.array_equal(table.rows(running), scratch(running))


def test_host_batch_with_a_kept_table_equals_one_without():
    sp = SamplingParams(max_new_tokens=8)

    def entries(rows: list[tuple[int, list[int]]]) -> list[BatchEntry]:
        return [BatchEntry(input_ids=[3], start_pos=pos, pages=p, sample=True, params=sp, row=None, step=0) for pos, p in rows]

    kept = PageTable()
    a, b = [1, 2], [3]
    for rows in ([(7, a), (3, b)], [(8, a), (2, b)], [(1, b)]):  # a gains a page after the first step
        built, fresh = HostBatch.build(entries(rows), 4, kept), HostBatch.build(entries(rows), 4)
        assert np.array_equal(built.page_table, fresh.page_table) and np.array_equal(built.slot_mapping, fresh.slot_mapping)
        a.append(9)
