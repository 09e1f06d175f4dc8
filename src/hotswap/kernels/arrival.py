"""Arrival counters: the last program of a group to finish merges the group's partial results, so the merge
needs no kernel launch of its own (decode attention's KV splits, the MoE decode path's top-k sum).

Each program of a group stores its partial result, waits at a barrier for all its threads' stores, then adds
one to the group's counter with acquire-release semantics (the atomic runs in one thread; the barrier makes
the release cover the others' stores); the program that sees count == group size - 1 reads every partial
(past L1, which is not coherent) and zeroes the counter for the next launch. One buffer per device serves
every kernel: the kernels of a device's forward pass run in one stream order, and each launch leaves its
counters at zero.
"""

from __future__ import annotations

import torch

#: Counters per device; a launch needs one per group (with more, decode attention launches its merge kernel and
#: the MoE decode path refuses the batch).
SIZE = 1 << 16
_BUFFERS: dict[torch.device, torch.Tensor] = {}


def counters(device: torch.device) -> torch.Tensor:
    """The device's int32 counters, all zero between launches. Allocated at the first (eager) launch, before a
    CUDA graph captures the kernels that use it."""
    buf = _BUFFERS.get(device)
    if buf is None:
        buf = _BUFFERS[device] = torch.zeros(SIZE, dtype=torch.int32, device=device)
    return buf
