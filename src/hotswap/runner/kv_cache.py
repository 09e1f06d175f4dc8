"""The paged KV cache's device storage: one tensor of fixed-size pages per layer.

Which pages are free and who holds them is the scheduler's bookkeeping (hotswap.cache.page_allocator);
the runner only reads and writes the pages a batch names.
"""

from __future__ import annotations

import torch

from hotswap.errors import HotswapError


def kv_pool_bytes(free_at_start: int, free_after_weights: int, kv_cache_memory_fraction: float,
                  mem_fraction_static: float | None) -> int:
    """Device bytes the KV cache may take, from the memory free before the weights loaded and after.

    With SGLang's `mem_fraction_static` this is SGLang's own sizing (its `profile_max_num_token`): what the weights
    left free less (1 - f) of what was free at start, so weights and KV cache together take f of it and the rest
    stays free for activations, graphs and whatever else shares the GPU (a trainer beside the engine). Otherwise the
    KV cache takes `kv_cache_memory_fraction` of what the weights left free."""
    if mem_fraction_static is None:
        return int(free_after_weights * kv_cache_memory_fraction)
    kept_free = int(free_at_start * (1 - mem_fraction_static))
    if free_after_weights <= kept_free:
        gib = 1 << 30
        raise HotswapError(
            f"mem_fraction_static={mem_fraction_static} leaves no memory for the KV cache: {free_at_start / gib:.2f} GiB "
            f"was free before the weights loaded, {free_after_weights / gib:.2f} GiB after, and {kept_free / gib:.2f} GiB "
            f"of it is to stay free; raise mem_fraction_static or give num_pages")
    return free_after_weights - kept_free


class KVCacheStorage:
    """The storage can be released (`free_storage`) and recreated (`allocate_storage`) for the
    `kv_cache` memory tag; the scheduler releases it only when no request holds pages."""

    def __init__(self, *, num_layers: int, num_pages: int, page_size: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device):
        if num_pages < 2:
            raise HotswapError(f"KV cache needs at least 2 pages, got {num_pages}")
        self.num_layers, self.num_pages, self.page_size = num_layers, num_pages, page_size
        self.num_kv_heads, self.head_dim, self.dtype, self.device = num_kv_heads, head_dim, dtype, device
        self.scratch_page = num_pages  # one extra page, never allocated: padded CUDA-graph rows write here
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
        self.kv = None

    @property
    def has_storage(self) -> bool:
        return self.kv is not None

    def k_cache(self, layer: int) -> torch.Tensor:
        return self.kv[0, layer]

    def v_cache(self, layer: int) -> torch.Tensor:
        return self.kv[1, layer]
