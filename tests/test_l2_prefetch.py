"""The small batches' L2 prefetch of the MLP weights (kernels/l2_prefetch.py): what it asks for, when a forward forks
it, and on a GPU that decode with it gives the tokens decode without it gives, bit for bit (it is a hint), in CUDA
graphs and eagerly. Its sm_90 build: tests/test_kernel_compile.py; its lanes' byte spans through Triton's
interpreter: tests/test_prefetch_interpreted.py."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from hf_reference import prompt_ids

from hotswap import Engine
from hotswap.kernels import l2_prefetch
from hotswap.testing.tiny_models import build_tiny_checkpoint

GREEDY = {"max_new_tokens": 12, "temperature": 0, "ignore_eos": True}


def test_only_whole_aligned_tensors_are_asked_for():
    w = torch.empty(64, 100, dtype=torch.bfloat16)
    assert l2_prefetch._asked_bytes(w) == 64 * 100 * 2
    assert l2_prefetch._asked_bytes(torch.empty(1001, dtype=torch.bfloat16)) == 2000  # rounded down to 16 bytes
    assert l2_prefetch._asked_bytes(w.t()) == 0  # not contiguous
    assert l2_prefetch._asked_bytes(w.view(-1)[4:]) == 0  # 8 bytes past an aligned start


def test_a_forward_forks_it_only_when_on_on_a_hopper_for_few_rows(monkeypatch):
    """On, a CUDA device with an L2 budget (a Hopper's: a stand-in here) and at most MAX_ROWS tokens; else not."""
    on_cuda = lambda rows: SimpleNamespace(device=torch.device("cuda", 0), shape=(rows, 64))  # noqa: E731
    monkeypatch.setattr(l2_prefetch, "ENABLED", True)
    monkeypatch.setattr(l2_prefetch, "_budget", lambda device: 25 * 2**20)
    assert l2_prefetch.wanted(on_cuda(l2_prefetch.MAX_ROWS))
    assert not l2_prefetch.wanted(on_cuda(l2_prefetch.MAX_ROWS + 1))
    assert not l2_prefetch.wanted(torch.zeros(1, 64))  # a CPU tensor
    monkeypatch.setattr(l2_prefetch, "_budget", lambda device: 0)  # before Hopper: no TMA bulk prefetch
    assert not l2_prefetch.wanted(on_cuda(1))
    monkeypatch.setattr(l2_prefetch, "_budget", lambda device: 25 * 2**20)
    monkeypatch.setattr(l2_prefetch, "ENABLED", False)
    assert not l2_prefetch.wanted(on_cuda(1))


@pytest.mark.gpu
@pytest.mark.parametrize("batch", [1, 4])
def test_decode_with_the_prefetch_gives_the_same_tokens(batch, tmp_path, monkeypatch):
    """Batch 1 runs the one-row matmuls, batch 4 the few-rows ones (hidden 128 fits their tiles); with the prefetch
    on, every dense layer's forward asked for its gate/up and down weights, and the tokens are those without it."""
    if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("needs a Hopper GPU (TMA bulk prefetches)")
    path = build_tiny_checkpoint(tmp_path / "qwen3", "qwen3", hidden_size=128, intermediate_size=256, dtype="bfloat16")
    prompts = [prompt_ids(110 + i, 10 + 3 * i) for i in range(batch)]

    def run(graphs: bool) -> tuple[list, set]:
        with Engine(str(path), device="cuda", dtype="bfloat16", enable_cuda_graph=graphs) as eng:
            out = [o["output_ids"] for o in eng.generate(input_ids=prompts, sampling_params=GREEDY)]
            layers = eng.model_runner.model.model.layers
            return out, {(la.mlp.gate_up_proj.weight.data_ptr(), la.mlp.down_proj.weight.data_ptr()) for la in layers}

    ref, _ = run(graphs=True)
    asked = []
    issue = l2_prefetch.prefetch
    monkeypatch.setattr(l2_prefetch, "ENABLED", True)
    monkeypatch.setattr(l2_prefetch, "prefetch", lambda a, b: (asked.append((a.data_ptr(), b.data_ptr())), issue(a, b)))
    for graphs in (True, False):
        asked.clear()
        got, weights = run(graphs)
        assert got == ref
        assert weights <= set(asked)


def test_weights_past_half_the_l2_are_not_asked_for(monkeypatch):
    """With a 50 MB L2 (an H100's), the 0.6B shape's MLP weights (19 MB) are asked for, the 1.7B's (75 MB) are not."""
    monkeypatch.setattr(l2_prefetch, "_budget", lambda device: 25 * 2**20)
    bf16 = torch.bfloat16
    assert l2_prefetch.fits(torch.empty(2 * 3072, 1024, dtype=bf16), torch.empty(1024, 3072, dtype=bf16))
    assert not l2_prefetch.fits(torch.empty(2 * 6144, 2048, dtype=bf16), torch.empty(2048, 6144, dtype=bf16))
