"""The one rank-local apply: what rank 0 and every tensor-parallel worker do with a matched update.

Checked first (finite values, when configured), originals saved into the session's RollbackBuffer when
the caller passes one (a later failure could otherwise strand these copies), then copied straight into
the live parameter storage. Disk reads do the same through a validated ReadPlan, with the saves
overlapping the reads.
"""

from __future__ import annotations

from hotswap.weights.fast_copy import MatchedTensors, check_finite, copy_into
from hotswap.weights.fast_reader import ReaderOptions, ReadPlan, ReadStats, run_read
from hotswap.weights.rollback import RollbackBuffer


def apply_tensors(matched: MatchedTensors, *, finite: bool, rollback: RollbackBuffer | None) -> int:
    """Copy matched source tensors into their slots; returns the bytes copied."""
    if finite:
        check_finite(matched.items)
    if rollback is not None:
        rollback.protect_many([target.slot for _, target, _ in matched.items])
    return copy_into(matched)


def apply_read(read: ReadPlan, options: ReaderOptions, *, rollback: RollbackBuffer | None, timeout_s: float | None) -> ReadStats:
    """Read a validated checkpoint into its slots (finite check inside the reader, per `options`), at
    most `timeout_s` seconds: a read that does not finish fails the update (the caller rolls back)."""
    saved = rollback.protect_many(read.slots, overlap=True) if rollback is not None else None
    return run_read(read, options, wait_for=saved, timeout_s=timeout_s)
