"""An in-process Engine shut down while it holds a weights update group leaves it: a new Engine in the same
process (a colocated rollout engine restarted) joins a group of the same name again."""

from __future__ import annotations

import torch.distributed.distributed_c10d as c10d
from trainer_support import CTX, broadcaster_main

from hotswap import Engine
from hotswap.trainer import free_port


def test_shutdown_leaves_the_weights_groups(tiny_qwen3):
    commands, events = CTX.Queue(), CTX.Queue()
    trainer = CTX.Process(target=broadcaster_main, args=(commands, events), daemon=True)
    trainer.start()
    try:
        for attempt in range(2):
            with Engine(str(tiny_qwen3), device="cpu", page_size=4) as eng:
                port = free_port()
                commands.put(("join", port, "restarted", 30))  # the trainer leaves its previous group first
                res = eng.init_weights_update_group("127.0.0.1", port, 1, 2, group_name="restarted", backend="gloo", timeout_s=30)
                assert res.success, (attempt, res.message)
                assert events.get(timeout=30) == ("joined", "restarted")
            assert "restarted" not in c10d._world.pg_names.values()
    finally:
        commands.put(None)
        trainer.join(10)
        if trainer.is_alive():
            trainer.kill()
