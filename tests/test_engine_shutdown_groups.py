"""An in-process Engine shut down while it holds a weights update group leaves it: a new Engine in the same
process (a colocated rollout engine restarted) joins a group of the same name again."""

from __future__ import annotations

import torch.distributed.distributed_c10d as c10d
from trainer_support import broadcaster, join_broadcaster

from hotswap import Engine


def test_shutdown_leaves_the_weights_groups(tiny_qwen3):
    with broadcaster() as (commands, events):
        for _ in range(2):
            with Engine(str(tiny_qwen3), device="cpu", page_size=4) as eng:
                join_broadcaster(eng, commands, events, "restarted")
            assert "restarted" not in c10d._world.pg_names.values()
