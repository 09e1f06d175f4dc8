"""CUDA graphs for prefill and mixed prefill/decode batches ("extend" steps).

An eager extend step launches about ten kernels per layer from Python; on the lent H100's host a
128-token prefill of a 28-layer model took 17 ms of host time for 1.4 ms of GPU work. Here each step
is padded to a token bucket whose graph was captured with the decode graphs (capturing on first use put
100 ms captures inside timed rollouts); per-sequence metadata is sized for the most sequences a step can
hold, so the bucket is the only key. Padded token rows write their K/V into the pool's scratch page and are never read; the attention
kernel takes a host-built work list, so its grid depends on the bucket alone.
Every graph writes its final hidden states into one shared buffer and the few sampled rows go through
the LM head outside the graph, so the graphs hold no per-shape logits.
"""

from __future__ import annotations

import bisect
from typing import TYPE_CHECKING

import numpy as np
import torch

from hotswap.models.forward_context import ForwardContext
from hotswap.runner.host_batch import HostBatch, prefill_tiles
from hotswap.runner.staged_inputs import StagedInputs

if TYPE_CHECKING:
    from hotswap.runner.batch_entry import BatchEntry
    from hotswap.runner.model_runner import ModelRunner

# about a quarter of padding at most above 1K tokens (a chunked prefill plus a few decodes lands just
# above a power of two); every bucket is captured up front, so there are few
TOKEN_BUCKETS = (16, 32, 64, 128, 256, 512, 768, 1024, 1536, 2048, 2560, 3072, 4096, 5120, 6144, 8192)


_CAPTURE_STREAMS: dict[torch.device, torch.cuda.Stream] = {}


def capture_stream(device: torch.device) -> torch.cuda.Stream:
    """A graph-capture stream on `device`. torch.cuda.graph's default is one stream for the whole process,
    made on whichever device was current at the first capture: an engine on cuda:1 in a process that
    captured on cuda:0 before (another engine, a trainer) would capture on the wrong device."""
    stream = _CAPTURE_STREAMS.get(device)
    if stream is None:
        stream = _CAPTURE_STREAMS[device] = torch.cuda.Stream(device=device)
    return stream


class ExtendGraphRunner:
    def __init__(self, runner: ModelRunner, max_seqs: int, max_pages: int):
        from hotswap.kernels.triton_attention import prefill_tile_tokens

        self.runner = runner
        cfg, mc = runner.config, runner.model_config
        self.max_tokens = min(cfg.extend_cuda_graph_max_tokens, cfg.max_num_batched_tokens)
        self.token_buckets = [t for t in TOKEN_BUCKETS if t < self.max_tokens] + [self.max_tokens]
        self.max_seqs = max_seqs
        self.max_pages = max_pages
        tp = runner.tp.size
        self.tile_tokens = prefill_tile_tokens(mc.head_dim, mc.num_heads // tp, max(1, mc.num_kv_heads // tp), mc.torch_dtype)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.inputs: StagedInputs | None = None
        self.hidden: torch.Tensor | None = None
        self.prev_ids: torch.Tensor | None = None

    def can_run(self, entries: list[BatchEntry]) -> bool:
        return (self.max_tokens > 0 and len(entries) <= self.max_seqs
                and sum(len(e.input_ids) for e in entries) <= self.max_tokens)

    def _max_tiles(self, tokens: int) -> int:
        """Sum over sequences of ceil(q_len / tile) <= tokens / tile + number of sequences."""
        return -(-tokens // self.tile_tokens) + min(tokens, self.max_seqs)

    def _alloc_buffers(self) -> None:
        t, s = self.max_tokens, self.max_seqs
        # per-sequence fields first, the page table last: a step uploads them with one copy (StagedInputs)
        self.inputs = StagedInputs({
            "cu_seqlens_q": ((s + 1,), torch.int32), "seq_lens": ((s,), torch.int32), "logits_indices": ((s,), torch.int64),
            "tiles": ((2 * self._max_tiles(t),), torch.int32), "input_ids": ((t,), torch.int64),
            "positions": ((t,), torch.int64), "slot_mapping": ((t,), torch.int64), "input_src": ((t,), torch.int64),
            "page_table": ((s, self.max_pages), torch.int32),
        }, self.runner.device)
        mc = self.runner.model_config
        self.hidden = torch.zeros((t, mc.hidden_size), dtype=mc.torch_dtype, device=self.runner.device)

    def _context(self, tokens: int) -> ForwardContext:
        d, n_tiles = self.inputs.device, self._max_tiles(tokens)
        return ForwardContext(
            positions=d["positions"][:tokens], slot_mapping=d["slot_mapping"][:tokens], page_table=d["page_table"],
            cu_seqlens_q=d["cu_seqlens_q"], seq_lens=d["seq_lens"], max_q_len=tokens, is_decode=False,
            attention=self.runner.attention, skinny_matmul=self.runner.use_skinny_matmul(tokens),
            rows_matmul=self.runner.use_rows_matmul(tokens),
            prefill_tiles=d["tiles"][: 2 * n_tiles].view(2, n_tiles), input_src=d["input_src"][:tokens], prev_ids=self.prev_ids,
            routed_experts=self.runner.routed_experts_ids,
        )

    def _stage(self, hb: HostBatch, fix: np.ndarray | None, tokens: int) -> int:
        """Stage this batch, padded to the bucket, and upload it into the graph's inputs; returns the
        number of sampled rows. Inputs still on the device (`fix`) are marked in `input_src`."""
        kv = self.runner.kv_cache
        n, t, seqs = len(hb.seq_lens), len(hb.input_ids), self.max_seqs
        host = self.inputs.stage()
        host["input_ids"][:t], host["input_ids"][t:tokens] = hb.input_ids, 0
        host["positions"][:t], host["positions"][t:tokens] = hb.positions, 0
        host["slot_mapping"][:t], host["slot_mapping"][t:tokens] = hb.slot_mapping, kv.scratch_slot
        host["input_src"][:tokens] = -1
        if fix is not None:
            host["input_src"][fix[0]] = fix[1]
        host["page_table"][:n, : hb.page_table.shape[1]] = hb.page_table  # cells past a row's pages are never read
        host["cu_seqlens_q"][: n + 1], host["cu_seqlens_q"][n + 1 : seqs + 1] = hb.cu_seqlens_q, t
        host["seq_lens"][:n], host["seq_lens"][n:seqs] = hb.seq_lens, 0
        sampled = len(hb.logits_indices)
        host["logits_indices"][:sampled] = hb.logits_indices
        n_tiles = self._max_tiles(tokens)
        host["tiles"][: 2 * n_tiles] = prefill_tiles(hb.cu_seqlens_q, hb.seq_lens, self.tile_tokens, n_tiles).reshape(-1)
        self.inputs.upload(n)
        return sampled

    def run(self, hb: HostBatch, fix: np.ndarray | None) -> torch.Tensor | None:
        """Logits of the sampled rows, in order, then of the scored prompt rows (None when neither);
        inputs still on the device (`fix`) are read from `prev_ids`, which the caller has filled."""
        tokens = self.token_buckets[bisect.bisect_left(self.token_buckets, len(hb.input_ids))]
        sampled = self._stage(hb, fix, tokens)
        self.graphs[tokens].replay()  # every bucket was captured with the decode graphs
        rows = self.inputs.device["logits_indices"][:sampled]
        if len(hb.prompt_rows):
            rows = torch.cat([rows, self.runner.to_device(hb.prompt_rows)])
        return self.runner.model.compute_logits(self.hidden[rows]) if len(rows) else None

    def capture(self, pool: tuple, warm: bool, prev_ids: torch.Tensor) -> None:
        """Every bucket, largest first (smaller graphs reuse its pool memory), over an all-padding batch:
        no sequence, every token row writing the scratch page. `prev_ids`: the decode graphs' buffer of
        the previous step's sampled ids."""
        if self.max_tokens <= 0:
            return
        self.prev_ids = prev_ids
        if self.inputs is None:
            self._alloc_buffers()
        d, kv = self.inputs.device, self.runner.kv_cache
        d["input_ids"].zero_()
        d["positions"].zero_()
        d["input_src"].fill_(-1)
        d["slot_mapping"].fill_(kv.scratch_slot)
        d["cu_seqlens_q"].zero_()
        d["seq_lens"].zero_()
        d["tiles"].fill_(-1)
        for tokens in reversed(self.token_buckets):
            self._capture(tokens, pool, warm)

    @torch.inference_mode()
    def _capture(self, tokens: int, pool: tuple, warm: bool) -> None:
        """`warm`: run once outside the graph first (first launches); that run recomputes what the staged
        batch's step will write, into the same slots, so it changes nothing."""
        model, ctx = self.runner.model, self._context(tokens)
        ids, hidden = self.inputs.device["input_ids"][:tokens], self.hidden[:tokens]
        if warm:
            hidden.copy_(model(ids, ctx))
        graph = torch.cuda.CUDAGraph()
        # thread-local: a weight-group rendezvous thread may touch CUDA while a graph is captured here
        with torch.cuda.graph(graph, pool=pool, stream=capture_stream(hidden.device), capture_error_mode="thread_local"):
            hidden.copy_(model(ids, ctx))
        self.graphs[tokens] = graph

    def release(self) -> None:
        self.graphs.clear()
        self.inputs = None
        self.hidden = self.prev_ids = None
