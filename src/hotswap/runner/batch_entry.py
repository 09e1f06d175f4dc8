"""Plain data passed from the batcher to the model runner."""

from __future__ import annotations

from dataclasses import dataclass

from hotswap.sampling_params import SamplingParams


@dataclass(slots=True)
class BatchEntry:
    """One sequence's share of a step: compute `input_ids` at positions start_pos.. and maybe sample."""

    input_ids: list[int]
    start_pos: int
    pages: list[int]
    sample: bool
    params: SamplingParams
    seed: int
    step: int
    prev_row: int = -1  # >= 0: the input token is still on the device, row prev_row of the previous step's sample
