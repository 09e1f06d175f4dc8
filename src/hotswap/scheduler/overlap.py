"""The one step in flight, scheduler side: while step N runs on the device, step N+1 is scheduled and
launched, its decode inputs taken on the device from step N's sampled ids, and only then are step N's
tokens read back. Every rule that overlap adds to scheduling is a named predicate here.

A sequence with a sampled token in flight has `pending == 1`; `pending_row` is that token's row among
the in-flight step's sampled rows. The runner fills such inputs from the previous step's sampled ids
(BatchEntry.prev_row); nothing else downstream knows about the overlap.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hotswap.runner.batch_entry import BatchEntry
from hotswap.runner.sampler import SampleResult
from hotswap.scheduler.sequence import Sequence


@dataclass(kw_only=True, slots=True)
class InFlight:
    """A launched step whose sampled tokens have not been read back yet."""

    seqs: list[Sequence]
    entries: list[BatchEntry]
    result: SampleResult | None
    version: str  # the weights that computed it


def token_in_flight(seq: Sequence) -> bool:
    """Its newest token is still on the device: it cannot be re-admitted (its inputs are not known)."""
    return seq.pending > 0


def in_flight_token_is_last(seq: Sequence, max_context_len: int) -> bool:
    """The token in flight is its last for sure (length limits; eos is only known after read-back), so
    there is nothing more to compute for it this step."""
    if not seq.pending:
        return False
    return (len(seq.output_ids) + seq.pending >= seq.req.sampling_params.max_new_tokens
            or seq.num_tokens + seq.pending >= max_context_len)


def decodes_token_in_flight(seq: Sequence) -> bool:
    """Its one input to compute is the token in flight (every earlier token's KV is computed): a decode
    step whose input the runner takes from the in-flight step's sampled ids, and which samples."""
    return seq.pending == 1 and seq.num_computed == seq.num_tokens


def inputs_from_inflight(seq: Sequence, end: int) -> int:
    """For a step computing up to position `end`: the in-flight row holding its last input, or -1 when
    every input token is already known on the host."""
    return seq.pending_row if end > seq.num_tokens else -1


def mark_sample_rows(seqs: list[Sequence], entries: list[BatchEntry]) -> None:
    """Record which sampled row of the step being launched holds each sequence's next token."""
    row = 0
    for seq, entry in zip(seqs, entries):
        if entry.sample:
            seq.pending_row = row
            row += 1


def sampled_on_device(inflight: InFlight | None) -> torch.Tensor | None:
    """The in-flight step's sampled ids, still on the device: the next step's decode inputs come from them."""
    return inflight.result.token_ids if inflight is not None and inflight.result is not None else None


def undo_launch(seqs: list[Sequence], entries: list[BatchEntry]) -> None:
    """A step that failed to launch computed nothing: its token is not in flight (a token of the step before may
    still be) and its KV was never written (so it must stay out of the prefix cache)."""
    for seq, entry in zip(seqs, entries):
        seq.pending -= entry.sample
        seq.num_computed = entry.start_pos


def must_drain_before(inflight: InFlight | None, *, control_waiting: bool, update_ready: bool) -> bool:
    """Read the in-flight step back before taking requests: control requests (and a deferred weight update
    whose requests have all finished) must see no step in flight."""
    return inflight is not None and (control_waiting or update_ready)
