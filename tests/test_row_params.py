"""The sampling-parameter rows kept between steps (runner/row_params.py), apart from any graph: a row is
rewritten exactly when the request in its position changes, steps every step, bad values fail their row."""

from __future__ import annotations

import numpy as np
import pytest

from hotswap.errors import BatchRowError
from hotswap.runner.batch_entry import BatchEntry
from hotswap.runner.row_params import RowParamTable, SamplerRow
from hotswap.sampling_params import SamplingParams

V = 100


def entry(params: SamplingParams, seed: int, step: int, row: SamplerRow | None = None) -> BatchEntry:
    return BatchEntry(input_ids=[1], start_pos=0, pages=[0], sample=True, params=params,
                      row=row or SamplerRow.of(params, seed), step=step)


def expected(entries: list[BatchEntry]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The rows from scratch, straight from each entry's SamplingParams."""
    ps = [e.params for e in entries]
    floats = np.array([[0.0 if p.greedy else p.temperature for p in ps], [p.top_p for p in ps], [p.min_p for p in ps]], np.float32)
    seeds = [(e.row.seed + 2**63) % 2**64 - 2**63 for e in entries]
    ints = np.array([[p.top_k if p.top_k > 0 else V for p in ps], seeds, [e.step for e in entries]], np.int64)
    flags = np.array([[p.greedy for p in ps], [p.return_logprob for p in ps], [p.top_logprobs_num for p in ps],
                      [p.return_top_p_token_ids for p in ps]], np.int64)
    return floats, ints, flags


def assert_rows(table: RowParamTable, entries: list[BatchEntry]) -> None:
    n = len(entries)
    floats, ints, flags = expected(entries)
    assert np.array_equal(table.floats[:, :n], floats) and np.array_equal(table.ints[:, :n], ints)
    assert np.array_equal(table.flags[:, :n], flags)


def test_only_rows_whose_request_changed_are_rewritten():
    a = SamplingParams(temperature=0.7, top_p=0.9, return_logprob=True)
    b = SamplingParams(temperature=0.0, top_k=5, return_top_p_token_ids=True)
    c = SamplingParams(temperature=1.3, min_p=0.05, top_logprobs_num=3)
    rows = {name: SamplerRow.of(p, seed) for name, p, seed in (("a", a, 1), ("b", b, 2), ("c", c, 3), ("d", a, 4))}
    params = {"a": a, "b": b, "c": c, "d": a}
    table = RowParamTable(V, capacity=2)  # grows on the first step

    def step(names: list[str], k: int) -> int:
        entries = [entry(params[n], 0, k + i, rows[n]) for i, n in enumerate(names)]
        written = table.update(entries)
        assert_rows(table, entries)
        return written

    assert step(["a", "b", "c"], 0) == 3
    assert step(["a", "b", "c"], 1) == 0  # steady decode: only the steps move
    assert step(["a", "c"], 2) == 1  # b finished: c shifted into its row
    # a new request (a's params, its own seed) in row 1; row 2 still holds c from before b finished
    assert step(["a", "d", "c"], 3) == 1
    same_values = [entry(params[n], 0, 4, SamplerRow.of(params[n], {"a": 1, "d": 4, "c": 3}[n])) for n in ("a", "d", "c")]
    assert table.update(same_values) == 0  # a fresh row with equal values costs nothing either
    assert_rows(table, same_values)
    assert step(["c"], 5) == 1 and step(["c", "b", "a", "d"], 6) == 3


def test_a_seed_is_kept_to_its_low_64_bits():
    p = SamplingParams(temperature=0.5, top_k=3)
    table = RowParamTable(V)
    table.update([entry(p, seed, 4) for seed in (2**64 + 5, 5, 2**63)])
    assert table.ints[1, :3].tolist() == [5, 5, -(2**63)] and table.ints[0, :3].tolist() == [3, 3, 3]
    assert table.floats[0, :3].tolist() == [0.5] * 3


def test_a_row_that_does_not_convert_names_its_entry_and_leaves_the_table_valid():
    good = SamplingParams(temperature=0.8, top_p=0.9)
    bad = SamplingParams(temperature=0.8)
    bad.top_p = "high"  # a value the door missed
    table = RowParamTable(V)
    first = [entry(good, 1, 0), entry(good, 2, 0)]
    table.update(first)
    broken = [first[0], entry(bad, 3, 1), first[1]]
    with pytest.raises(BatchRowError, match="cannot run") as info:
        table.update(broken)
    assert info.value.entry is broken[1]
    rest = [first[0], first[1]]  # the scheduler drops the bad row and runs the rest
    assert table.update(rest) == 1  # row 1 was left unfilled: written again
    assert_rows(table, rest)


def test_new_rows_written_together_fail_only_the_first_row_that_does_not_convert():
    """A batch of new requests is converted column by column at once (RowParamTable._write); a bad value in one of them
    still fails that row alone, the one the door missed first: rows before it are written, rows after it left as they were."""
    good = [SamplingParams(temperature=0.1 * (i + 1), top_k=i + 1, return_logprob=i % 2 == 0) for i in range(6)]
    bad = SamplingParams(temperature=0.8)
    bad.min_p = "low"
    worse = SamplingParams(temperature=0.8)
    worse.top_p = None
    table = RowParamTable(V, capacity=8)
    old = [entry(good[5], 50 + i, 0) for i in range(6)]
    table.update(old)
    fresh = [entry(good[0], 1, 0), entry(good[1], 2, 0), entry(bad, 3, 0), entry(good[2], 4, 0), entry(worse, 5, 0), entry(good[3], 6, 0)]
    with pytest.raises(BatchRowError, match="cannot run") as info:
        table.update(fresh)
    assert info.value.entry is fresh[2]
    assert table.rows[2] is None and table.rows[3:6] == [e.row for e in old[3:]]  # row 2 unfilled, rows 3.. untouched
    expect = expected(fresh[:2] + old[2:])
    keep = [0, 1, 3, 4, 5]
    assert all(np.array_equal(got[:, keep], want[:, keep]) for got, want in zip((table.floats, table.ints, table.flags), expect))
    rest = fresh[:2] + fresh[3:4] + fresh[5:]
    assert table.update(rest) == 2  # rows 2 and 3 took other requests; rows 0 and 1 were written already
    assert_rows(table, rest)


def test_the_batch_summary_follows_every_change_of_rows():
    """The summary is kept between steps: after any change of the rows (a request replaced, rows shifted, the
    batch shrunk or grown) it equals one computed from the requests themselves."""
    kinds = [SamplingParams(temperature=0.0), SamplingParams(temperature=0.0, return_top_p_token_ids=True),
             SamplingParams(temperature=0.9, top_p=0.8, return_logprob=True), SamplingParams(temperature=1.0, top_logprobs_num=4),
             SamplingParams(temperature=0.7, top_k=5, return_top_p_token_ids=True), SamplingParams(temperature=1.0, min_p=0.1)]
    table = RowParamTable(V, capacity=2)

    def expected(params: list[SamplingParams]) -> tuple:
        filtered = [p.top_p < 1.0 or 0 < p.top_k < V or p.min_p > 0 for p in params]
        return (all(p.greedy for p in params), any(p.return_logprob for p in params), max(p.top_logprobs_num for p in params),
                any(filtered), [r for r, p in enumerate(params) if p.return_top_p_token_ids and p.greedy],
                [r for r, (p, f) in enumerate(zip(params, filtered)) if p.return_top_p_token_ids and not p.greedy and f])

    rows = {k: SamplerRow.of(p, k) for k, p in enumerate(kinds)}
    for step, batch in enumerate([[0], [0, 1], [0, 1], [2, 0, 1], [2, 1], [2, 1, 3, 4], [2, 1, 3, 4], [5], [4, 0], [0, 1]]):
        table.update([entry(kinds[k], k, step, rows[k]) for k in batch])
        assert tuple(table.summary(len(batch))) == expected([kinds[k] for k in batch]), f"step {step}: rows {batch}"


def test_the_rows_device_copy_starts_every_column_16_byte_aligned_whatever_the_batch_size(tiny_qwen3):
    """Triton specialises the sampling kernels on their pointers' alignment: a batch whose size left top_p or a seed
    column unaligned compiled them again in the middle of serving (the first odd-sized HTTP prefill)."""
    from engine_support import make_engine

    engine = make_engine(tiny_qwen3)
    try:
        runner = engine.model_runner
        rng = np.random.default_rng(0)
        for n in range(1, 10):
            runner.row_params.floats[:, :n] = rng.random((3, n), dtype=np.float32)
            runner.row_params.ints[:, :n] = rng.integers(0, 1 << 40, (3, n))
            floats, ints = runner.row_columns(n)
            assert floats.shape == ints.shape == (3, n)
            assert all(col.data_ptr() % 16 == 0 for col in (*floats, *ints)), n
            assert np.array_equal(floats.cpu().numpy(), runner.row_params.floats[:, :n])
            assert np.array_equal(ints.cpu().numpy(), runner.row_params.ints[:, :n])
    finally:
        engine.shutdown()
