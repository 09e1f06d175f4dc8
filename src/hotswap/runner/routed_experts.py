"""Routed experts kept beside the KV cache, for routing replay (R3) in RL trainers.

Row s of the table holds the top-k expert ids, per decoder layer, of the token whose K/V sit in cache slot
s (-1 on dense layers): the MoE blocks write it in the same forward that writes the KV. The routing so
lives exactly as long as the KV: a prefix-cache hit finds its prompt's routing in the shared pages, a
preempted sequence recomputes both, and nothing is copied per step.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(kw_only=True, slots=True)
class RoutedExpertsTable:
    ids: torch.Tensor  # int32 [cache slots (scratch page included), num_layers, top_k]
    page_size: int

    @classmethod
    def create(cls, *, num_slots: int, num_layers: int, top_k: int, page_size: int, device: torch.device) -> RoutedExpertsTable:
        return cls(ids=torch.full((num_slots, num_layers, top_k), -1, dtype=torch.int32, device=device), page_size=page_size)

    def rows(self, pages: list[int], num_positions: int) -> np.ndarray:
        """int32 [num_positions, num_layers, top_k]: positions 0.. of the sequence holding `pages`."""
        pos = np.arange(num_positions)
        slots = np.asarray(pages, dtype=np.int64)[pos // self.page_size] * self.page_size + pos % self.page_size
        return self.ids[torch.from_numpy(slots).to(self.ids.device)].cpu().numpy()

    def encode(self, pages: list[int], num_positions: int) -> str:
        """SGLang's wire form: base64 of the int32 (little-endian) array ordered (token, layer, top-k slot)."""
        return base64.b64encode(self.rows(pages, num_positions).astype("<i4").tobytes()).decode("ascii")
