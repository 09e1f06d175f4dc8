"""Keeps the slices an update session overwrites, so a failure anywhere restores the weights exactly."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from hotswap.weights.mapping import WeightSlot


@dataclass(kw_only=True, slots=True)
class RollbackBuffer:
    """Originals live in device memory up to `device_budget_bytes`, then in (pinned) host memory."""

    device_budget_bytes: int
    saved: dict[str, tuple[WeightSlot, torch.Tensor]] = field(default_factory=dict)
    device_bytes: int = 0
    host_bytes: int = 0

    def protect(self, slot: WeightSlot) -> None:
        if slot.hf_name in self.saved:
            return
        nbytes = slot.dest.numel() * slot.dest.element_size()
        src = slot.dest
        if src.device.type == "cuda" and self.device_bytes + nbytes <= self.device_budget_bytes:
            copy = src.clone()
            self.device_bytes += nbytes
        else:
            copy = torch.empty(src.shape, dtype=src.dtype, device="cpu", pin_memory=src.device.type == "cuda")
            copy.copy_(src, non_blocking=True)
            self.host_bytes += nbytes
        self.saved[slot.hf_name] = (slot, copy)

    def restore(self) -> int:
        for slot, copy in self.saved.values():
            slot.dest.copy_(copy, non_blocking=True)
        if any(s.dest.device.type == "cuda" for s, _ in self.saved.values()):
            torch.cuda.synchronize()
        n = len(self.saved)
        self.clear()
        return n

    def clear(self) -> None:
        self.saved.clear()
        self.device_bytes = self.host_bytes = 0
