"""The decode attention's program order (longest KV first) reaches the kernel: the runner puts it on every decode
step's context, the Triton backend passes it on, and a prefill step carries none."""

from __future__ import annotations

import pytest
import torch

from hotswap import Engine
from hotswap.runner.attention import TritonAttention
from hotswap.runner.batch_entry import BatchEntry
from hotswap.runner.host_batch import HostBatch
from hotswap.runner.row_params import SamplerRow
from hotswap.sampling_params import SamplingParams

GREEDY = SamplingParams(temperature=0.0)


def entries(lengths: list[int], decode: bool, page_size: int) -> list[BatchEntry]:
    out = []
    for i, n in enumerate(lengths):
        pages = list(range(i * 8, i * 8 + -(-n // page_size)))
        ids, start = ([7], n - 1) if decode else ([7] * n, 0)
        out.append(BatchEntry(input_ids=ids, start_pos=start, pages=pages, sample=True, params=GREEDY, row=SamplerRow.of(GREEDY, i), step=0))
    return out


class RecordingKernels:
    """Stands in for hotswap.kernels.triton_attention: records the decode call's order, returns zeros."""

    def __init__(self):
        self.orders = []

    def paged_decode_attention(self, q, k_cache, v_cache, page_table, seq_lens, scale, order=None):
        self.orders.append(order)
        return torch.zeros_like(q)


def test_decode_steps_carry_the_longest_first_order_to_the_kernel(tiny_qwen3):
    with Engine(str(tiny_qwen3), device="cpu", page_size=4) as engine:
        runner = engine.model_runner
        lengths = [5, 17, 3, 17, 9]
        _, ctx, _ = runner.device_context(HostBatch.build(entries(lengths, decode=True, page_size=4), 4))
        assert ctx.is_decode and ctx.decode_order.dtype == torch.int32
        assert ctx.decode_order.tolist() == [1, 3, 4, 0, 2]  # longest first, equal lengths in batch order
        _, prefill, _ = runner.device_context(HostBatch.build(entries([5, 9], decode=False, page_size=4), 4))
        assert not prefill.is_decode and prefill.decode_order is None

        backend = TritonAttention(runner.kv_cache)
        backend.kernels = RecordingKernels()
        q = torch.zeros(len(lengths), runner.model_config.num_heads, runner.model_config.head_dim)
        backend.attend(0, q, 1.0, ctx)
        assert backend.kernels.orders[0] is ctx.decode_order


@pytest.mark.gpu
def test_decode_graphs_stage_the_order_with_every_replay(tiny_qwen3):
    """The decode graphs read the order from their staged inputs: after a step of three rows (replayed in the graph of
    four) it holds the three longest first, then the padded row."""
    prompts = [[3 + i] * n for i, n in enumerate((5, 17, 9))]
    with Engine(str(tiny_qwen3), device="cuda", dtype="float32") as engine:
        graphs = engine.model_runner.cuda_graphs
        assert graphs is not None
        engine.generate(input_ids=prompts, sampling_params={"max_new_tokens": 4, "temperature": 0, "ignore_eos": True})
        torch.cuda.synchronize()
        staged = graphs.inputs.device["decode_order"].tolist()
    assert staged[:4] == [1, 2, 0, 3]
