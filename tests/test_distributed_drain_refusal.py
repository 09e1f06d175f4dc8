"""An SGLang-style trainer (no pause, no session) posts update_weights_from_distributed while requests run and
broadcasts the bucket at once. The update waits for the drain only weight_update_drain_timeout_s; refused then,
it must still take part in the broadcast the trainer already made: otherwise that broadcast is received by the
group's next update, as that update's bucket (another tensor's values loaded, reported a success)."""

from __future__ import annotations

import threading

import pytest
import torch
from trainer_support import broadcaster, join_broadcaster

from hotswap import Engine

NORM, LN = "model.norm.weight", "model.layers.0.input_layernorm.weight"


@pytest.fixture
def rig(tiny_qwen3):
    with broadcaster() as (commands, events), Engine(str(tiny_qwen3), device="cpu", page_size=4, weight_update_drain_timeout_s=0.2,
                                                     weight_session_timeout_s=10) as eng:
        join_broadcaster(eng, commands, events, "drain")
        yield eng, commands, events


def test_update_refused_after_the_drain_timeout_keeps_lockstep(rig):
    eng, commands, events = rig
    before = eng.check_weights("checksum").digest
    outs = []
    running = threading.Thread(target=lambda: outs.extend(eng.generate(
        input_ids=[[5, 6, 7 + i] for i in range(32)], sampling_params={"max_new_tokens": 400, "temperature": 0.0, "ignore_eos": True})))
    running.start()
    while eng.get_load().num_running == 0:
        pass
    commands.put(("send", [torch.full((64,), 3.25)]))  # the trainer broadcasts update #1's bucket at once
    res = eng.update_weights_from_distributed([NORM], ["float32"], [[64]], group_name="drain", weight_version="u1")
    assert not res.success and "did not finish within 0.2 s" in res.message, res.message
    assert res.extra.received is True  # it took part in the broadcast: lockstep held
    assert events.get(timeout=10) == ("sent", None)
    running.join(60)
    assert [o["meta_info"]["completion_tokens"] for o in outs] == [400] * 32  # the running requests went on
    assert eng.check_weights("checksum").digest == before and eng.weight_version == "default"
    # the group's next update receives its own bucket
    commands.put(("send", [torch.full((64,), 9.5)]))
    res = eng.update_weights_from_distributed([LN], ["float32"], [[64]], group_name="drain", weight_version="u2")
    assert res.success, res.message
    assert events.get(timeout=10) == ("sent", None)
    assert eng.get_weights_by_name(LN, truncate_size=3) == [9.5, 9.5, 9.5]
