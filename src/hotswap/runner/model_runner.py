"""Runs one batch of the model: builds the forward context, runs the model, samples on the device."""

from __future__ import annotations

from itertools import compress
from operator import attrgetter
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.distributed as dist

from hotswap.config import EngineConfig, ModelConfig
from hotswap.errors import HotswapError
from hotswap.kernels import rows_matmul, skinny_matmul
from hotswap.models.decoder import CausalLM
from hotswap.models.forward_context import ForwardContext
from hotswap.models.parallel import TPInfo
from hotswap.runner.attention import TorchAttention, TritonAttention
from hotswap.runner.batch_entry import BatchEntry
from hotswap.runner.host_batch import HostBatch
from hotswap.runner.kv_cache import KVCacheStorage, kv_pool_bytes
from hotswap.runner.page_table import PageTable
from hotswap.runner.penalties import apply_penalties
from hotswap.runner.prompt_logprobs import score_prompt_rows
from hotswap.runner.routed_experts import RoutedExpertsTable
from hotswap.runner.row_params import RowParamTable, aligned_rows
from hotswap.runner.sampler import SampleResult, SamplingBatch, empty_result, sample
from hotswap.runner.tp_step_codec import StepMode
from hotswap.weights.fast_reader import ReaderOptions, load_checkpoint
from hotswap.weights.mapping import WeightMap

if TYPE_CHECKING:
    from hotswap.runner.tp_peers import TPPeers

_PREV_ROW, _SAMPLE, _PENALIZED = attrgetter("prev_row"), attrgetter("sample"), attrgetter("row.penalized")


class ModelRunner:
    """`tp_peers` (rank 0 of a tensor-parallel engine only): every batch is sent to the workers before it runs."""

    def __init__(self, config: EngineConfig, model_config: ModelConfig, device: torch.device, tp: TPInfo = TPInfo(),
                 tp_peers: TPPeers | None = None):
        self.config, self.model_config, self.device, self.tp, self.tp_peers = config, model_config, device, tp, tp_peers
        free_at_start = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else 0  # sizes the KV cache
        with torch.device(device):
            self.model = CausalLM(model_config, tp)
        self.model.model.rotary.rebuild(device)
        self.weight_map = WeightMap(self.model)
        if config.load_format == "dummy":
            self._init_dummy_weights()
        elif config.load_format in ("auto", "safetensors"):
            load_checkpoint(self.weight_map, config.model_path, ReaderOptions.from_config(config))
        else:
            raise HotswapError(f"unknown load_format {config.load_format!r}; use 'auto' or 'dummy'")
        self.kv_cache = self._make_kv_cache(free_at_start)
        self.routed_experts = self._make_routed_experts()
        self.attention = self._make_attention()
        self.row_params = RowParamTable(model_config.vocab_size, capacity=config.max_running_requests)
        self.page_table = PageTable(rows=config.max_running_requests)
        self.cuda_graphs = None
        # under tensor parallelism every rank captures the same buckets, NCCL collectives inside (cuda_graph.py)
        if device.type == "cuda" and config.enable_cuda_graph and isinstance(self.attention, TritonAttention):
            from hotswap.runner.cuda_graph import CudaGraphRunner

            self.cuda_graphs = CudaGraphRunner(self)
            self.cuda_graphs.capture()

    def _init_dummy_weights(self) -> None:
        """Random weights of a sensible scale (norms at 1), for benchmarks that need no checkpoint. Drawn
        whole per HF tensor, in name order, then sliced: every tensor-parallel size holds the same model."""
        g = torch.Generator(device=self.device).manual_seed(self.config.seed)
        for name in self.weight_map.names:
            slot = self.weight_map.slots[name]
            if name.endswith("norm.weight"):
                slot.dest.fill_(1.0)
            else:
                slot.load(torch.empty(slot.hf_shape, dtype=slot.dtype, device=self.device).normal_(0.0, 0.02, generator=g))

    def _make_kv_cache(self, free_at_start: int) -> KVCacheStorage:
        cfg, mc = self.config, self.model_config
        page_size = cfg.page_size or (16 if self.device.type == "cuda" else 4)
        kv_heads = max(1, mc.num_kv_heads // self.tp.size)
        num_pages = cfg.num_pages
        if not num_pages:
            if self.device.type == "cuda":
                free, _ = torch.cuda.mem_get_info(self.device)
                per_page = 2 * mc.num_layers * page_size * kv_heads * mc.head_dim * mc.torch_dtype.itemsize
                num_pages = kv_pool_bytes(free_at_start, free, cfg.kv_cache_memory_fraction, cfg.mem_fraction_static) // per_page
            else:
                num_pages = 1024
        if cfg.max_total_tokens:  # SGLang's cap, in whole pages
            num_pages = min(num_pages, max(2, cfg.max_total_tokens // page_size))
        if self.tp.size > 1:  # rank 0 hands out pages for every rank: use what the smallest rank holds
            pages = torch.tensor([num_pages], dtype=torch.int64, device=self.device)
            dist.all_reduce(pages, op=dist.ReduceOp.MIN, group=self.tp.group)
            num_pages = int(pages.item())
        return KVCacheStorage(num_layers=mc.num_layers, num_pages=num_pages, page_size=page_size,
                           num_kv_heads=kv_heads, head_dim=mc.head_dim, dtype=mc.torch_dtype, device=self.device)

    def _make_routed_experts(self) -> RoutedExpertsTable | None:
        mc, kv = self.model_config, self.kv_cache
        if not self.config.enable_return_routed_experts:
            return None
        return RoutedExpertsTable.create(num_slots=(kv.num_pages + 1) * kv.page_size, num_layers=mc.num_layers,
                                         top_k=mc.num_experts_per_tok, page_size=kv.page_size, device=self.device)

    @property
    def routed_experts_ids(self) -> torch.Tensor | None:
        """The table the MoE layers write (the forward context's `routed_experts`), or None when off."""
        return None if self.routed_experts is None else self.routed_experts.ids

    def _make_attention(self):
        backend = self.config.attention_backend
        if backend == "auto":
            backend = "triton" if self.device.type == "cuda" else "torch"
        if backend == "triton":
            if self.device.type != "cuda":
                raise HotswapError("attention_backend 'triton' needs a CUDA device")
            return TritonAttention(self.kv_cache)
        return TorchAttention(self.kv_cache)  # "torch" (EngineConfig refuses other names)

    def close(self) -> None:
        """Free the device memory this runner holds, at engine shutdown: the engine object (and the
        reference cycles between its components) may outlive it in the caller's hands."""
        if self.cuda_graphs is not None:
            self.cuda_graphs.release()
        self.kv_cache.free_storage()
        for param in self.model.parameters():
            param.data = torch.empty(0, dtype=param.dtype, device=param.device)
        self.model.model.rotary.cos_sin = torch.empty(0, device=self.device)
        self.weight_map = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def rebuild_weight_map(self) -> None:
        """Parameter storage moved (memory resume): refresh the views every transport copies into."""
        self.weight_map = WeightMap(self.model)

    def use_skinny_matmul(self, rows: int) -> bool:
        return skinny_matmul.enabled(rows, self.model_config.torch_dtype, self.device, self.config.enable_skinny_matmul)

    def use_rows_matmul(self, rows: int) -> bool:
        return self.config.enable_skinny_matmul and rows_matmul.enabled(rows, self.model_config.torch_dtype, self.device)

    def to_device(self, a) -> torch.Tensor:
        t = torch.from_numpy(a)
        if self.device.type == "cuda":
            return t.pin_memory().to(self.device, non_blocking=True)
        return t

    def device_context(self, hb: HostBatch) -> tuple[torch.Tensor, ForwardContext, torch.Tensor]:
        ctx = ForwardContext(
            positions=self.to_device(hb.positions),
            slot_mapping=self.to_device(hb.slot_mapping),
            page_table=self.to_device(hb.page_table),
            cu_seqlens_q=self.to_device(hb.cu_seqlens_q),
            seq_lens=self.to_device(hb.seq_lens),
            max_q_len=hb.max_q_len,
            is_decode=hb.is_decode,
            attention=self.attention,
            skinny_matmul=self.use_skinny_matmul(len(hb.input_ids)), rows_matmul=self.use_rows_matmul(len(hb.input_ids)),
            routed_experts=self.routed_experts_ids,
            decode_order=self.to_device(hb.longest_first()) if hb.is_decode else None,
        )
        return self.to_device(hb.input_ids), ctx, self.to_device(hb.logits_indices)

    def sampling_batch(self, entries: list[BatchEntry], graph_rows: tuple[torch.Tensor, torch.Tensor] | None = None) -> SamplingBatch:
        """The sampled rows' parameters, read from the row table once `entries` are written into it (only rows
        whose request changed are rewritten; a row that does not convert raises BatchRowError naming it, so
        only its request fails). `graph_rows`: a decode graph's staged (floats, ints) on the device, which
        this step's upload fills from the same table: the sampler reads them there, nothing is uploaded twice."""
        table = self.row_params
        table.update(entries)
        n = len(entries)
        rows = table.summary(n)
        original = self.config.return_original_logprob
        if rows.all_greedy:
            return SamplingBatch(None, None, None, None, None, None, all_greedy=True, needs_filter=False,
                                 needs_logprobs=rows.needs_logprobs, max_top_logprobs=rows.max_top_logprobs, original_logprobs=original,
                                 keep_greedy_rows=list(rows.keep_greedy_rows))
        f, i = graph_rows if graph_rows is not None else self.row_columns(n)
        (temperatures, top_ps, min_ps), (top_ks, seeds, steps) = f.unbind(), i.unbind()  # the rows' views, two calls not six
        return SamplingBatch(
            temperatures=temperatures, top_ps=top_ps, min_ps=min_ps, top_ks=top_ks, seeds=seeds, steps=steps, all_greedy=False,
            needs_filter=rows.needs_filter, needs_logprobs=rows.needs_logprobs, max_top_logprobs=rows.max_top_logprobs,
            original_logprobs=original, keep_greedy_rows=list(rows.keep_greedy_rows), keep_filtered_rows=list(rows.keep_filtered_rows),
        )

    def row_columns(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The row table's first n rows on the device as (floats [3, n], ints [3, n]) views whose columns each start
        16-byte aligned: the copies hold a multiple of 4 rows. Triton specialises a kernel on its pointers'
        alignment, so a batch of n rows that left top_p or a seed unaligned compiled the sampling kernels again
        (about a second, in the middle of serving: the first odd-sized eager step, e.g. an HTTP prefill)."""
        padded = aligned_rows(n)
        table = self.row_params
        floats = np.zeros((3, padded), dtype=np.float32)
        ints = np.zeros((3, padded), dtype=np.int64)
        floats[:, :n], ints[:, :n] = table.floats[:, :n], table.ints[:, :n]
        return self.to_device(floats)[:, :n], self.to_device(ints)[:, :n]

    def pending_rows(self, entries: list[BatchEntry], row_offsets: np.ndarray | None) -> np.ndarray | None:
        """The inputs still on the device (sampled by the step in flight): int64 [2, k] of (row in this
        batch's input_ids, row in the previous step's sampled ids), or None when every input is known.
        `row_offsets`: each entry's first input row (None: entry i is row i, a decode batch)."""
        prev = np.fromiter(map(_PREV_ROW, entries), dtype=np.int64, count=len(entries))
        which = np.flatnonzero(prev >= 0)
        if not len(which):
            return None
        rows = which if row_offsets is None else row_offsets[which].astype(np.int64)
        return np.array((rows, prev[which]))

    @torch.inference_mode()
    def run(self, entries: list[BatchEntry], prev_token_ids: torch.Tensor | None = None) -> SampleResult | None:
        """Forward the batch; sample for the entries with `sample` set (in their order) and score the prompt
        rows entries ask logprobs for. Inputs marked `prev_row` are filled on the device from
        `prev_token_ids` (the step before, still in flight)."""
        to_sample = list(compress(entries, map(_SAMPLE, entries)))  # per-row passes in C: `map` over attribute getters
        penalized = any(map(_PENALIZED, to_sample))
        hb = HostBatch.build(entries, self.kv_cache.page_size, self.page_table)
        graphs = self.cuda_graphs
        decode_graph = graphs is not None and graphs.can_run(hb, penalized)
        # built before the forward: a row that cannot run fails alone (BatchRowError) with nothing computed. A
        # decode graph step samples every entry: the graph's staged parameters are the table's first rows
        sb = self.sampling_batch(to_sample, graphs.sampling_rows(len(entries)) if decode_graph else None) if to_sample else None
        presampled = None
        if decode_graph:
            fix = self.pending_rows(entries, None)
            n, table = len(entries), self.row_params
            rows = table.floats[:, :n], table.ints[:, :n]
            if self.tp_peers is None:
                logits, presampled = graphs.replay(hb, fix, rows, prev_token_ids)
            else:  # the workers replay the same bucket; the sampled ids reach them inside the graph
                logits, presampled = self.tp_peers.forward(hb, fix, StepMode.DECODE_GRAPH, lambda: graphs.replay(hb, fix, rows, prev_token_ids))
        else:
            fix = self.pending_rows(entries, hb.cu_seqlens_q)
            if graphs is not None and graphs.can_run_extend(entries):
                mode, compute = StepMode.EXTEND_GRAPH, lambda: graphs.run_extend(hb, fix, prev_token_ids)
            else:
                mode, compute = StepMode.EAGER, lambda: self.forward(hb, fix, prev_token_ids)
            logits = compute() if self.tp_peers is None else self.tp_peers.forward(hb, fix, mode, compute)
        if logits is None:
            return None
        n = len(to_sample)
        if n:
            sample_logits = logits[:n]
            if penalized:
                sample_logits = apply_penalties(sample_logits, to_sample, prev_token_ids, self.to_device)
            result = sample(sample_logits, sb, presampled)
            if self.tp_peers is not None and presampled is None:  # a decode graph's ids reached the workers inside it
                self.tp_peers.send_sampled(result.token_ids)
        else:
            result = empty_result(self.device)
        if len(hb.prompt_rows):  # some entry scores prompt rows (tested without a pass over every entry)
            scored = [e for e in entries if e.prompt_targets]
            targets = self.to_device(np.array([t for e in scored for t in e.prompt_targets], dtype=np.int64))
            top_k = max(e.params.top_logprobs_num for e in scored)
            result.prompt_logprobs, result.prompt_top_values, result.prompt_top_ids = score_prompt_rows(logits[n:], targets, top_k)
        result.copy_to_host()
        return result

    @torch.inference_mode()
    def forward(self, hb: HostBatch, fix: np.ndarray | None, prev_token_ids: torch.Tensor | None) -> torch.Tensor | None:
        """The model on one host-built batch (tensor-parallel workers call this too): the logits of its
        sampled rows, then of its scored prompt rows; None when there are neither. `fix` rows take their
        input from `prev_token_ids`."""
        input_ids, ctx, logits_idx = self.device_context(hb)
        if fix is not None:
            idx = self.to_device(fix)
            input_ids[idx[0]] = prev_token_ids[idx[1]]
        hidden = self.model(input_ids, ctx)
        if not len(hb.logits_indices) and not len(hb.prompt_rows):
            return None
        if len(hb.prompt_rows):
            logits_idx = torch.cat([logits_idx, self.to_device(hb.prompt_rows)])
        elif hb.is_decode and len(hb.logits_indices) == len(hb.input_ids):  # every row samples, in order: no gather
            return self.model.compute_logits(hidden)
        return self.model.compute_logits(hidden[logits_idx])
