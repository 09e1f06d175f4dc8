"""Batched sampling on the device with per-request parameters.

Randomness comes from a counter-based hash of (seed, output step, token id), so a seeded request samples
the same tokens whatever batch it lands in, and no host round trip or generator state is needed.

On CUDA the fused kernels of kernels/sampling.py do the work (and the decode CUDA graphs run them
inside the graph); the PyTorch code here is the reference they are tested against and the CPU path.
Both compute one function, whose semantics kernels/sampling.py documents: thresholds rather than sorted
ranks (ties at a boundary are kept together), filters measured on the unfiltered temperature-scaled
distribution, logprobs of that distribution (SGLang's default) or of the raw logits (`original_logprobs`,
SGLang's SGLANG_RETURN_ORIGINAL_LOGPROB).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hotswap.kernels import argmax, sampling

_M32 = 0xFFFFFFFF
MIN_TEMPERATURE = 1e-5  # sampled rows divide by at least this (the kernels use the same floor)


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer mix on int64 lanes; constants < 2**31 keep every product inside int64."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x2C1B3C6D) & _M32
    return x ^ (x >> 16)


def gumbel_noise(seeds: torch.Tensor, steps: torch.Tensor, vocab: int) -> torch.Tensor:
    """[B, vocab] Gumbel(0, 1) noise determined by each row's (seed, step)."""
    key = _hash32((seeds & _M32) ^ _hash32((steps & _M32) ^ _hash32((seeds >> 32) & _M32)))
    ids = torch.arange(vocab, device=seeds.device, dtype=torch.int64)
    h = _hash32(_hash32(ids.unsqueeze(0) ^ key.unsqueeze(1)) ^ _hash32(key ^ 0x5BD1E995).unsqueeze(1))
    u = ((h >> 8).to(torch.float32) + 0.5) * (1.0 / (1 << 24))
    return -torch.log(-torch.log(u))


@dataclass(slots=True)
class SamplingBatch:
    """Per-row sampling parameters as device tensors; built only when some row does not sample greedily."""

    temperatures: torch.Tensor | None  # float32 [B]; 0 = greedy
    top_ps: torch.Tensor | None  # float32 [B]
    top_ks: torch.Tensor | None  # int64 [B]; vocab size = off
    min_ps: torch.Tensor | None  # float32 [B]
    seeds: torch.Tensor | None  # int64 [B]
    steps: torch.Tensor | None  # int64 [B]; index of the token being sampled in the output
    all_greedy: bool
    needs_filter: bool
    needs_logprobs: bool
    max_top_logprobs: int
    original_logprobs: bool = False  # logprobs of the raw logits instead of the temperature-scaled distribution
    # rows that asked for their keep-set (slime's return_top_p_token_ids): greedy rows, rows with a filter
    keep_greedy_rows: list[int] | None = None
    keep_filtered_rows: list[int] | None = None


@dataclass(slots=True)
class SampleResult:
    token_ids: torch.Tensor  # int64 [B]
    logprobs: torch.Tensor | None  # float32 [B]: log_softmax of the raw logits at the chosen token
    top_logprob_values: torch.Tensor | None  # [B, k]
    top_logprob_ids: torch.Tensor | None
    # the kept ids of the rows that asked (keep_rows): flat, row after row, keep_counts[i] of them for row i
    keep_ids: torch.Tensor | None = None
    keep_counts: torch.Tensor | None = None
    keep_rows: list[int] | None = None
    # prompt logprobs of the batch's scored prompt rows (HostBatch.prompt_rows order), top-k beside them
    prompt_logprobs: torch.Tensor | None = None
    prompt_top_values: torch.Tensor | None = None
    prompt_top_ids: torch.Tensor | None = None
    host: tuple | None = None  # the tensors copied to the host, valid once `ready` completes
    ready: torch.cuda.Event | None = None
    lists: tuple | None = None  # `host` as Python lists, made once

    def _tensors(self) -> tuple:
        return (self.token_ids, self.logprobs, self.top_logprob_values, self.top_logprob_ids, self.keep_ids, self.keep_counts,
                self.prompt_logprobs, self.prompt_top_values, self.prompt_top_ids)

    def copy_to_host(self) -> None:
        """Start the device-to-host copy now, ahead of later work queued on the stream; `to_lists` waits
        for this copy only (not for whatever was launched after it)."""
        tensors = self._tensors()
        if self.token_ids.is_cuda:
            self.host = tuple(t.to("cpu", non_blocking=True) if t is not None else None for t in tensors)
            self.ready = torch.cuda.Event()
            self.ready.record()
        else:
            self.host = tensors

    def _host_lists(self) -> tuple:
        if self.lists is None:
            if self.host is None:
                self.copy_to_host()
            if self.ready is not None:
                self.ready.synchronize()
            self.lists = tuple(t.tolist() if t is not None else None for t in self.host)
        return self.lists

    def to_lists(self) -> tuple[list, list | None, list | None, list | None]:
        """(ids, logprobs, top values, top ids) of the sampled rows."""
        return self._host_lists()[:4]

    def keep_sets(self) -> list[list[int] | None]:
        """Per sampled row: the ids its filters kept (None where not asked for, or no filter applied)."""
        out: list[list[int] | None] = [None] * len(self.token_ids)
        lists = self._host_lists()
        if self.keep_rows:
            flat, counts = lists[4], lists[5]
            at = 0
            for row, n in zip(self.keep_rows, counts):
                out[row] = flat[at : at + n]
                at += n
        return out

    def prompt_lists(self) -> tuple[list, list | None, list | None]:
        """(logprobs, top values, top ids) of the scored prompt rows; empty lists when none."""
        if self.prompt_logprobs is None:
            return [], None, None
        lists = self._host_lists()
        return lists[6], lists[7], lists[8]


def empty_result(device: torch.device) -> SampleResult:
    """A step that samples nothing (a chunk of a prompt) but scored prompt rows."""
    return SampleResult(torch.zeros(0, dtype=torch.int64, device=device), None, None, None)


def sample(logits: torch.Tensor, sb: SamplingBatch,
           presampled: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> SampleResult:
    """logits [B, V] in the model's dtype -> chosen ids and their logprobs. `presampled`: (ids, logprobs,
    log-sum-exp) the fused kernels already computed for these logits (inside a decode CUDA graph).

    A greedy batch without logprobs takes the argmax alone: it never pays for a float32 pass."""
    wants_lse = sb.needs_logprobs or sb.max_top_logprobs > 0
    if presampled is not None:
        ids, lps, lse = presampled
    elif sampling.available(logits):
        if sb.all_greedy and not wants_lse:
            ids, lps, lse = argmax.argmax_rows(logits), None, None
        else:
            ids, lps, lse = sampling.sample_rows(logits, None if sb.all_greedy else sb.temperatures, sb.top_ks, sb.top_ps,
                                                 sb.min_ps, sb.seeds, sb.steps, original=sb.original_logprobs)
    else:
        ids, lps, lse = reference_sample(logits, sb, wants_lse)
    top_v = top_i = None
    if sb.max_top_logprobs:
        vals, top_i = logits.topk(sb.max_top_logprobs, dim=-1)
        top_v = vals.float() / logprob_temperatures(sb, logits).unsqueeze(1) - lse.unsqueeze(1)
    result = SampleResult(ids, lps if sb.needs_logprobs or sb.max_top_logprobs else None, top_v, top_i)
    if sb.keep_greedy_rows or sb.keep_filtered_rows:
        result.keep_ids, result.keep_counts, result.keep_rows = keep_sets(logits, ids, sb)
    return result


def keep_sets(logits: torch.Tensor, ids: torch.Tensor, sb: SamplingBatch) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """The ids the filters kept for the rows that asked: a greedy row keeps its argmax alone, a filtered row
    the set `kept` defines (the same function as the fused kernel's) with the sampled token forced in, so a
    float rounding at the set's boundary between kernel and reference can never leave it out (slime's
    replay keeps it too). Rows sampled without a filter keep the whole vocabulary: nothing is returned."""
    greedy, filtered = sb.keep_greedy_rows or [], sb.keep_filtered_rows or []
    parts, counts = [ids[greedy]] if greedy else [], [torch.ones(len(greedy), dtype=torch.int64, device=ids.device)]
    if filtered:
        rows = torch.tensor(filtered, dtype=torch.int64, device=ids.device)
        sub = SamplingBatch(sb.temperatures[rows], sb.top_ps[rows], sb.top_ks[rows], sb.min_ps[rows], None, None,
                            all_greedy=False, needs_filter=True, needs_logprobs=False, max_top_logprobs=0)
        x = logits[rows].float()
        mask = kept(x, sub.temperatures.clamp_min(MIN_TEMPERATURE).unsqueeze(1), sub)
        mask[torch.arange(len(filtered), device=ids.device), ids[rows]] = True
        parts.append(mask.nonzero()[:, 1])
        counts.append(mask.sum(dim=-1))
    return torch.cat(parts), torch.cat(counts), greedy + filtered


def logprob_temperatures(sb: SamplingBatch, logits: torch.Tensor) -> torch.Tensor:
    """float32 [B]: the temperature each row's logprobs are taken at (1 for greedy rows and raw logprobs)."""
    if sb.all_greedy or sb.original_logprobs:
        return torch.ones(logits.shape[0], dtype=torch.float32, device=logits.device)
    return torch.where(sb.temperatures > 0, sb.temperatures.clamp_min(MIN_TEMPERATURE), 1.0)


def reference_sample(logits: torch.Tensor, sb: SamplingBatch, wants_lse: bool = True
                     ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """The PyTorch version of kernels/sampling.py `sample_rows`, in float32: (ids, logprobs, log-sum-exp)."""
    x = logits.float()
    greedy = x.argmax(dim=-1)
    if sb.all_greedy:
        ids = greedy
    else:
        ts = sb.temperatures.clamp_min(MIN_TEMPERATURE).unsqueeze(1)
        scores = x / ts + gumbel_noise(sb.seeds, sb.steps, x.shape[1])
        if sb.needs_filter:
            scores = scores.masked_fill(~kept(x, ts, sb), float("-inf"))
        ids = torch.where(sb.temperatures > 0, scores.argmax(dim=-1), greedy)
    if not wants_lse:
        return ids, None, None
    te = logprob_temperatures(sb, x).unsqueeze(1)
    lse = torch.logsumexp(x / te, dim=-1)
    return ids, x.gather(1, ids.unsqueeze(1)).squeeze(1) / te.squeeze(1) - lse, lse


def kept(x: torch.Tensor, ts: torch.Tensor, sb: SamplingBatch) -> torch.Tensor:
    """bool [B, V]: the tokens top-k, top-p and min-p all keep (x: float32 logits, ts: [B, 1] temperatures)."""
    v = x.shape[1]
    m = x.max(dim=-1, keepdim=True).values
    keep = (x - m) / ts >= torch.log(sb.min_ps).unsqueeze(1)
    limited = sb.top_ks < v
    if bool(limited.any()):
        kmax = int(sb.top_ks[limited].max())
        kth = x.topk(kmax, dim=-1).values.gather(1, (sb.top_ks.clamp(1, kmax) - 1).unsqueeze(1))
        keep &= x >= torch.where(limited.unsqueeze(1), kth, float("-inf"))
    if bool((sb.top_ps < 1.0).any()):
        s = x.sort(dim=-1, descending=True).values
        cum = torch.exp((s - m) / ts).cumsum(dim=-1)
        n_gt = v - torch.searchsorted(s.flip(-1).contiguous(), s.contiguous(), right=True)  # tokens strictly above each
        above = torch.where(n_gt > 0, cum.gather(1, (n_gt - 1).clamp_min(0)), 0.0)
        # at least one: a row whose logits hold a NaN keeps none by the comparison (and gathering at -1 would fail
        # the whole batch, every other request in it aborted); such a row's sample is its own
        n_keep = (above <= sb.top_ps.unsqueeze(1) * cum[:, -1:]).sum(dim=-1, keepdim=True).clamp_min(1)
        keep &= x >= s.gather(1, n_keep - 1)
    return keep
