"""An IPv6 master_address (bare, as RL frameworks pass the trainer's IP, or bracketed) is joined as SGLang's
NetworkAddress.to_tcp() makes it: tcp://[addr]:port, not refused as an unparsable URL."""

from __future__ import annotations

from hotswap.trainer import free_port
from hotswap.wire.process_group import tcp_init_method


def test_tcp_init_method_brackets_ipv6_literals():
    assert tcp_init_method("10.0.0.5", 29500) == "tcp://10.0.0.5:29500"
    assert tcp_init_method("trainer-0.svc", 29500) == "tcp://trainer-0.svc:29500"
    assert tcp_init_method("::1", 29500) == "tcp://[::1]:29500"
    assert tcp_init_method("[fe80::1]", 29500) == "tcp://[fe80::1]:29500"


def test_engine_joins_an_ipv6_master_address(engine):
    port = free_port()
    res = engine.init_weights_update_group("::1", port, rank_offset=1, world_size=2, group_name="v6", backend="gloo", timeout_s=1)
    # nobody listens there: the join waits for the rendezvous and times out, rather than failing to parse the address
    assert not res.success
    assert f"tcp://[::1]:{port}" in res.message, res.message
    assert "could not be cast" not in res.message, res.message
