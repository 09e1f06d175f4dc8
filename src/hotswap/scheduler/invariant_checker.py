"""Page accounting checks, run when the engine is idle (tests call it after every scenario)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from hotswap.cache.page_allocator import PageAllocator
from hotswap.cache.radix_cache import RadixPrefixCache


@dataclass(kw_only=True, slots=True)
class InvariantChecker:
    allocator: PageAllocator
    prefix_cache: RadixPrefixCache | None

    def check_idle(self) -> list[str]:
        """With no request alive every page is either free or held once by the prefix cache."""
        problems = []
        free = Counter(self.allocator.free_pages)
        dup_free = [p for p, c in free.items() if c > 1]
        if dup_free:
            problems.append(f"pages listed free twice: {dup_free[:10]}")
        cached = Counter(self.prefix_cache.all_pages()) if self.prefix_cache is not None else Counter()
        dup_cached = [p for p, c in cached.items() if c > 1]
        if dup_cached:
            problems.append(f"pages cached twice: {dup_cached[:10]}")
        both = set(free) & set(cached)
        if both:
            problems.append(f"pages both free and cached: {sorted(both)[:10]}")
        for p in range(self.allocator.num_pages):
            want = 1 if p in cached else 0
            if self.allocator.refcount[p] != want:
                problems.append(f"page {p} has refcount {self.allocator.refcount[p]}, expected {want}")
                if len(problems) > 20:
                    break
        leaked = self.allocator.num_pages - len(free) - len(cached)
        if leaked:
            problems.append(f"{leaked} page(s) neither free nor cached (leaked)")
        return problems
