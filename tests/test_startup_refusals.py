"""Startup refusals name what is wrong (no traceback): a port outside 0-65535, a device torch does not know."""

import pytest

from hotswap import Engine
from hotswap.errors import HotswapError
from hotswap.server.launch import BindError, bind_socket


@pytest.mark.parametrize("port", [70000, -1])
def test_a_port_out_of_range_is_a_bind_error(port):
    with pytest.raises(BindError, match="port must be 0-65535"):
        bind_socket("127.0.0.1", port)


def test_an_unknown_device_is_refused_by_name(tiny_qwen3):
    with pytest.raises(HotswapError, match="unsupported device 'tpu'"):
        Engine(str(tiny_qwen3), device="tpu")


@pytest.mark.parametrize("value", ["inf", "nan", "1e300"])
def test_a_drain_timeout_that_is_no_number_of_seconds_is_refused_before_loading(value, tmp_path, capsys):
    from hotswap.cli import main

    # the model path does not exist: the drain timeout is refused before anything is loaded
    assert main(["serve", "--model-path", str(tmp_path / "absent"), "--drain-timeout", value, "--port", "0"]) == 2
    assert "--drain-timeout must be" in capsys.readouterr().err
