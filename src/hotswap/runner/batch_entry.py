"""Plain data passed from the batcher to the model runner."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from hotswap.runner.row_params import SamplerRow
from hotswap.sampling_params import SamplingParams

if TYPE_CHECKING:
    import numpy as np


@dataclass(slots=True)
class BatchEntry:
    """One sequence's share of a step: compute `input_ids` at positions start_pos.. and maybe sample."""

    input_ids: list[int]
    start_pos: int
    pages: list[int]
    sample: bool
    params: SamplingParams
    row: SamplerRow  # the request's sampler row, made once per request (runner/row_params.py)
    step: int
    prev_row: int = -1  # >= 0: the input token is still on the device, row prev_row of the previous step's sample
    # penalties (only when params.has_penalties): the tokens they count, as the sequence keeps them (the token
    # in flight, prev_row, is read on the device): the prompt's distinct ids (repetition_penalty under vLLM's
    # rule only) and the output so far (repetition, frequency or presence penalty), int64 arrays (lists in
    # tests); and the ids min_new_tokens still masks (one list per request, made once)
    prompt_ids: np.ndarray | list[int] | None = None
    output_ids: np.ndarray | list[int] | None = None
    banned_ids: list[int] | None = None
    # prompt logprobs: the logits of input rows prompt_from.. of this chunk score the next prompt tokens
    prompt_from: int = 0
    prompt_targets: list[int] | None = None
