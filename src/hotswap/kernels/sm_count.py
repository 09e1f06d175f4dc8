"""The device's streaming-multiprocessor count, by which the Triton kernels size their grids; one cached query
per device (the properties call is slow enough to show in a decode step)."""

from __future__ import annotations

import torch

CPU_STAND_IN = 132  # Triton's interpreter (tests on the CPU): an H100's count, so grids take the shapes they take there
_COUNTS: dict[int, int] = {}


def sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return CPU_STAND_IN
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _COUNTS:
        _COUNTS[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _COUNTS[idx]
