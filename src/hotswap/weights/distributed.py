"""The engine's membership in a trainer's weights update group (`hotswap.wire.process_group` makes the
group; the trainer calls the same helper as rank 0)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from hotswap.errors import shown
from hotswap.wire.process_group import destroy_custom_process_group, retire_process_group, short_error, wait_work


class WeightsGroupError(RuntimeError):
    """A collective in a weights update group failed or timed out; the group cannot be used again."""


@dataclass(slots=True)
class WeightsGroup:
    """The engine's membership in one trainer group. A failed or timed-out collective marks it broken
    (and tears the communicator down, which frees a peer still blocked in it); the name stays until
    `destroy_weights_update_group` so the trainer gets a clear message rather than "no such group"."""

    name: str
    pg: dist.ProcessGroup | None
    rank: int
    world_size: int
    backend: str
    device: torch.device
    op_timeout_s: float | None = None
    broken: str | None = None

    def broadcast_from_trainer(self, tensor: torch.Tensor) -> None:
        if self.broken is not None or self.pg is None:
            raise WeightsGroupError(f"weights update group {shown(self.name)} is broken ({self.broken or 'destroyed'})")
        pending = []
        try:
            pending.append(dist.broadcast(tensor, src=0, group=self.pg, async_op=True))
            wait_work(pending[0], self.op_timeout_s)
            return
        except Exception as exc:
            reason = short_error(exc)
        # outside the except block, so no traceback still sees the work: it goes to the retiring thread
        self.mark_broken(f"a broadcast failed: {reason}", pending)
        raise WeightsGroupError(f"broadcast in weights update group {shown(self.name)} failed: {reason}")

    def mark_broken(self, reason: str, pending: list | None = None) -> None:
        """No collective can run on this group again: tear it down in the background, with the `pending`
        works (this also frees a peer still blocked in it); the name stays until destroy_weights_update_group."""
        if self.broken is None:
            self.broken = reason
        doomed = pending if pending is not None else []
        if self.pg is not None:
            doomed.append(self.pg)  # no local reference: the last release must happen in the retiring thread
            self.pg = None
        retire_process_group(doomed)

    def destroy(self) -> str | None:
        """Leave the group; returns a note when teardown complained (the group is gone regardless)."""
        pg, self.pg = self.pg, None
        if pg is None:
            return None
        try:
            destroy_custom_process_group(pg)
        except Exception as exc:  # a dead peer can make teardown fail; the group is gone either way
            return short_error(exc)
        return None
