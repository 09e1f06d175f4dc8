"""A batch's page table, kept on the host between steps.

A decode row gains a page once every page_size steps, yet the table used to be rebuilt from every row's
page list at every step: at 512 rows of ~700 tokens (44 pages of 16) that is 22K page ids converted one
by one, each step. Here row r remembers a copy of the list it was last written from; a step compares
every entry's list with it (by value, in C: `map(operator.ne, ...)`) and rewrites only the rows that
differ: a row that gained a page, or another sequence in that position. Comparing values, not list
identity, keeps the table right however a page list changes (extended, replaced, edited in place).
"""

from __future__ import annotations

from itertools import chain, compress
from operator import ne

import numpy as np


class PageTable:
    """int32 [rows, width] page ids: row r holds `held[r]` followed by `pad_page`."""

    def __init__(self, pad_page: int = 0, rows: int = 64, width: int = 16):
        self.pad_page = pad_page
        self.table = np.full((rows, width), pad_page, dtype=np.int32)
        self.held: list[list[int]] = [[] for _ in range(rows)]

    def rows(self, pages: list[list[int]]) -> np.ndarray:
        """The table of these page lists (row r from pages[r], as wide as the longest, `pad_page` after a
        row's pages): a new array, which the caller may keep (a tensor-parallel replica keeps the last batch)."""
        n = len(pages)
        width = max(map(len, pages), default=0)
        if n > len(self.held) or width > self.table.shape[1]:
            self._grow(n, width)
        changed = list(compress(range(n), map(ne, pages, self.held)))
        if changed:
            self._write(changed, [pages[r] for r in changed])
        return self.table[:n, :width].copy()

    def _write(self, rows: list[int], pages: list[list[int]]) -> None:
        """Rewrite `rows` whole from `pages`: their pages placed in one flat pass by a row-major mask, padding after."""
        lens = np.fromiter(map(len, pages), dtype=np.int64, count=len(rows))
        block = np.full((len(rows), self.table.shape[1]), self.pad_page, dtype=np.int32)
        block[np.arange(block.shape[1]) < lens[:, None]] = np.fromiter(chain.from_iterable(pages), dtype=np.int32, count=int(lens.sum()))
        self.table[rows] = block
        for r, p in zip(rows, pages):
            self.held[r] = list(p)  # a copy: the sequence extends its own list in place

    def _grow(self, n: int, width: int) -> None:
        """Room for `n` rows of `width` pages, at least doubling what runs out (a batch grows step by step)."""
        rows, cols = self.table.shape
        grown = np.full((max(n, 2 * rows) if n > rows else rows, max(width, 2 * cols) if width > cols else cols), self.pad_page,
                        dtype=np.int32)
        grown[:rows, :cols] = self.table
        self.table = grown
        self.held += [[] for _ in range(len(grown) - rows)]
