"""In-process tensor updates on CUDA go out as one launch of the table-driven copy kernel
(weights/fast_copy.py) when every source qualifies, and through per-tensor copies otherwise; both land
the same bytes, and a refused update changes none. Skipped without CUDA."""

from __future__ import annotations

import pytest
import torch
from hf_reference import hf_greedy, prompt_ids
from trainer_support import checkpoint_tensors

from hotswap import Engine
from hotswap.weights import fast_copy

pytestmark = pytest.mark.gpu


def _dests(engine) -> dict[str, torch.Tensor]:
    wm = engine.model_runner.weight_map
    return {n: wm.slots[n].dest for n in wm.names}


def _random_like(engine, seed: int, dtype=torch.bfloat16) -> list[tuple[str, torch.Tensor]]:
    g = torch.Generator(device="cuda").manual_seed(seed)
    out = []
    wm = engine.model_runner.weight_map
    for name in wm.names:
        t = torch.empty(wm.slots[name].hf_shape, dtype=dtype, device="cuda")
        out.append((name, t.normal_(0, 0.05, generator=g)))
    return out


def _assert_loaded(engine, named) -> None:
    dests = _dests(engine)
    for name, src in named:
        assert torch.equal(dests[name], src.to(dests[name].dtype)), name


def test_one_launch_copy_and_its_fallbacks(tiny_qwen3, monkeypatch):
    launches = []
    real = fast_copy._copy_multi
    monkeypatch.setattr(fast_copy, "_copy_multi", lambda multi, matched: launches.append(ok := real(multi, matched)) or ok)
    with Engine(str(tiny_qwen3), device="cuda", dtype="bfloat16") as engine:
        first = _random_like(engine, 1)
        for named in (first, first, _random_like(engine, 2)):  # the same sources twice (pointer table kept), then new ones
            assert engine.update_weights_from_tensor(named).success
            _assert_loaded(engine, named)
        assert launches == [True, True, True]
        multi = engine.scheduler.weight_updater.tensor_plans.plans[tuple(n for n, _ in first)].multi
        assert multi is not None and len(multi.rows) == len(first)

        # sources that do not qualify are copied one by one, with the same result
        odd = _random_like(engine, 3)
        buf = torch.empty(odd[0][1].numel() + 1, dtype=torch.bfloat16, device="cuda")
        buf[1:].copy_(odd[0][1].reshape(-1))
        misaligned = [(odd[0][0], buf[1:].view(odd[0][1].shape)), *odd[1:]]
        transposed = [(n, t.t().contiguous().t()) if t.dim() == 2 else (n, t) for n, t in _random_like(engine, 4)]
        as_fp32 = _random_like(engine, 5, torch.float32)
        for named in (misaligned, transposed, as_fp32):
            launches.clear()
            assert engine.update_weights_from_tensor(named).success
            _assert_loaded(engine, named)
            assert launches == [False]

        # a refused update (one wrong shape) moves no byte
        snapshot = {n: t.clone() for n, t in _dests(engine).items()}
        bad = _random_like(engine, 6)
        bad[3] = (bad[3][0], torch.zeros(bad[3][1].numel() + 1, dtype=torch.bfloat16, device="cuda"))
        assert not engine.update_weights_from_tensor(bad).success
        for n, t in _dests(engine).items():
            assert torch.equal(t, snapshot[n]), n


def test_one_launch_copy_serves_hf_weights(tiny_qwen3, tiny_qwen3_v2):
    """Pushing a checkpoint's tensors through the one-launch path serves exactly that checkpoint."""
    v2 = [(n, t.to("cuda", torch.float32)) for n, t in checkpoint_tensors(tiny_qwen3_v2).items()]
    with Engine(str(tiny_qwen3), device="cuda", dtype="float32") as engine:
        assert engine.update_weights_from_tensor(v2).success
        assert engine.update_weights_from_tensor(v2).success
        prompt = prompt_ids(7, 21)
        out = engine.generate(input_ids=prompt, sampling_params={"max_new_tokens": 8, "temperature": 0, "ignore_eos": True})
    assert out["output_ids"] == hf_greedy(tiny_qwen3_v2, prompt, 8)[0]


def test_one_launch_copy_leaves_the_rest_to_the_per_tensor_path(tiny_qwen3, monkeypatch):
    """Targets the kernel cannot write (here: the norms, made not to qualify) go through the per-tensor
    copies in the same call; every tensor lands."""
    real = fast_copy._qualifies
    monkeypatch.setattr(fast_copy, "_qualifies", lambda target, dtype: real(target, dtype) and "norm" not in target.slot.hf_name)
    with Engine(str(tiny_qwen3), device="cuda", dtype="bfloat16") as engine:
        named = _random_like(engine, 7)
        assert engine.update_weights_from_tensor(named).success
        _assert_loaded(engine, named)
        multi = engine.scheduler.weight_updater.tensor_plans.plans[tuple(n for n, _ in named)].multi
        norms = [i for i, (n, _) in enumerate(named) if "norm" in n]
        assert norms and multi.rest == norms and len(multi.rows) == len(named) - len(norms)
