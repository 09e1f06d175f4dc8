"""The TP-sharded decoder over gloo (2 CPU ranks, each loading its slice of every
HF tensor through the same WeightMap) computes the same logits and greedy tokens as TP=1."""

from __future__ import annotations

import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hf_reference import prompt_ids

from hotswap.config import EngineConfig, ModelConfig, model_config_for
from hotswap.errors import HotswapError
from hotswap.models.layers import MergedColumnLinear
from hotswap.models.parallel import TPInfo
from hotswap.runner.batch_entry import BatchEntry
from hotswap.runner.host_batch import HostBatch
from hotswap.runner.model_runner import ModelRunner
from hotswap.runner.row_params import SamplerRow
from hotswap.sampling_params import SamplingParams
from hotswap.testing.tiny_models import build_tiny_checkpoint

PROMPTS = [prompt_ids(11, 13), prompt_ids(12, 6)]
STEPS = 5
PAGE = 4


def greedy_run(runner: ModelRunner) -> tuple[torch.Tensor, list[list[int]]]:
    """Prefill both prompts, then decode STEPS tokens; returns the prefill logits and the tokens."""
    sp = SamplingParams(temperature=0, max_new_tokens=STEPS)
    pages = [list(range(0, 8)), list(range(8, 16))]
    seqs = [list(p) for p in PROMPTS]
    entries = [BatchEntry(input_ids=list(p), start_pos=0, pages=pages[i], sample=True, params=sp, row=SamplerRow.of(sp, 0), step=0)
               for i, p in enumerate(PROMPTS)]
    first_logits = runner.forward(HostBatch.build(entries, PAGE, runner.page_table), None, None)  # the prefill step's own forward
    for step in range(STEPS):
        result = runner.run(entries)
        toks = result.token_ids.tolist()
        for s, t in zip(seqs, toks):
            s.append(t)
        entries = [BatchEntry(input_ids=[s[-1]], start_pos=len(s) - 1, pages=pages[i], sample=True, params=sp, row=SamplerRow.of(sp, 0), step=step + 1)
                   for i, s in enumerate(seqs)]
    return first_logits, [s[len(p):] for s, p in zip(seqs, PROMPTS)]


def make_runner(path: str, tp: TPInfo) -> ModelRunner:
    cfg = EngineConfig(model_path=path, device="cpu", page_size=PAGE, num_pages=32)
    return ModelRunner(cfg, ModelConfig.from_pretrained(path), torch.device("cpu"), tp)


def _worker(rank: int, world: int, port: int, paths: list[str], out, received) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        for path in paths:  # one group for every checkpoint: spawning the ranks costs more than a run
            runner = make_runner(path, TPInfo(rank, world, dist.group.WORLD))
            logits, tokens = greedy_run(runner)
            sizes = {n: tuple(p.shape) for n, p in runner.model.named_parameters()}
            out.put((path, rank, logits, tokens, sizes))
        received.wait(120)  # a queued tensor is shared by handle: this process must outlive the parent's get
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


FAMILIES = ["tiny_qwen3", "tiny_qwen2", "tiny_llama"]


@pytest.fixture(scope="module")
def tp2_runs(request) -> dict[str, list]:
    """Each family's TP=2 results, both ranks, from one pair of rank processes that run every family in turn."""
    paths = [str(request.getfixturevalue(family)) for family in FAMILIES]
    ctx = mp.get_context("spawn")
    out, received = ctx.Queue(), ctx.Event()
    procs = [ctx.Process(target=_worker, args=(r, 2, port, paths, out, received)) for port in [_free_port()] for r in range(2)]
    for p in procs:
        p.start()
    results = [out.get(timeout=120) for _ in procs for _ in paths]
    received.set()
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    return {family: sorted((r[1:] for r in results if r[0] == path), key=lambda r: r[0]) for family, path in zip(FAMILIES, paths)}


@pytest.mark.parametrize("family", FAMILIES)
def test_tp2_matches_tp1(family, request, tp2_runs):
    path = str(request.getfixturevalue(family))
    ref_logits, ref_tokens = greedy_run(make_runner(path, TPInfo()))
    results = tp2_runs[family]
    assert [rank for rank, *_ in results] == [0, 1]
    full = {n: tuple(p.shape) for n, p in make_runner(path, TPInfo()).model.named_parameters()}
    for _rank, logits, tokens, sizes in results:
        torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=1e-4)
        assert tokens == ref_tokens
        qkv = next(n for n in sizes if n.endswith("layers.0.self_attn.qkv_proj.weight"))
        assert sizes[qkv][0] * 2 == full[qkv][0]  # each rank really holds half of the fused q/k/v rows


def test_kv_heads_fewer_than_ranks_are_replicated_in_the_shard_specs():
    """SGLang's QKVParallelLinear: 2 KV heads (8 rows each) at TP=4 put head rank // 2 on each rank, q still
    split evenly; a whole tensor is assembled from ranks 0 and 2 only."""
    shards = [MergedColumnLinear(8, {"q": 32, "k": 16, "v": 16}, True, torch.float32, TPInfo(r, 4), head_rows={"k": 8, "v": 8}).bias.hf_shards
              for r in range(4)]
    assert [(s["q"].src_start, s["q"].src_len) for s in shards] == [(0, 8), (8, 8), (16, 8), (24, 8)]
    for sid in ("k", "v"):
        assert [(s[sid].src_start, s[sid].src_len, s[sid].dest_len) for s in shards] == [(0, 8, 8), (0, 8, 8), (8, 8, 8), (8, 8, 8)]
        assert [shards[0][sid].rank_slice(r) for r in range(4)] == [(s[sid].src_start, s[sid].src_len) for s in shards]
        assert [shards[0][sid].gathered_from(r) for r in range(4)] == [True, False, True, False]
    assert all(s["q"].gathered_from(r) for s in shards for r in range(4))


def test_kv_heads_that_neither_divide_nor_replicate_are_refused(tmp_path):
    path = build_tiny_checkpoint(tmp_path, "qwen3", num_attention_heads=6, num_key_value_heads=3, head_dim=16, intermediate_size=96)
    assert model_config_for(EngineConfig(model_path=str(path), device="cpu", tensor_parallel_size=3)).num_kv_heads == 3
    with pytest.raises(HotswapError, match="tensor_parallel_size 2 does not divide the model's num_key_value_heads 3 "
                                           r"\(nor is it a multiple of them"):
        model_config_for(EngineConfig(model_path=str(path), device="cpu", tensor_parallel_size=2))
    with pytest.raises(ValueError, match="3 heads neither divide over nor replicate evenly across tensor-parallel size 2"):
        TPInfo(0, 2).split_heads(3, 16)
