"""Shared pytest setup: the `gpu` marker and session-scoped tiny checkpoints built locally."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, processors

if importlib.util.find_spec("hotswap") is None:  # allow running from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from hotswap.testing.tiny_models import build_tiny_checkpoint, perturb_checkpoint  # noqa: E402

LLAMA3_ROPE_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 128,
}


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "gpu: needs CUDA")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip `gpu`-marked tests on machines without CUDA instead of failing them."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_qwen3(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny_qwen3"), "qwen3")


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny_qwen2"), "qwen2")


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Llama with tied embeddings, llama3 rope scaling and head_dim != hidden/heads: the awkward cases."""
    return build_tiny_checkpoint(
        tmp_path_factory.mktemp("tiny_llama"),
        "llama",
        head_dim=32,
        tie_word_embeddings=True,
        rope_scaling=LLAMA3_ROPE_SCALING,
    )


@pytest.fixture(scope="session")
def tiny_llama_bos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Llama whose tokenizer prepends a BOS, `<|im_start|>` (a TemplateProcessing post-processor, as Llama's)."""
    path = build_tiny_checkpoint(tmp_path_factory.mktemp("tiny_llama_bos"), "llama")
    tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    bos = "<|im_start|>"
    tok.post_processor = processors.Sequence([processors.ByteLevel(trim_offsets=False),
                                              processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                                            special_tokens=[(bos, tok.token_to_id(bos))])])
    tok.save(str(path / "tokenizer.json"))
    config = json.loads((path / "tokenizer_config.json").read_text())
    config["bos_token"] = bos
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return path


@pytest.fixture(scope="session")
def tiny_qwen3_sharded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny_qwen3_sharded"), "qwen3", max_shard_size="40KB")


@pytest.fixture(scope="session")
def tiny_qwen3_v2(tiny_qwen3: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Same architecture as `tiny_qwen3` with perturbed weights, standing in for a trainer update."""
    return perturb_checkpoint(tiny_qwen3, tmp_path_factory.mktemp("tiny_qwen3_v2"), seed=1)


@pytest.fixture(scope="module")
def engine(tiny_qwen3):
    """A CPU engine on the tiny Qwen3 checkpoint, one per module (a module needing other settings defines its own)."""
    from hotswap import Engine

    eng = Engine(str(tiny_qwen3), device="cpu", page_size=4)
    yield eng
    eng.shutdown()


@pytest.fixture(scope="module")
def server(engine):
    """The module's `engine` fixture served by the app in a thread (as `hotswap serve` runs it)."""
    from hotswap.server.app import create_app
    from hotswap.server.launch import ServerThread

    with ServerThread(create_app(engine, served_model_name="tiny")) as srv:
        yield srv


@pytest.fixture(scope="module")
def http(server):
    import httpx

    with httpx.Client(base_url=server.url, timeout=30) as client:
        yield client


@pytest.fixture(scope="module")
def oai(server):
    import openai

    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=30)


@pytest.fixture
def served(tiny_qwen3):
    """A fresh CPU engine on the tiny Qwen3 (for tests that change its weights or state) behind a loopback server in a
    thread: (engine, an httpx client of the server)."""
    import httpx

    from hotswap import Engine
    from hotswap.server.app import create_app
    from hotswap.server.launch import ServerThread

    eng = Engine(str(tiny_qwen3), device="cpu", page_size=4)
    srv = ServerThread(create_app(eng)).start()
    client = httpx.Client(base_url=srv.url, timeout=60)
    yield eng, client
    client.close()
    srv.stop()
    eng.shutdown()


@pytest.fixture
def base_url(engine):
    """The module's `engine` fixture served over HTTP on a free loopback port."""
    from trainer_support import serve_engine_http

    url, server = serve_engine_http(engine)
    yield url
    server.shutdown()


@pytest.fixture(scope="session")
def tiny_qwen3_moe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Qwen3-MoE: 8 experts, top-2 renormalised; layers 0 and 2 sparse, layer 1 dense (mlp_only_layers)."""
    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny_qwen3_moe"), "qwen3_moe", num_hidden_layers=3)


@pytest.fixture(scope="session")
def tiny_qwen3_moe_v2(tiny_qwen3_moe: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return perturb_checkpoint(tiny_qwen3_moe, tmp_path_factory.mktemp("tiny_qwen3_moe_v2"), seed=2)


@pytest.fixture(scope="session")
def tiny_qwen2_moe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Qwen2-MoE: q/k/v bias, a gated shared expert, unnormalised top-2 of 8; layer 1 dense."""
    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny_qwen2_moe"), "qwen2_moe", num_hidden_layers=3)
