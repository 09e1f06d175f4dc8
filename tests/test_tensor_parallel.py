"""The TP-sharded decoder over gloo (2 CPU ranks, each loading its slice of every
HF tensor through the same WeightMap) computes the same logits and greedy tokens as TP=1."""

from __future__ import annotations

import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hf_reference import prompt_ids

from hotswap.config import EngineConfig, ModelConfig
from hotswap.models.parallel import TPInfo
from hotswap.runner.batch_entry import BatchEntry
from hotswap.runner.model_runner import ModelRunner
from hotswap.runner.row_params import SamplerRow
from hotswap.sampling_params import SamplingParams

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
    with torch.inference_mode():
        ids, ctx, idx = runner.build_context(entries)
        first_logits = runner.model.compute_logits(runner.model(ids, ctx)[idx])
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


def _worker(rank: int, world: int, port: int, path: str, out, received) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        runner = make_runner(path, TPInfo(rank, world, dist.group.WORLD))
        logits, tokens = greedy_run(runner)
        sizes = {n: tuple(p.shape) for n, p in runner.model.named_parameters()}
        out.put((rank, logits, tokens, sizes))
        received.wait(120)  # a queued tensor is shared by handle: this process must outlive the parent's get
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("family", ["tiny_qwen3", "tiny_qwen2", "tiny_llama"])
def test_tp2_matches_tp1(family, request):
    path = str(request.getfixturevalue(family))
    ref_logits, ref_tokens = greedy_run(make_runner(path, TPInfo()))
    ctx = mp.get_context("spawn")
    out, received = ctx.Queue(), ctx.Event()
    procs = [ctx.Process(target=_worker, args=(r, 2, port, path, out, received)) for port in [_free_port()] for r in range(2)]
    for p in procs:
        p.start()
    results = sorted(out.get(timeout=120) for _ in procs)
    received.set()
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    full = {n: tuple(p.shape) for n, p in make_runner(path, TPInfo()).model.named_parameters()}
    for _rank, logits, tokens, sizes in results:
        torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=1e-4)
        assert tokens == ref_tokens
        qkv = next(n for n in sizes if n.endswith("layers.0.self_attn.qkv_proj.weight"))
        assert sizes[qkv][0] * 2 == full[qkv][0]  # each rank really holds half of the fused q/k/v rows
