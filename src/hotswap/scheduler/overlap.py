"""The one step in flight, scheduler side: while step N runs on the device, step N+1 is scheduled and
launched, its decode inputs taken on the device from step N's sampled ids, and only then are step N's
tokens read back. Every rule that overlap adds to scheduling is a named predicate here.

A sequence with a sampled token in flight has `pending == 1`; `pending_row` is that token's row among
the in-flight step's sampled rows. The runner fills such inputs from the previous step's sampled ids
(BatchEntry.prev_row); nothing else downstream knows about the overlap.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import compress
from operator import attrgetter

import torch

from hotswap.runner.batch_entry import BatchEntry
from hotswap.runner.sampler import SampleResult
from hotswap.scheduler.sequence import Sequence

_SAMPLE = attrgetter("sample")


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


NOTHING, DECODE, OTHER = -1, 0, 1  # what `running_step` says a running sequence computes this step


def running_step(seq: Sequence, max_context_len: int) -> int:
    """What a running sequence computes this step, by the two rules overlap adds (its token count read once:
    the batcher asks this of every running row, every step):
    NOTHING: the token in flight is its last for sure (length limits; eos is only known after read-back);
    DECODE: its one input is the token in flight (every earlier token's KV is computed): a decode step whose
    input the runner takes from the in-flight step's sampled ids, and which samples;
    OTHER: whatever else is left to compute (a prompt chunk, a recomputation after a preemption)."""
    pending = seq.pending
    if not pending:
        return OTHER
    num_tokens = seq.num_tokens
    if len(seq.output_ids) + pending >= seq.req.sampling_params.max_new_tokens or num_tokens + pending >= max_context_len:
        return NOTHING
    return DECODE if pending == 1 and seq.num_computed == num_tokens else OTHER


def inputs_from_inflight(seq: Sequence, end: int) -> int:
    """For a step computing up to position `end`: the in-flight row holding its last input, or -1 when
    every input token is already known on the host."""
    return seq.pending_row if end > seq.num_tokens else -1


def mark_sample_rows(seqs: list[Sequence], entries: list[BatchEntry]) -> None:
    """Record which sampled row of the step being launched holds each sequence's next token."""
    for row, seq in enumerate(compress(seqs, map(_SAMPLE, entries))):  # the sampling rows, picked in C
        seq.pending_row = row


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
