"""Host time of one prefix-cache eviction when the pool is full: the radix cache's LRU heap kept across calls
beside the full walk over every leaf that it replaced (`WalkingCache`, the peer, in the same process). No
device ceiling applies: this is scheduler-thread time, spent before a step can launch.

    python bench/prefix_cache.py            # 2,000 cached sequences: all evictable / 3 in 4 held / 99 in 100 held
"""

from __future__ import annotations

import argparse
import heapq
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import print_table  # noqa: E402

from hotswap.cache.page_allocator import PageAllocator  # noqa: E402
from hotswap.cache.radix_cache import RadixPrefixCache  # noqa: E402


class WalkingCache(RadixPrefixCache):
    """The peer: each eviction walks every leaf and takes the oldest evictable ones."""

    def evict(self, num_pages: int) -> int:
        freed = 0
        heap = [(n.last_access, id(n), n) for n in self._leaves() if self._evictable(n)]
        heapq.heapify(heap)
        while heap and freed < num_pages:
            _, _, leaf = heapq.heappop(heap)
            self.allocator.release(leaf.pages)
            freed += len(leaf.pages)
            parent = leaf.parent
            del parent.children[leaf.key[: self.page_size]]
            if parent is not self.root and not parent.children and self._evictable(parent):
                heapq.heappush(heap, (parent.last_access, id(parent), parent))
        return freed


def evict_ms(cache_type: type[RadixPrefixCache], sequences: int, held_share: float, calls: int, seed: int = 0) -> float:
    """Mean ms of evict(1) on a cache of `sequences` finished 300-token sequences (16-token pages), a share of
    them still held by running sequences."""
    alloc = PageAllocator(num_pages=sequences * 20, page_size=16)
    cache = cache_type(alloc)
    rng = random.Random(seed)
    for i in range(sequences):
        tokens = [i, *rng.sample(range(1000), 300)]
        pages = alloc.allocate(len(tokens) // 16)
        cache.insert(tokens, pages)
        if rng.random() >= held_share:
            alloc.release(pages)
    start = time.perf_counter()
    for _ in range(calls):
        cache.evict(1)
    return (time.perf_counter() - start) / calls * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sequences", type=int, default=2000)
    ap.add_argument("--calls", type=int, default=200)
    args = ap.parse_args()
    rows = []
    for held in (0.0, 0.75, 0.99):
        ours = evict_ms(RadixPrefixCache, args.sequences, held, args.calls)
        walk = evict_ms(WalkingCache, args.sequences, held, args.calls)
        rows.append([f"{held:.0%}", f"{ours:.3f}", f"{walk:.3f}", f"{walk / ours:.1f}x"])
    print_table(f"prefix-cache eviction, {args.sequences:,} cached sequences, evict(1) x {args.calls}",
                ["sequences still held", "LRU heap ms/call", "full walk ms/call (peer)", "speed-up"], rows)


if __name__ == "__main__":
    main()
