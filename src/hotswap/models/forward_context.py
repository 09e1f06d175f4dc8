"""The per-batch attention metadata, passed to the model as an argument (never a global)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


class AttentionBackend(Protocol):
    """What the model asks of attention (the runner's backends implement it: runner/attention.py). `forward`
    stores this step's K/V then attends; a caller that wrote K/V into `kv_cache(layer)` itself (the fused
    rotary kernel does) calls `attend` alone."""

    def forward(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                ctx: ForwardContext) -> torch.Tensor: ...

    def kv_cache(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]: ...

    def attend(self, layer: int, q: torch.Tensor, scale: float, ctx: ForwardContext) -> torch.Tensor: ...


@dataclass(slots=True)
class ForwardContext:
    """Tensors live on the model's device; under CUDA graphs they are the graph's static buffers.

    Sequence b's new tokens are rows cu_seqlens_q[b]:cu_seqlens_q[b+1] of the flattened batch; its KV
    length after this step is seq_lens[b]; slot_mapping[t] is the flat cache slot (page * page_size +
    offset) where token t's K and V are written. `skinny_matmul` routes the layer matmuls through the
    fused batch-1 kernels (one row, half precision, CUDA) and `rows_matmul` through the few-rows decode kernel
    (2-64 rows); the runner decides both per batch shape.
    Under CUDA graphs, token t whose `input_src[t]` >= 0 takes its input id from `prev_ids[input_src[t]]`
    (sampled by the step still in flight) instead of input_ids[t].
    """

    positions: torch.Tensor
    slot_mapping: torch.Tensor
    page_table: torch.Tensor
    cu_seqlens_q: torch.Tensor
    seq_lens: torch.Tensor
    max_q_len: int
    is_decode: bool
    attention: AttentionBackend
    skinny_matmul: bool = False
    rows_matmul: bool = False
    prefill_tiles: torch.Tensor | None = None  # the prefill kernel's work list under extend CUDA graphs
    input_src: torch.Tensor | None = None  # int64 [T]: row of prev_ids holding the input, or -1
    prev_ids: torch.Tensor | None = None  # int64: the previous step's sampled ids
    decode_order: torch.Tensor | None = None  # int32 [B]: decode rows longest KV first (`HostBatch.longest_first`)
    # int32 [cache slots, layers, top-k]: MoE layers write token t's expert ids at row slot_mapping[t]
    routed_experts: torch.Tensor | None = None
