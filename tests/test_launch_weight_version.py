"""SGLang's --weight-version names the launch weights; a name the engine refuses fails the launch, naming why,
instead of serving under "default"."""

import pytest

from hotswap import Engine
from hotswap.errors import HotswapError


def test_a_refused_launch_weight_version_fails_the_engine(tiny_qwen3):
    with pytest.raises(HotswapError, match="weight_version.*at most 256"):
        Engine(str(tiny_qwen3), device="cpu", page_size=4, weight_version="v" * 5000)


def test_a_launch_weight_version_is_served(tiny_qwen3):
    with Engine(str(tiny_qwen3), device="cpu", page_size=4, weight_version="step-7") as engine:
        assert engine.generate(input_ids=[1, 2], sampling_params={"max_new_tokens": 1})["meta_info"]["weight_version"] == "step-7"
