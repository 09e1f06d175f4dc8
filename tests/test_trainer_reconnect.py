"""A trainer retrying `DistributedWeightPusher.connect()` after a failed one: the retry is decided by the engines
again, not refused by the first attempt's own rendezvous (still waiting for its peers until `timeout_s`)."""

from __future__ import annotations

import time

import pytest

from hotswap.trainer import DistributedWeightPusher, WeightPushError


class RefusingEngine:
    """An engine that still holds a group of that name (a trainer crashed before destroying it)."""

    def __init__(self):
        self.inits = 0

    def init_weights_update_group(self, master_address, master_port, rank_offset, world_size, **kw):
        self.inits += 1
        return False, "weights update group 'wg' already exists; destroy it or use another group_name"

    def destroy_weights_update_group(self, group_name="weight_update_group"):
        return True, "destroyed"

    def __repr__(self):
        return "RefusingEngine()"


def test_connect_can_be_retried_at_once_after_a_failed_connect():
    engine = RefusingEngine()
    pusher = DistributedWeightPusher(engine, group_name="wg-retry", backend="gloo", timeout_s=60)
    for attempt in range(3):
        start = time.monotonic()
        with pytest.raises(WeightPushError) as info:
            pusher.connect()
        assert time.monotonic() - start < 10
        # the engine's refusal each time, never the trainer's own previous attempt holding the group name
        assert "already exists" in info.value.reason, (attempt, info.value.reason)
        assert "already holds" not in info.value.reason, (attempt, info.value.reason)
    assert engine.inits == 3
