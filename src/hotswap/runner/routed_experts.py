"""Routed experts kept beside the KV cache, for routing replay (R3) in RL trainers.

Row s of the table holds the top-k expert ids, per decoder layer, of the token whose K/V sit in cache slot
s (-1 on dense layers): the MoE blocks write it in the same forward that writes the KV. The routing so
lives exactly as long as the KV: a prefix-cache hit finds its prompt's routing in the shared pages, a
preempted sequence recomputes both, and nothing is copied per step.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass(kw_only=True, slots=True)
class RoutedExpertsTable:
    """Released and restored with the `kv_cache` memory tag (`free_storage` / `allocate_storage`): its rows
    mean nothing once the KV they describe is gone, and at the Qwen3-30B-A3B shape a million cache slots
    hold about 1.5 GB of routing."""

    shape: tuple[int, int, int]  # (cache slots, scratch page included; num_layers; top_k)
    page_size: int
    device: torch.device
    ids: torch.Tensor | None = None  # int32 [shape]; None while released
    # CUDA: the finish-time gather's own stream, so it waits for nothing but itself (not the step in flight)
    read_stream: torch.cuda.Stream | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.allocate_storage()
        if self.device.type == "cuda":
            self.read_stream = torch.cuda.Stream(device=self.device)

    @classmethod
    def create(cls, *, num_slots: int, num_layers: int, top_k: int, page_size: int, device: torch.device) -> RoutedExpertsTable:
        return cls(shape=(num_slots, num_layers, top_k), page_size=page_size, device=device)

    def allocate_storage(self) -> None:
        self.ids = torch.full(self.shape, -1, dtype=torch.int32, device=self.device)

    def free_storage(self) -> None:
        self.ids = None

    def _slots(self, pages: list[int], start: int, end: int) -> np.ndarray:
        pos = np.arange(start, end)
        return np.asarray(pages, dtype=np.int64)[pos // self.page_size] * self.page_size + pos % self.page_size

    def read_many(self, spans: list[tuple[list[int], int, int]], settled: bool = False) -> list[bytes]:
        """For each (pages, start, end) of a sequence: positions [start, end) as the bytes of the int32
        (little-endian) array ordered (token, layer, top-k slot); the engine's collector, off the scheduler
        thread, writes them in SGLang's wire form (base64). One gather and one device-to-host copy for all of
        them (a step that finishes many sequences waits once). `settled`: every position read was written by a
        step already complete, so on CUDA they run on `read_stream` and wait only for themselves, and the step in
        flight keeps running; otherwise they wait for the compute stream's work."""
        slots = [self._slots(pages, start, max(start, end)) for pages, start, end in spans]
        flat = np.concatenate(slots) if slots else np.zeros(0, dtype=np.int64)
        if not len(flat):  # nothing forwarded (requests refused while the storage is released): no device work
            return [b""] * len(spans)
        index = torch.from_numpy(flat)
        if not settled or self.read_stream is None:
            rows = self.ids[index.to(self.device)].cpu().numpy()
        else:
            index = index.pin_memory()
            with torch.cuda.stream(self.read_stream):
                host = torch.empty((len(flat), *self.shape[1:]), dtype=torch.int32, pin_memory=True)
                host.copy_(self.ids[index.to(self.device, non_blocking=True)], non_blocking=True)
            self.read_stream.synchronize()
            rows = host.numpy()
        rows = rows.astype("<i4", copy=False)
        bounds = np.cumsum([0] + [len(s) for s in slots])
        return [rows[a:b].tobytes() for a, b in zip(bounds[:-1], bounds[1:])]
