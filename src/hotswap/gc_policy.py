"""The cyclic garbage collector's setting in every process that runs an engine's scheduler or a front end.

The collector's full passes walk every tracked object of the process (an engine's or front end's imports alone
hold ~250K), and serving allocates a few containers per row per step (the scheduler) and per token per stream
(the front end), so with CPython's default first threshold (700 allocations) a full pass came often enough to cost
more than the work itself: 256 streams at a step every 2 ms (bench/frontend_stream.py), the front end process's
pipe reader spent 1.8 s of CPU for 131K tokens, 0.45 s with this threshold (as with the collector off), and in one
process the scheduler's thread 2.2 s against 0.55 s; the offline engine's host step at 512 rows
(bench/host_step.py) 1.83 -> 1.68 ms median, 2.66 -> 2.21 ms at the 90th percentile. Reference counting still
frees at once whatever is not a cycle.
"""

from __future__ import annotations

import gc

GC_FIRST_THRESHOLD = 20_000


def make_garbage_collections_rare() -> None:
    """Raise the first threshold to GC_FIRST_THRESHOLD (the older ones kept); a collector turned off stays off."""
    first, *older = gc.get_threshold()
    if first:
        gc.set_threshold(max(first, GC_FIRST_THRESHOLD), *older)
