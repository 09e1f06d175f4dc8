"""The per-layer elementwise kernels of a decode step: per-head RMSNorm + rotary + K/V store
(`fused.qk_norm_rope`, both of its kernels), beside the eager PyTorch ops it replaces and the bandwidth floor.

Qwen3-0.6B shape (Hq 16, Hkv 8, D 128, bf16). Timed as a decode step runs them: one CUDA graph of 28 calls,
each on its own layer's tensors, us per call.

    python bench/fused_kernels.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import d2d_bytes_per_s, graph_time_us, print_table  # noqa: E402

from hotswap.kernels import fused  # noqa: E402
from hotswap.models.layers import RotaryEmbedding  # noqa: E402

HQ, HK, D, LAYERS, PAGES, PAGE = 16, 8, 128, 28, 600, 16


def eager_reference(q, k, v, qw, kw, rot, pos, k_cache, v_cache, slots):
    """What the fused kernel replaces: per-head RMSNorm, rotary, two scatters into the cache."""
    def norm(x, w):
        xf = x.float()
        return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(x.dtype)
    rq, rk = rot(pos, norm(q, qw), norm(k, kw))
    q.copy_(rq)
    k.copy_(rk)
    k_cache.view(-1, HK, D).index_copy_(0, slots, rk)
    v_cache.view(-1, HK, D).index_copy_(0, slots, v)


def main() -> None:
    rot = RotaryEmbedding(D, 4096, 1e6, None, torch.device("cuda"))
    qw, kw = torch.randn(D, device="cuda", dtype=torch.bfloat16), torch.randn(D, device="cuda", dtype=torch.bfloat16)
    rows = []
    for tokens in (1, 64, 256, 8192):
        qkv = torch.randn(LAYERS, tokens, (HQ + 2 * HK) * D, device="cuda", dtype=torch.bfloat16)
        k_cache = torch.zeros(LAYERS, PAGES, PAGE, HK, D, device="cuda", dtype=torch.bfloat16)
        v_cache = torch.zeros_like(k_cache)
        pos = torch.randint(0, 4000, (tokens,), device="cuda")
        slots = torch.randperm(PAGES * PAGE, device="cuda")[:tokens]

        def timed(fn) -> float:
            layer = iter(i % LAYERS for i in range(10**9))

            def call():
                i = next(layer)
                q, k, v = (t.view(tokens, -1, D) for t in qkv[i].split([HQ * D, HK * D, HK * D], dim=-1))
                fn(q, k, v, k_cache[i], v_cache[i])

            return graph_time_us(call, LAYERS, reps=10)

        def fused_with(min_tokens):
            def fn(q, k, v, kc, vc):
                fused.TOKEN_GRID_MIN_TOKENS = min_tokens
                fused.qk_norm_rope(q, k, qw, kw, rot.cos_sin, pos, 1e-6, kv_store=(v, kc, vc, slots))
            return fn

        default = fused.TOKEN_GRID_MIN_TOKENS
        per_head, per_token = timed(fused_with(10**9)), timed(fused_with(1))
        fused.TOKEN_GRID_MIN_TOKENS = default
        eager = timed(lambda q, k, v, kc, vc: eager_reference(q, k, v, qw, kw, rot, pos, kc, vc, slots))
        moved = tokens * D * 2 * (HQ + 2 * HK + HQ + HK + 2 * HK)  # read q, k, v; write q, k and the cache's k, v
        chosen = "per token" if tokens >= default else "per (token, head)"
        rows.append([tokens, f"{per_head:.2f}", f"{per_token:.2f}", chosen, f"{eager:.2f}", f"{moved / d2d_bytes_per_s(torch.device('cuda')) * 1e6:.2f}"])
    print_table("qk_norm_rope + K/V store, us per call (28 layers in one CUDA graph)",
                ["tokens", "per (token, head) kernel", "per-token kernel", "used", "eager PyTorch (peer)",
                 f"floor at {d2d_bytes_per_s(torch.device('cuda')) / 1e12:.2f} TB/s (measured)"], rows)


if __name__ == "__main__":
    main()
