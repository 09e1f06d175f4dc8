"""The device's properties the Triton kernels size their work by (streaming multiprocessors for grids, L2 for
kernels/l2_prefetch.py); one cached query per device (the properties call is slow enough to show in a decode step)."""

from __future__ import annotations

import functools

import torch

CPU_STAND_IN = 132  # Triton's interpreter (tests on the CPU): an H100's count, so grids take the shapes they take there


@functools.cache
def _properties(idx: int):
    return torch.cuda.get_device_properties(idx)


def device_properties(device: torch.device):
    """`torch.cuda.get_device_properties` of a CUDA `device`, queried once."""
    return _properties(device.index if device.index is not None else torch.cuda.current_device())


def sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return CPU_STAND_IN
    return device_properties(device).multi_processor_count
