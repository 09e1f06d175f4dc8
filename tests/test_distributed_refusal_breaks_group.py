"""A bucket refused before receiving (its metadata cannot be received: here it is over weight_update_bucket_bytes,
a limit SGLang does not have) while an SGLang-contract trainer broadcasts it: the group must not stay usable, or
its next update receives that broadcast as its own bucket (another tensor's values, reported a success; in a
flattened bucket a longer broadcast than announced aborts the engine process under gloo)."""

from __future__ import annotations

import pytest
import torch
from trainer_support import broadcaster, join_broadcaster

from hotswap import Engine

NORM, LN, LN2 = "model.norm.weight", "model.layers.0.input_layernorm.weight", "model.layers.0.post_attention_layernorm.weight"


@pytest.fixture
def rig(tiny_qwen3):
    with broadcaster() as (commands, events), Engine(str(tiny_qwen3), device="cpu", page_size=4, weight_update_bucket_bytes=300,
                                                     weight_session_timeout_s=10) as eng:

        def join(name):
            join_broadcaster(eng, commands, events, name)

        join("bucket-limit")
        yield eng, commands, events, join


def test_a_bucket_refused_unreceived_breaks_the_group(rig):
    eng, commands, events, join = rig
    before = eng.check_weights("checksum").digest
    commands.put(("send", [torch.full((64,), 3.25), torch.full((64,), 4.5)]))  # 512 bytes announced and sent
    res = eng.update_weights_from_distributed([NORM, LN], ["float32"] * 2, [[64], [64]], group_name="bucket-limit")
    assert not res.success and "exceeds the configured limit of 300 bytes" in res.message and res.extra.received is False
    kind, why = events.get(timeout=15)  # the trainer's broadcast is not left waiting for a partner
    assert kind == "failed", (kind, why)
    res = eng.update_weights_from_distributed([LN2], ["float32"], [[64]], group_name="bucket-limit")
    assert not res.success and "is broken" in res.message and "destroy it" in res.message, res.message
    assert eng.check_weights("checksum").digest == before
    assert eng.destroy_weights_update_group("bucket-limit").success
    join("bucket-limit-2")  # a new group carries a good update
    commands.put(("send", [torch.full((64,), 9.5)]))
    res = eng.update_weights_from_distributed([LN2], ["float32"], [[64]], group_name="bucket-limit-2")
    assert res.success, res.message
    assert events.get(timeout=15) == ("sent", None)
    assert eng.get_weights_by_name(LN2, truncate_size=3) == [9.5, 9.5, 9.5]
