"""A split-K matmul's output left as its partial sums, for the kernel after it to add up (kernels/rows_matmul.py makes
them, fused.rmsnorm reads them)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SplitSum:
    """The output [rows, N] as float32 partials [splits, rows, N] (two splits or more): the reader sums them in split
    order and rounds to `dtype`, the bits the matmul's own last program would have stored."""

    partials: torch.Tensor
    dtype: torch.dtype

    def __post_init__(self) -> None:
        if self.partials.dim() != 3 or self.partials.shape[0] < 2 or self.partials.dtype != torch.float32:
            raise ValueError(f"SplitSum takes float32 partials [splits >= 2, rows, N], got "
                             f"{self.partials.dtype} {tuple(self.partials.shape)}")

    @property
    def shape(self) -> torch.Size:
        return self.partials.shape[1:]

    @property
    def is_cuda(self) -> bool:
        return self.partials.is_cuda
