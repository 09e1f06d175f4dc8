"""Batched sampling on the device with per-request parameters.

Randomness comes from a counter-based hash of (seed, output step, token id), so a seeded request samples
the same tokens whatever batch it lands in, and no host round trip or generator state is needed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hotswap.kernels import argmax

_M32 = 0xFFFFFFFF


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


@dataclass(slots=True)
class SampleResult:
    token_ids: torch.Tensor  # int64 [B]
    logprobs: torch.Tensor | None  # float32 [B]: log_softmax of the raw logits at the chosen token
    top_logprob_values: torch.Tensor | None  # [B, k]
    top_logprob_ids: torch.Tensor | None
    host: tuple | None = None  # the same tensors copied to the host, valid once `ready` completes
    ready: torch.cuda.Event | None = None

    def copy_to_host(self) -> None:
        """Start the device-to-host copy now, ahead of later work queued on the stream; `to_lists` waits
        for this copy only (not for whatever was launched after it)."""
        tensors = (self.token_ids, self.logprobs, self.top_logprob_values, self.top_logprob_ids)
        if self.token_ids.is_cuda:
            self.host = tuple(t.to("cpu", non_blocking=True) if t is not None else None for t in tensors)
            self.ready = torch.cuda.Event()
            self.ready.record()
        else:
            self.host = tensors

    def to_lists(self) -> tuple[list, list | None, list | None, list | None]:
        if self.host is None:
            self.copy_to_host()
        if self.ready is not None:
            self.ready.synchronize()
        return tuple(t.tolist() if t is not None else None for t in self.host)


def sample(logits: torch.Tensor, sb: SamplingBatch, greedy_ids: torch.Tensor | None = None) -> SampleResult:
    """logits [B, V] in the model's dtype -> chosen ids and their logprobs under the unmodified distribution.
    `greedy_ids`: the argmax of these logits when already taken (inside a decode CUDA graph).

    Greedy ids come from the logits as they are (casting to float32 is exact, so the argmax is the same);
    temperature sampling and logprobs work in float32. A greedy batch without logprobs never pays for the
    float32 copy of its [B, V] logits (at batch 256 on a 152K vocabulary, 155 MB written and read again)."""
    if greedy_ids is None:
        greedy_ids = argmax.argmax_rows(logits) if argmax.available(logits) else logits.argmax(dim=-1)
    if not sb.all_greedy or sb.needs_logprobs or sb.max_top_logprobs:
        logits = logits.float()
    if sb.all_greedy:
        ids = greedy_ids
    else:
        temps = sb.temperatures.clamp_min(1e-5).unsqueeze(1)
        scaled = logits / temps
        noise = gumbel_noise(sb.seeds, sb.steps, logits.shape[1])
        if sb.needs_filter:
            scaled = _filter(scaled, sb)
        sampled = (scaled + noise).argmax(dim=-1)
        ids = torch.where(sb.temperatures == 0, greedy_ids, sampled)
    chosen = top_v = top_i = None
    if sb.needs_logprobs or sb.max_top_logprobs:
        logprobs_all = torch.log_softmax(logits, dim=-1)
        chosen = logprobs_all.gather(1, ids.unsqueeze(1)).squeeze(1)
        if sb.max_top_logprobs:
            top_v, top_i = logprobs_all.topk(sb.max_top_logprobs, dim=-1)
    return SampleResult(ids, chosen, top_v, top_i)


def _filter(scaled: torch.Tensor, sb: SamplingBatch) -> torch.Tensor:
    """Mask tokens outside top-k, the top-p nucleus and the min-p floor with -inf."""
    sorted_logits, order = scaled.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    rank = torch.arange(scaled.shape[1], device=scaled.device).unsqueeze(0)
    remove = rank >= sb.top_ks.unsqueeze(1)
    remove |= (probs.cumsum(dim=-1) - probs) > sb.top_ps.unsqueeze(1)
    remove |= probs < (sb.min_ps.unsqueeze(1) * probs[:, :1])
    remove[:, 0] = False  # the most likely token always survives
    sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
    return torch.full_like(scaled, float("-inf")).scatter(1, order, sorted_logits)
