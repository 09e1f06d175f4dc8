"""The one-launch weight copy's program tables (weights/fast_copy.chunk_tables), on the CPU: every program names
the row it copies a chunk of, rows get ceil(size / chunk) programs (at least one, an empty row too), in order."""

from __future__ import annotations

import torch

from hotswap.weights.fast_copy import _CHUNK, chunk_tables


def reference_tables(sizes: list[int]) -> tuple[list[int], list[int]]:
    owner, first = [], []
    for row, words in enumerate(sizes):
        first.append(len(owner))
        owner.extend([row] * max(1, -(-words // _CHUNK)))
    return owner, first


def test_chunk_tables_equal_the_per_program_listing():
    cases = [[1], [0], [_CHUNK], [_CHUNK + 1], [3 * _CHUNK - 1, 0, 5, _CHUNK, 2 * _CHUNK + 7],
             [805_306_368 // 4, 402_653_184 // 4],  # a 30B-A3B layer's stacked experts: ~24K + 12K programs
             list(range(0, 40 * _CHUNK, 3 * _CHUNK + 11))]
    for sizes in cases:
        owner, first = chunk_tables(sizes)
        want_owner, want_first = reference_tables(sizes)
        assert owner.dtype == first.dtype == torch.int32
        assert owner.tolist() == want_owner and first.tolist() == want_first, sizes
