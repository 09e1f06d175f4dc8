"""SGLang's placement on a host whose GPUs are all visible (slime sets base_gpu_id per engine; AReaL's launcher runs
several servers on one host): rank r of an engine runs on GPU base_gpu_id + r * gpu_id_step (sglang engine.py's
scheduler launch, ModelRunner's gpu_id). Checked without GPUs: the devices chosen, and every refusal by name."""

from __future__ import annotations

import pytest
import torch

from hotswap.config import EngineConfig, engine_args_from_sglang
from hotswap.errors import HotswapError
from hotswap.runner.tp_group import worker_device


@pytest.fixture
def eight_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)


def _config(**sglang) -> EngineConfig:
    return EngineConfig(model_path="m", **engine_args_from_sglang(sglang))


def test_base_gpu_id_and_step_place_every_rank(eight_gpus):
    cfg = _config(device="cuda", base_gpu_id=4, tp_size=2, gpu_id_step=2)
    rank0 = cfg.resolved_device()
    assert rank0 == torch.device("cuda", 4)
    assert [worker_device(rank0, r, cfg.gpu_id_step) for r in (1,)] == [torch.device("cuda", 6)]
    assert _config(base_gpu_id=3).resolved_device() == torch.device("cuda", 3)  # device "auto"
    assert _config(device="cuda:5").resolved_device() == torch.device("cuda", 5)  # our own spelling, base_gpu_id 0
    assert _config(device="cuda:5", base_gpu_id=5).resolved_device() == torch.device("cuda", 5)
    assert worker_device(torch.device("cuda", 1), 3) == torch.device("cuda", 4)  # the default step: consecutive GPUs


def test_placements_that_cannot_be_served_are_refused_by_name(eight_gpus):
    with pytest.raises(HotswapError, match=r"device 'cuda:2' and base_gpu_id 5 name different GPUs"):
        _config(device="cuda:2", base_gpu_id=5).resolved_device()
    with pytest.raises(HotswapError, match=r"GPU 10 \(rank 3 of GPU 4 \+ rank x gpu_id_step 2\) does not exist: 8 GPU"):
        _config(device="cuda", base_gpu_id=4, tp_size=4, gpu_id_step=2).resolved_device()
    with pytest.raises(HotswapError, match="base_gpu_id must be an integer >= 0, got 'x'"):
        _config(base_gpu_id="x")


def test_a_cpu_engine_takes_them_and_reports_them_back():
    cfg = _config(device="cpu", base_gpu_id=2, gpu_id_step=1)
    assert cfg.resolved_device() == torch.device("cpu")
    assert (cfg.base_gpu_id, cfg.sglang_settings["base_gpu_id"]) == (2, 2)
