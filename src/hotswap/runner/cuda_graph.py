"""CUDA graphs for decode: captured per batch-size bucket, replayed with the batch padded to the bucket;
and, through `ExtendGraphRunner`, for prefill and mixed steps per token bucket, in the same pool.

Graphs read static input buffers and the live parameter storage, so weight updates (which copy into
that storage) need no recapture; releasing weights, the KV cache or the graphs themselves drops them,
and resume recaptures.
"""

from __future__ import annotations

import bisect
from typing import TYPE_CHECKING

import torch

from hotswap.runner.extend_graph import ExtendGraphRunner
from hotswap.runner.forward_context import ForwardContext
from hotswap.runner.host_batch import HostBatch

if TYPE_CHECKING:
    from hotswap.runner.batch_entry import BatchEntry
    from hotswap.runner.model_runner import ModelRunner

BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256, 320, 384, 448, 512)


class CudaGraphRunner:
    def __init__(self, runner: ModelRunner):
        self.runner = runner
        limit = min(runner.config.cuda_graph_max_batch, runner.config.max_running_requests)
        self.buckets = [b for b in BUCKETS if b <= limit] or [1]
        self.max_batch = self.buckets[-1]
        self.max_pages = -(-runner.model_config.max_position_embeddings // runner.pool.page_size)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.pool = None
        self.buffers: dict[str, torch.Tensor] = {}
        self.extend = ExtendGraphRunner(runner, self.max_batch, self.max_pages)
        self.warmed = False

    @property
    def captured(self) -> bool:
        return bool(self.graphs)

    def can_run(self, entries: list[BatchEntry]) -> bool:
        return (self.captured and len(entries) <= self.max_batch
                and all(len(e.input_ids) == 1 and e.sample for e in entries))

    def can_run_extend(self, entries: list[BatchEntry]) -> bool:
        return self.captured and self.extend.can_run(entries)

    def run_extend(self, entries: list[BatchEntry], prev_token_ids: torch.Tensor | None) -> torch.Tensor:
        return self.extend.run(entries, prev_token_ids)

    def _alloc_buffers(self) -> None:
        dev, n = self.runner.device, self.max_batch
        pool = self.runner.pool
        self.buffers = {
            "input_ids": torch.zeros(n, dtype=torch.int64, device=dev),
            "positions": torch.zeros(n, dtype=torch.int64, device=dev),
            "slot_mapping": torch.full((n,), pool.scratch_slot, dtype=torch.int64, device=dev),
            "page_table": torch.full((n, self.max_pages), pool.scratch_page, dtype=torch.int32, device=dev),
            "seq_lens": torch.ones(n, dtype=torch.int32, device=dev),
            "cu_seqlens_q": torch.arange(n + 1, dtype=torch.int32, device=dev),
        }
        # two pinned staging sets, alternating: with one step in flight, the set a step reuses belongs to the
        # step before the in-flight one, whose copies finished when its sampled ids were read back
        self.staging = [{name: torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for name, t in self.buffers.items()} for _ in range(2)]
        self.step = 0

    def _context(self, bs: int) -> ForwardContext:
        b = self.buffers
        return ForwardContext(positions=b["positions"][:bs], slot_mapping=b["slot_mapping"][:bs], page_table=b["page_table"][:bs],
                              cu_seqlens_q=b["cu_seqlens_q"][: bs + 1], seq_lens=b["seq_lens"][:bs], max_q_len=1, is_decode=True,
                              attention=self.runner.attention, skinny_matmul=self.runner.use_skinny_matmul(bs))

    @torch.inference_mode()
    def capture(self) -> None:
        self._alloc_buffers()
        model = self.runner.model
        self.pool = torch.cuda.graph_pool_handle()
        self.outputs: dict[int, torch.Tensor] = {}
        for bs in reversed(self.buckets):  # largest first, so smaller graphs reuse its memory
            ctx = self._context(bs)
            ids = self.buffers["input_ids"][:bs]
            if not self.warmed:  # first capture only (Triton compiles, cuBLAS handles); a resume recaptures without it
                model.compute_logits(model(ids, ctx))
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                self.outputs[bs] = model.compute_logits(model(ids, ctx))
            self.graphs[bs] = graph
        self.extend.capture(self.pool, warm=not self.warmed)
        self.warmed = True
        torch.cuda.synchronize()

    def release(self) -> None:
        self.extend.release()
        self.graphs.clear()
        self.outputs = {}
        self.buffers = {}
        self.staging = []
        self.pool = None
        torch.cuda.synchronize()
        torch.cuda.empty_cache()

    def run(self, entries: list[BatchEntry], prev_token_ids: torch.Tensor | None = None) -> torch.Tensor:
        n = len(entries)
        bs = self.buckets[bisect.bisect_left(self.buckets, n)]
        pool = self.runner.pool
        hb = HostBatch.build(entries, pool.page_size, width=self.max_pages, pad_page=pool.scratch_page)
        b = self.buffers
        staging = self.staging[self.step % 2]
        self.step += 1
        for name in ("input_ids", "positions", "slot_mapping", "seq_lens", "page_table"):
            staged = staging[name][:n]
            staged.numpy()[...] = getattr(hb, name)
            b[name][:n].copy_(staged, non_blocking=True)
        if bs > n:  # padded rows: length 1 over the scratch page
            b["slot_mapping"][n:bs].fill_(pool.scratch_slot)
            b["seq_lens"][n:bs].fill_(1)
            b["page_table"][n:bs].fill_(pool.scratch_page)
        fix = self.runner.pending_inputs(entries, range(n))  # decode: one input row per entry
        if fix is not None:
            b["input_ids"][fix[0]] = prev_token_ids[fix[1]]
        self.graphs[bs].replay()
        return self.outputs[bs][:n]
