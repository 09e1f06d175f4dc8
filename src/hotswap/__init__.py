"""hotswap: a compact LLM inference engine for RL rollouts whose weights can be replaced while it serves."""

from hotswap.errors import HotswapError
from hotswap.sampling_params import SamplingParams

__all__ = ["Engine", "EngineConfig", "HotswapError", "SamplingParams"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # Engine pulls in torch and transformers; import it lazily so `hotswap.trainer` stays light.
    if name == "Engine":
        from hotswap.engine.engine import Engine

        return Engine
    if name == "EngineConfig":
        from hotswap.config import EngineConfig

        return EngineConfig
    raise AttributeError(name)
