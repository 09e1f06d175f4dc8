"""A CUDA graph's input buffers, staged in pinned host memory and uploaded with one copy a step.

Each stream operation between two graph replays costs the GPU a few microseconds, which at batch 1 is
several percent of a decode step; one input buffer per tensor meant five or more copies a step. Here
the fields are views into one device allocation, laid out in declaration order (16-byte aligned), and
a step uploads one contiguous span: every field but the last in full, and the first `rows` rows of
the last. So the small fields come first and the one that is large and partly used (the page table)
last.
"""

from __future__ import annotations

import math

import numpy as np
import torch

_ALIGN = 16


class StagedInputs:
    """Two pinned host copies alternate: with one step in flight, the copy a step fills belongs to the
    step before the in-flight one, whose upload finished before that step's sampled ids were read back."""

    def __init__(self, fields: dict[str, tuple[tuple[int, ...], torch.dtype]], device: torch.device):
        self.offsets: dict[str, int] = {}
        offset = 0
        for name, (shape, dtype) in fields.items():
            self.offsets[name] = offset
            offset += -(-math.prod(shape) * dtype.itemsize // _ALIGN) * _ALIGN
        self.fields = dict(fields)
        self.last = next(reversed(fields))
        shape, dtype = fields[self.last]
        self.last_row_bytes = math.prod(shape[1:]) * dtype.itemsize
        self.device_bytes = torch.zeros(offset, dtype=torch.uint8, device=device)
        self.device = self._views(self.device_bytes)
        self.host_bytes = [torch.zeros(offset, dtype=torch.uint8, pin_memory=True) for _ in range(2)]
        self._hosts = [{name: t.numpy() for name, t in self._views(h).items()} for h in self.host_bytes]
        self.step = 0

    def _views(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        out = {}
        for name, (shape, dtype) in self.fields.items():
            start = self.offsets[name]
            out[name] = flat[start : start + math.prod(shape) * dtype.itemsize].view(dtype).view(shape)
        return out

    def stage(self) -> dict[str, np.ndarray]:
        """The next host copy's fields, as numpy views to fill for this step."""
        self.step += 1
        return self._hosts[self.step % 2]

    def upload(self, last_rows: int) -> None:
        """Copy what `stage` returned to the device (asynchronously), with `last_rows` rows of the last field."""
        end = self.offsets[self.last] + last_rows * self.last_row_bytes
        self.device_bytes[:end].copy_(self.host_bytes[self.step % 2][:end], non_blocking=True)
