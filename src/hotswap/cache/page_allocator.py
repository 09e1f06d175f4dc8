"""Refcounted KV pages: which pages are free and who holds the others. Plain Python, no device state.

A running sequence and the prefix cache each hold one reference on a page they use; a page whose last
reference is released goes back on the free list.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from hotswap.errors import HotswapError


@dataclass(frozen=True, slots=True)
class PoolCapacity:
    """What callers outside the scheduler need to know about the KV cache's size."""

    num_pages: int
    page_size: int

    @property
    def max_total_tokens(self) -> int:
        return self.num_pages * self.page_size


@dataclass(kw_only=True, slots=True)
class PageAllocator:
    num_pages: int
    page_size: int
    refcount: list[int] = field(init=False)
    free_pages: deque[int] = field(init=False)
    # pages a release left with one reference, for a prefix cache that waits on them (None: nobody does); a set,
    # so it stays within the pool's size however long nobody reads it
    unshared: set[int] | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        if self.num_pages < 2:
            raise HotswapError(f"KV cache needs at least 2 pages, got {self.num_pages}")
        if self.page_size < 1:
            raise HotswapError(f"page_size must be at least 1, got {self.page_size}")
        self.refcount = [0] * self.num_pages
        self.free_pages = deque(range(self.num_pages))

    @property
    def capacity(self) -> PoolCapacity:
        return PoolCapacity(num_pages=self.num_pages, page_size=self.page_size)

    @property
    def num_free(self) -> int:
        return len(self.free_pages)

    @property
    def num_used(self) -> int:
        return self.num_pages - len(self.free_pages)

    def pages_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.page_size)

    def allocate(self, n: int) -> list[int]:
        """Take n free pages with one reference each; the caller checked `num_free` first."""
        if n > len(self.free_pages):
            raise RuntimeError(f"KV pool exhausted: asked {n} pages, {len(self.free_pages)} free")
        pages = [self.free_pages.popleft() for _ in range(n)]
        for p in pages:
            self.refcount[p] = 1
        return pages

    def retain(self, pages: list[int]) -> None:
        for p in pages:
            self.refcount[p] += 1

    def release(self, pages: list[int]) -> None:
        for p in pages:
            self.refcount[p] -= 1
            if self.refcount[p] == 0:
                self.free_pages.append(p)
            elif self.refcount[p] == 1 and self.unshared is not None:
                self.unshared.add(p)
            elif self.refcount[p] < 0:
                raise RuntimeError(f"page {p} released more often than retained")
