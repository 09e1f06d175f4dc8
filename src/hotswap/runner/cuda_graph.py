"""CUDA graphs for decode: captured per batch-size bucket, replayed with the batch padded to the bucket;
and, through `ExtendGraphRunner`, for prefill and mixed steps per token bucket, in the same pool.

Graphs read static input buffers and the live parameter storage, so weight updates (which copy into
that storage) need no recapture; releasing weights, the KV cache or the graphs themselves drops them,
and resume recaptures. A step's inputs reach the device in one copy (`StagedInputs`); inputs sampled by
the step still in flight are read inside the graph from `prev_ids`, which the decode graphs' own sampler
fills, so a steady run of decode steps puts only that copy and the read-back of the ids between graphs.

The decode graphs sample inside the graph with the fused kernels of kernels/sampling.py: each row's
temperature, filters, seed and step travel in the same staged upload as its inputs, so greedy, sampled
and filtered rows share one graph per bucket and a seeded request draws the same tokens eager or
replayed. Buckets reach `max_running_requests` (an RL rollout keeps hundreds of sequences in flight;
larger batches ran eagerly before).

Under tensor parallelism every rank captures the same buckets, in the same order, with the model's NCCL
all-reduces and all-gathers inside; rank 0's graph samples and then broadcasts the ids from `prev_ids`,
a worker's graph only receives them there, so a worker needs no sampling parameters: it replays the
bucket from the batch that `runner/tp_step_codec.py` rebuilt. Extend graphs are captured on every rank
too (their all-reduces inside); the LM head of their sampled rows runs eagerly on every rank after them.
"""

from __future__ import annotations

import bisect
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.distributed as dist

from hotswap.kernels import sampling
from hotswap.models.forward_context import ForwardContext
from hotswap.runner.extend_graph import ExtendGraphRunner, capture_stream
from hotswap.runner.host_batch import HostBatch
from hotswap.runner.row_params import aligned_rows
from hotswap.runner.staged_inputs import StagedInputs

if TYPE_CHECKING:
    from hotswap.runner.batch_entry import BatchEntry
    from hotswap.runner.model_runner import ModelRunner

BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256, 320, 384, 448, 512)
_WIDE_STEP = 128  # bucket spacing above the table


def graph_buckets(limit: int) -> list[int]:
    """Batch-size buckets up to `limit`, the last one `limit` itself: every batch the scheduler can form
    replays a graph, padded by at most a bucket's spacing."""
    limit = max(1, limit)
    wide = range(BUCKETS[-1] + _WIDE_STEP, limit, _WIDE_STEP)
    return [b for b in (*BUCKETS, *wide) if b < limit] + [limit]


def graph_bucket(buckets: list[int], rows: int) -> int:
    """The captured batch size a decode batch of `rows` replays in: the smallest bucket that holds it."""
    return buckets[bisect.bisect_left(buckets, rows)]


class CudaGraphRunner:
    def __init__(self, runner: ModelRunner):
        self.runner = runner
        cfg = runner.config
        self.buckets = graph_buckets(min(cfg.cuda_graph_max_batch or cfg.max_running_requests, cfg.max_running_requests))
        self.max_batch = self.buckets[-1]
        self.max_pages = -(-runner.model_config.max_positions // runner.kv_cache.page_size)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.pool = None
        self.inputs: StagedInputs | None = None
        self.cu_seqlens_q: torch.Tensor | None = None
        self.prev_ids: torch.Tensor | None = None
        self.extend = ExtendGraphRunner(runner, self.max_batch, self.max_pages)
        self.warmed = False

    @property
    def captured(self) -> bool:
        return bool(self.graphs)

    def can_run(self, hb: HostBatch, penalized: bool) -> bool:
        """A decode batch (one input per row, every row sampled, no prompt row scored) that fits a bucket.
        `penalized`: some row has penalties, and runs eagerly (the in-graph sampler reads the logits as the
        model left them)."""
        n = len(hb.seq_lens)
        return (self.captured and n <= self.max_batch and hb.is_decode and len(hb.logits_indices) == n
                and not len(hb.prompt_rows) and not penalized)

    def can_run_extend(self, entries: list[BatchEntry]) -> bool:
        return self.captured and self.extend.can_run(entries)

    def run_extend(self, hb: HostBatch, fix: np.ndarray | None, prev_token_ids: torch.Tensor | None) -> torch.Tensor | None:
        """An extend step (`can_run_extend`): the logits of its sampled rows, then of its scored prompt rows;
        None when it has neither."""
        self._load_prev(prev_token_ids)
        return self.extend.run(hb, fix)

    def _alloc_buffers(self) -> None:
        dev, n, w = self.runner.device, self.max_batch, self.max_pages
        self.inputs = StagedInputs({
            "input_ids": ((n,), torch.int64), "positions": ((n,), torch.int64), "slot_mapping": ((n,), torch.int64),
            "input_src": ((n,), torch.int64), "seq_lens": ((n,), torch.int32), "decode_order": ((n,), torch.int32),
            # the rows of runner/row_params.py, each column 16-byte aligned (`aligned_rows`)
            "floats": ((3, aligned_rows(n)), torch.float32), "ints": ((3, aligned_rows(n)), torch.int64),
            "page_table": ((n, w), torch.int32),
        }, dev)
        self.logprobs = torch.zeros(n, dtype=torch.float32, device=dev)
        self.lse = torch.zeros(n, dtype=torch.float32, device=dev)
        self.cu_seqlens_q = torch.arange(n + 1, dtype=torch.int32, device=dev)
        # the previous step's sampled ids: the decode graphs' sampler writes them here, other steps' ids are copied in
        self.prev_ids = torch.zeros(max(n, self.runner.config.max_running_requests), dtype=torch.int64, device=dev)

    def sampling_rows(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The staged (floats, ints) row parameters of a step's first `n` rows on the device: filled by the
        step's one upload (`replay`), read by the graph's sampler and by the sampling after it."""
        d = self.inputs.device
        return d["floats"][:, :n], d["ints"][:, :n]

    def _load_prev(self, prev_token_ids: torch.Tensor | None) -> None:
        """Make `prev_ids` hold the previous step's sampled ids (already there after a decode graph step)."""
        if prev_token_ids is not None and prev_token_ids.data_ptr() != self.prev_ids.data_ptr():
            self.prev_ids[: len(prev_token_ids)].copy_(prev_token_ids)

    def _context(self, bs: int) -> ForwardContext:
        d = self.inputs.device
        return ForwardContext(positions=d["positions"][:bs], slot_mapping=d["slot_mapping"][:bs], page_table=d["page_table"][:bs],
                              cu_seqlens_q=self.cu_seqlens_q[: bs + 1], seq_lens=d["seq_lens"][:bs], max_q_len=1, is_decode=True,
                              attention=self.runner.attention, skinny_matmul=self.runner.use_skinny_matmul(bs),
                              rows_matmul=self.runner.use_rows_matmul(bs),
                              input_src=d["input_src"][:bs], prev_ids=self.prev_ids, routed_experts=self.runner.routed_experts_ids,
                              decode_order=d["decode_order"][:bs])

    @torch.inference_mode()
    def capture(self) -> None:
        self._alloc_buffers()
        model = self.runner.model
        self.pool = torch.cuda.graph_pool_handle()
        self.outputs: dict[int, torch.Tensor] = {}
        d = self.inputs.device
        d["input_src"].fill_(-1)
        d["slot_mapping"].fill_(self.runner.kv_cache.scratch_slot)
        d["seq_lens"].fill_(1)
        d["decode_order"].copy_(torch.arange(self.max_batch, dtype=torch.int32))
        d["page_table"].fill_(self.runner.kv_cache.scratch_page)
        d["floats"].zero_()  # greedy rows: temperature 0 (top_p, min_p unread)
        d["ints"].zero_()
        tp = self.runner.tp.size > 1
        for bs in reversed(self.buckets):  # largest first, so smaller graphs reuse its memory
            ctx = self._context(bs)
            ids = d["input_ids"][:bs]
            if not self.warmed:  # first capture only (Triton compiles, cuBLAS handles, NCCL communicators); a resume recaptures without it
                self._sample(model.compute_logits(model(ids, ctx)), bs)
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            # thread-local under TP: NCCL's watchdog thread queries events while this thread captures
            with torch.cuda.graph(graph, pool=self.pool, stream=capture_stream(ids.device), capture_error_mode="thread_local" if tp else "global"):
                # the sampler runs inside the graph: no launch of its own between steps
                self.outputs[bs] = model.compute_logits(model(ids, ctx))
                self._sample(self.outputs[bs], bs)
            self.graphs[bs] = graph
        self.extend.capture(self.pool, warm=not self.warmed, prev_ids=self.prev_ids)
        self.warmed = True
        torch.cuda.synchronize()

    def _sample(self, logits: torch.Tensor, bs: int) -> None:
        """The fused sampler over a bucket's logits, from the staged row parameters into `prev_ids`; under
        tensor parallelism rank 0 samples and every rank takes its ids from there."""
        tp = self.runner.tp
        if tp.rank == 0:
            f, i = self.inputs.device["floats"][:, :bs], self.inputs.device["ints"][:, :bs]
            sampling.sample_rows(logits, f[0], i[0], f[1], f[2], i[1], i[2], original=self.runner.config.return_original_logprob,
                                 out_ids=self.prev_ids[:bs], out_logprobs=self.logprobs[:bs], out_lse=self.lse[:bs])
        if tp.size > 1:
            dist.broadcast(self.prev_ids[:bs], src=0, group=tp.group)

    def release(self) -> None:
        self.extend.release()
        self.graphs.clear()
        self.outputs = {}
        self.inputs = None
        self.cu_seqlens_q = self.prev_ids = self.logprobs = self.lse = None
        self.pool = None
        torch.cuda.synchronize()
        torch.cuda.empty_cache()

    def replay(self, hb: HostBatch, fix: np.ndarray | None, rows: tuple[np.ndarray, np.ndarray] | None,
               prev_token_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """(logits [n, V], (sampled ids, their logprobs, log-sum-exp) [n]) of a decode batch (`can_run`),
        padded to its bucket. `rows`: the rows' (floats, ints) of the runner's RowParamTable (None on a
        tensor-parallel worker, which does not sample). The outputs are views of static buffers: valid until the next decode graph
        step, which is after the caller has read them back."""
        n, width = hb.page_table.shape
        bs = graph_bucket(self.buckets, n)
        kv = self.runner.kv_cache
        h = self.inputs.stage()
        h["input_ids"][:n] = hb.input_ids
        h["positions"][:n] = hb.positions
        h["slot_mapping"][:n] = hb.slot_mapping
        h["seq_lens"][:n] = hb.seq_lens
        h["decode_order"][:n] = hb.longest_first()
        h["decode_order"][n:bs] = np.arange(n, bs, dtype=np.int32)  # padded rows last (length 1)
        h["page_table"][:n, :width] = hb.page_table  # cells past a row's pages are never read (attention stops at seq_lens)
        if rows is not None:
            h["floats"][:, :n], h["ints"][:, :n] = rows
        h["floats"][0, n:bs] = 0.0  # padded rows: greedy
        h["input_src"][:bs] = -1
        if bs > n:  # padded rows: length 1 over the scratch page
            h["slot_mapping"][n:bs] = kv.scratch_slot
            h["seq_lens"][n:bs] = 1
            h["page_table"][n:bs, 0] = kv.scratch_page
        if fix is not None:  # decode: one input row per entry
            h["input_src"][fix[0]] = fix[1]
        self.inputs.upload(bs)
        self._load_prev(prev_token_ids)
        self.graphs[bs].replay()
        return self.outputs[bs][:n], (self.prev_ids[:n], self.logprobs[:n], self.lse[:n])
