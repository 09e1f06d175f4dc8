"""The paged KV cache: one tensor of fixed-size pages per layer, and a refcounted page allocator."""

from __future__ import annotations

from collections import deque

import torch

from hotswap.errors import HotswapError


class KVCachePool:
    """Pages are shared by reference: a running sequence and the prefix cache each hold one reference.

    The storage can be released (`free_storage`) and recreated (`allocate_storage`) for the
    `kv_cache` memory tag; page bookkeeping must be empty (all free) when that happens.
    """

    def __init__(self, *, num_layers: int, num_pages: int, page_size: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device):
        if num_pages < 2:
            raise HotswapError(f"KV cache needs at least 2 pages, got {num_pages}")
        self.num_layers, self.num_pages, self.page_size = num_layers, num_pages, page_size
        self.num_kv_heads, self.head_dim, self.dtype, self.device = num_kv_heads, head_dim, dtype, device
        self.refcount = [0] * num_pages
        self.scratch_page = num_pages  # one extra page, never allocated: padded CUDA-graph rows write here
        self.free_pages: deque[int] = deque(range(num_pages))
        self.kv: torch.Tensor | None = None
        self.allocate_storage()

    @property
    def scratch_slot(self) -> int:
        """The first cache slot of the scratch page: where padded rows of a graph batch write K/V."""
        return self.scratch_page * self.page_size

    @property
    def bytes_per_page(self) -> int:
        return 2 * self.num_layers * self.page_size * self.num_kv_heads * self.head_dim * self.dtype.itemsize

    def allocate_storage(self) -> None:
        shape = (2, self.num_layers, self.num_pages + 1, self.page_size, self.num_kv_heads, self.head_dim)
        self.kv = torch.zeros(shape, dtype=self.dtype, device=self.device)

    def free_storage(self) -> None:
        if self.num_free != self.num_pages:
            raise HotswapError("cannot release the KV cache while pages are in use")
        self.kv = None

    @property
    def has_storage(self) -> bool:
        return self.kv is not None

    def k_cache(self, layer: int) -> torch.Tensor:
        return self.kv[0, layer]

    def v_cache(self, layer: int) -> torch.Tensor:
        return self.kv[1, layer]

    @property
    def num_free(self) -> int:
        return len(self.free_pages)

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
            elif self.refcount[p] < 0:
                raise RuntimeError(f"page {p} released more often than retained")
