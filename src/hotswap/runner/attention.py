"""Attention backends over the paged KV cache: plain PyTorch (CPU, reference) and Triton (CUDA)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hotswap.models.forward_context import ForwardContext
from hotswap.runner.kv_cache import KVCacheStorage


def store_kv(kv_cache: KVCacheStorage, layer: int, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Write this step's K/V rows into their page slots."""
    k_cache = kv_cache.k_cache(layer).view(-1, kv_cache.num_kv_heads, kv_cache.head_dim)
    v_cache = kv_cache.v_cache(layer).view(-1, kv_cache.num_kv_heads, kv_cache.head_dim)
    k_cache.index_copy_(0, slot_mapping, k.to(k_cache.dtype))
    v_cache.index_copy_(0, slot_mapping, v.to(v_cache.dtype))


def _gather_heads(cache: torch.Tensor, pages: torch.Tensor, group: int, live: torch.Tensor | None = None) -> torch.Tensor:
    """The KV rows of `pages` ([..., n]) as [..., H, n * page_size, D], each kv head repeated for its
    `group` query heads; rows where `live` ([..., L]) is False are zeroed (in the gathered copy, before the
    repeat: a pass over Hkv heads, not H)."""
    rows = cache[pages].flatten(-4, -3)  # [..., L, Hkv, D], a copy: the cache is never written here
    if live is not None:
        rows.masked_fill_(~live[..., None, None], 0.0)
    return rows.transpose(-3, -2).repeat_interleave(group, dim=-3)


class _PagedBackend:
    def __init__(self, kv_cache: KVCacheStorage):
        self.storage = kv_cache

    def kv_cache(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.storage.k_cache(layer), self.storage.v_cache(layer)

    def forward(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                ctx: ForwardContext) -> torch.Tensor:
        store_kv(self.storage, layer, k, v, ctx.slot_mapping)
        return self.attend(layer, q, scale, ctx)


class TorchAttention(_PagedBackend):
    """Reference backend: gathers each sequence's pages and runs SDPA with a causal offset mask."""

    def attend(self, layer: int, q: torch.Tensor, scale: float, ctx: ForwardContext) -> torch.Tensor:
        k_cache, v_cache = self.kv_cache(layer)
        if ctx.is_decode:
            return self._decode(q, k_cache, v_cache, scale, ctx)
        page_size = self.storage.page_size
        out = torch.empty_like(q)
        cu = ctx.cu_seqlens_q.tolist()
        lens = ctx.seq_lens.tolist()
        group = q.shape[1] // k_cache.shape[2]
        for b, kv_len in enumerate(lens):
            q_start, q_end = cu[b], cu[b + 1]
            n_pages = (kv_len + page_size - 1) // page_size
            pages = ctx.page_table[b, :n_pages].long()
            kb = _gather_heads(k_cache, pages, group)[:, :kv_len]  # [H, kv_len, D]
            vb = _gather_heads(v_cache, pages, group)[:, :kv_len]
            qb = q[q_start:q_end].transpose(0, 1)  # [H, q_len, D]
            q_len = q_end - q_start
            q_pos = torch.arange(kv_len - q_len, kv_len, device=q.device).unsqueeze(1)
            mask = torch.arange(kv_len, device=q.device).unsqueeze(0) <= q_pos
            o = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask, scale=scale)
            out[q_start:q_end] = o.transpose(0, 1)
        return out

    def _decode(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, scale: float, ctx: ForwardContext) -> torch.Tensor:
        """One query per sequence: gather every sequence's pages at once and mask past its length. The rows past a
        length (the rest of its last page, other sequences' longer tails, padding pages) hold whatever an earlier
        owner of the page left; they are zeroed, not only masked: a stale NaN or inf there (a request run on
        weights that overflowed) would turn the masked score and the zero-weighted value into NaN."""
        ps = self.storage.page_size
        lens = ctx.seq_lens.long()
        n_pages = int((lens.max() + ps - 1) // ps)
        pages = ctx.page_table[:, :n_pages].long()
        group = q.shape[1] // k_cache.shape[2]
        mask = torch.arange(n_pages * ps, device=q.device).unsqueeze(0) < lens.unsqueeze(1)  # [B, L]
        kb = _gather_heads(k_cache, pages, group, mask)  # [B, H, L, D]
        vb = _gather_heads(v_cache, pages, group, mask)
        o = F.scaled_dot_product_attention(q.unsqueeze(2), kb, vb, attn_mask=mask[:, None, None, :], scale=scale)
        return o.squeeze(2)


class TritonAttention(_PagedBackend):
    """CUDA backend: split-KV decode and paged prefill kernels from hotswap.kernels."""

    def __init__(self, kv_cache: KVCacheStorage):
        from hotswap.kernels import triton_attention

        super().__init__(kv_cache)
        self.kernels = triton_attention

    def attend(self, layer: int, q: torch.Tensor, scale: float, ctx: ForwardContext) -> torch.Tensor:
        k_cache, v_cache = self.kv_cache(layer)
        if ctx.is_decode:
            return self.kernels.paged_decode_attention(q, k_cache, v_cache, ctx.page_table, ctx.seq_lens, scale,
                                                       order=ctx.decode_order)
        return self.kernels.paged_prefill_attention(
            q, k_cache, v_cache, ctx.page_table, ctx.cu_seqlens_q, ctx.seq_lens, ctx.max_q_len, scale,
            tiles=ctx.prefill_tiles,
        )
