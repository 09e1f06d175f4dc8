"""Benchmark the Triton paged-attention kernels (hotswap.kernels.triton_attention).

Decode: Qwen3-0.6B-like shape (Hq 16, Hkv 8, D 128, bf16, page 16) at batch 1/64/256 and
contexts 256/640/2048, timed with ``triton.testing.do_bench`` (median, L2 flushed before each
rep). Bytes moved = K+V read + q read + out written. Peer in the same run:
``torch.nn.functional.scaled_dot_product_attention`` on the same data gathered into contiguous
``[B, H, L, D]`` tensors beforehand (gathering not timed).

Kernel times are taken on CUDA-graph replays of one call (as the engine runs decode), so they
are device time including the graph launch but not Python/Triton host overhead; the "eager"
column times plain calls the same way and shows where host overhead (measured separately, in
us of CPU per call) is longer than the kernel.

Prefill: T = 64 * 128 tokens (several ragged layouts), FLOPs counted on the causal triangle.

Usage: PYTHONPATH=src python3 bench/attention_kernels.py [--sweep]
"""

import argparse
import functools
import math
import sys
import time

import torch
import torch.nn.functional as F
import triton
from common import graph_time_us

from hotswap.kernels import triton_attention as ta

DEV = "cuda"
HQ, HKV, D, PS = 16, 8, 128, 16
DT = torch.bfloat16


REP_MS = 200


def bench(fn):
    return triton.testing.do_bench(fn, warmup=25, rep=REP_MS, return_mode="median") * 1e-3  # s


def graphed(fn):
    """Capture one call of fn in a CUDA graph; return the replay callable."""
    fn()
    torch.cuda.synchronize()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    torch.cuda.synchronize()
    return g.replay


def bench_graph(fn):
    return bench(graphed(fn))


def host_overhead(fn, n=300):
    """CPU seconds per eager call (GPU work kept tiny by the caller)."""
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    return (t1 - t0) / n


@functools.cache
def d2d_bandwidth():
    n = 1 << 30
    a = torch.empty(n, dtype=torch.uint8, device=DEV).random_()
    b = torch.empty_like(a)
    t = triton.testing.do_bench(lambda: b.copy_(a), warmup=10, rep=100, return_mode="median") * 1e-3
    return 2 * n / t


def make_decode(B, ctx, hq=HQ, hkv=HKV, d=D, ps=PS, dtype=DT, seed=0):
    g = torch.Generator(device=DEV)
    g.manual_seed(seed)
    pages_per = -(-ctx // ps)
    num_pages = B * pages_per
    k = torch.randn(num_pages, ps, hkv, d, device=DEV, dtype=dtype, generator=g)
    v = torch.randn(num_pages, ps, hkv, d, device=DEV, dtype=dtype, generator=g)
    pt = torch.randperm(num_pages, device=DEV, generator=g).to(torch.int32).view(B, pages_per)
    q = torch.randn(B, hq, d, device=DEV, dtype=dtype, generator=g)
    seq = torch.full((B,), ctx, dtype=torch.int32, device=DEV)
    return q, k, v, pt, seq


def gather_contig(k_cache, pt, ctx):
    B = pt.shape[0]
    ps = k_cache.shape[1]
    pos = torch.arange(ctx, device=DEV)
    pages = pt[:, pos // ps].long()  # [B, ctx]
    x = k_cache[pages, (pos % ps)[None, :].expand(B, -1)]  # [B, ctx, Hkv, D]
    return x.permute(0, 2, 1, 3).contiguous()  # [B, Hkv, ctx, D]


def sdpa_fn(q4, k4, v4, scale, causal=False):
    """Return (callable, label). Prefers native GQA; falls back to expanded K/V."""
    try:
        F.scaled_dot_product_attention(q4, k4, v4, scale=scale, is_causal=causal, enable_gqa=True)
        return (lambda: F.scaled_dot_product_attention(q4, k4, v4, scale=scale, is_causal=causal,
                                                       enable_gqa=True)), "sdpa(gqa)"
    except Exception:
        g = q4.shape[1] // k4.shape[1]
        ke = k4.repeat_interleave(g, 1)
        ve = v4.repeat_interleave(g, 1)
        return (lambda: F.scaled_dot_product_attention(q4, ke, ve, scale=scale, is_causal=causal)), \
            "sdpa(expanded kv)"


def rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


def decode_bytes(B, ctx, hq=HQ, hkv=HKV, d=D, esize=2):
    return B * ctx * hkv * d * esize * 2 + 2 * B * hq * d * esize


def run_decode_table(shapes):
    rows = []
    for B, ctx in shapes:
        q, k, v, pt, seq = make_decode(B, ctx, seed=B * 7 + ctx)
        scale = 1.0 / math.sqrt(D)
        out = torch.empty_like(q)
        splits = ta.decode_plan(B, HKV, pt.shape[1] * PS, q.device).num_splits
        fn = functools.partial(ta.paged_decode_attention, q, k, v, pt, seq, scale, out=out)
        fn()
        te = bench(fn)
        t = bench_graph(fn)
        k4 = gather_contig(k, pt, ctx)
        v4 = gather_contig(v, pt, ctx)
        q4 = q.unsqueeze(2)  # [B, Hq, 1, D]
        sfn, label = sdpa_fn(q4, k4, v4, scale)
        ref = sfn().squeeze(2)
        err = rel(out, ref)
        ts = bench_graph(sfn)
        nb = decode_bytes(B, ctx)
        rows.append((B, ctx, splits, t, nb, ts, err, label, te))
        del k4, v4, k, v, fn
        torch.cuda.empty_cache()
    return rows


def print_decode_table(rows, peak):
    print(f"\n## decode: Hq {HQ}, Hkv {HKV}, D {D}, bf16, page {PS}; do_bench median, L2 flushed; "
          f"% of the copy ceiling measured in this run, {peak / 1e12:.2f} TB/s")
    print("(times: CUDA-graph replay of one call; 'eager us' = same kernel called from Python)")
    print(f"{'B':>4} {'ctx':>5} {'splits':>6} {'ours us':>8} {'MB moved':>9} {'GB/s':>7} {'% D2D':>8} "
          f"{'sdpa us':>8} {'sdpa GB/s':>9} {'sdpa/ours':>9} {'eager us':>8} {'relerr':>8}  peer")
    for B, ctx, splits, t, nb, ts, err, label, te in rows:
        print(f"{B:>4} {ctx:>5} {splits:>6} {t * 1e6:>8.1f} {nb / 1e6:>9.2f} {nb / t / 1e9:>7.0f} "
              f"{100 * nb / t / peak:>7.1f}% {ts * 1e6:>8.1f} {nb / ts / 1e9:>9.0f} {ts / t:>8.2f}x "
              f"{te * 1e6:>8.1f} {err:>8.1e}  {label}")


def rollout_lengths(B: int, seed: int = 0) -> torch.Tensor:
    """Contexts of B sequences midway through an RL rollout (bench/rollout.py's workload): a prompt of
    64-512 tokens plus part of a lognormal output (median 384, sigma 0.8, at most 2048), in random order."""
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(64, 513, (B,), generator=g)
    out = torch.exp(math.log(384) + 0.8 * torch.randn(B, generator=g)).clamp(32, 2048)
    return (prompt + out * torch.rand(B, generator=g)).to(torch.int32)


def decode_sweep(B: int, hq: int, configs, layers: int = 8, context: int | None = None, top: int | None = None):
    """Decode configs timed as the engine runs them: one CUDA graph of `layers` calls, each on its own layer's
    cache (nothing left in L2 from the call before), us per call. Contexts are a rollout's mixed ones, or all
    `context` long; pages scattered as a serving KV pool holds them. A config's `sorted` starts the sequences
    longest first (the order computed outside the graph, as the runner does once a step). Prints the `top`
    fastest configs (all by default) against the D2D floor of the bytes read."""
    lens = rollout_lengths(B, seed=B + hq) if context is None else torch.full((B,), context, dtype=torch.int32)
    pages = (lens + PS - 1) // PS
    width = int(pages.max())
    perm = torch.randperm(int(pages.sum()), device=DEV).to(torch.int32)
    pt = torch.zeros(B, width, dtype=torch.int32, device=DEV)
    o = 0
    for b, n in enumerate(pages.tolist()):
        pt[b, :n] = perm[o:o + n]
        o += n
    seq = lens.to(DEV)
    order = torch.argsort(seq, descending=True).to(torch.int32)
    kv = torch.randn(layers, 2, int(pages.sum()), PS, HKV, D, device=DEV, dtype=DT)
    q = torch.randn(B, hq, D, device=DEV, dtype=DT)
    out = torch.empty_like(q)
    nbytes = int(lens.sum()) * HKV * D * 2 * 2 + 2 * B * hq * D * 2
    floor = nbytes / d2d_bandwidth() * 1e6
    print(f"\n## decode: B {B}, Hq {hq}, Hkv {HKV}, contexts {int(lens.min())}-{int(lens.max())} "
          f"(mean {float(lens.float().mean()):.0f}), {nbytes / 1e6:.0f} MB a call; floor {floor:.1f} us at D2D", flush=True)
    ref = None
    res = []
    for cfg in configs:
        cfg = dict(cfg)
        if cfg.pop("sorted", False):
            cfg["order"] = order
        layer = iter(i % layers for i in range(10**9))

        def fn(cfg=cfg):
            cache = kv[next(layer)]
            ta._decode_launch(q, cache[0], cache[1], pt, seq, 0.088, out, **cfg)

        t = graph_time_us(fn, layers, reps=10)
        cache = kv[0]
        ta._decode_launch(q, cache[0], cache[1], pt, seq, 0.088, out, **cfg)
        if ref is None:
            ref = out.clone()
        err = float((out.float() - ref.float()).abs().max())
        shown = {k: v for k, v in cfg.items() if k != "order"} | {"sorted": "order" in cfg}
        res.append((t, shown, err))
    for t, shown, err in sorted(res, key=lambda r: r[0])[:top]:
        print(f"  {t:7.1f} us ({floor / t:4.0%} of the floor)  max |diff| vs first {err:.1e}  {shown}", flush=True)


def make_prefill(q_lens, prefixes, hq=HQ, hkv=HKV, d=D, ps=PS, dtype=DT, seed=0):
    g = torch.Generator(device=DEV)
    g.manual_seed(seed)
    kv_lens = [p + n for p, n in zip(prefixes, q_lens)]
    pages_per = [-(-n // ps) for n in kv_lens]
    num_pages = sum(pages_per)
    perm = torch.randperm(num_pages, device=DEV, generator=g).to(torch.int32)
    pt = torch.zeros(len(q_lens), max(pages_per), dtype=torch.int32, device=DEV)
    o = 0
    for b, n in enumerate(pages_per):
        pt[b, :n] = perm[o:o + n]
        o += n
    k = torch.randn(num_pages, ps, hkv, d, device=DEV, dtype=dtype, generator=g)
    v = torch.randn(num_pages, ps, hkv, d, device=DEV, dtype=dtype, generator=g)
    T = sum(q_lens)
    q = torch.randn(T, hq, d, device=DEV, dtype=dtype, generator=g)
    cu = torch.zeros(len(q_lens) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(q_lens), 0)
    seq = torch.tensor(kv_lens, dtype=torch.int32, device=DEV)
    flops = sum(4 * d * hq * (n * p + n * (n + 1) // 2) for p, n in zip(prefixes, q_lens))
    return q, k, v, pt, cu.to(DEV), seq, max(q_lens), flops


PREFILL_LAYOUTS = [
    ("64 x 128 new, prefix 0", [128] * 64, [0] * 64),
    ("64 x 128 new, prefix 512", [128] * 64, [512] * 64),
    ("8 x 1024 new, prefix 0", [1024] * 8, [0] * 8),
    ("1 x 8192 new, prefix 0", [8192], [0]),
]


def run_prefill_table():
    rows = []
    for name, q_lens, prefixes in PREFILL_LAYOUTS:
        q, k, v, pt, cu, seq, mq, flops = make_prefill(q_lens, prefixes, seed=len(q_lens))
        scale = 1.0 / math.sqrt(D)
        out = torch.empty_like(q)
        fn = functools.partial(ta.paged_prefill_attention, q, k, v, pt, cu, seq, mq, scale, out=out)
        fn()
        te = bench(fn)
        t = bench_graph(fn)
        ts, label, err = float("nan"), "-", float("nan")
        if all(p == 0 for p in prefixes) and len(set(q_lens)) == 1:
            B, n = len(q_lens), q_lens[0]
            q4 = q.view(B, n, HQ, D).transpose(1, 2).contiguous()
            k4 = gather_contig(k, pt, n)
            v4 = gather_contig(v, pt, n)
            sfn, label = sdpa_fn(q4, k4, v4, scale, causal=True)
            ref = sfn().transpose(1, 2).reshape(-1, HQ, D)
            err = rel(out, ref)
            ts = bench_graph(sfn)
        rows.append((name, sum(q_lens), t, flops, ts, err, label, te))
    return rows


def print_prefill_table(rows):
    print(f"\n## prefill/extend: Hq {HQ}, Hkv {HKV}, D {D}, bf16, page {PS}; causal FLOPs = 4*D*Hq*sum(attended)")
    print("(times: CUDA-graph replay of one call; 'eager us' = called from Python; "
          "sdpa only where the layout is a dense causal batch)")
    print(f"{'layout':<28} {'T':>6} {'ours us':>9} {'TFLOP/s':>8} {'sdpa us':>9} {'sdpa TF/s':>9} "
          f"{'eager us':>9} {'relerr':>8}  peer")
    for name, T, t, flops, ts, err, label, te in rows:
        print(f"{name:<28} {T:>6} {t * 1e6:>9.1f} {flops / t / 1e12:>8.1f} {ts * 1e6:>9.1f} "
              f"{flops / ts / 1e12 if ts == ts else float('nan'):>9.1f} {te * 1e6:>9.1f} {err:>8.1e}  {label}")


def prefill_sweep(configs, layouts):
    """Prefill configs through a tile list, as the engine's extend graphs launch them."""
    from hotswap.runner.host_batch import prefill_tiles

    data = [(name, make_prefill(ql, pr, seed=3)) for name, ql, pr in layouts]
    for name, (q, k, v, pt, cu, seq, mq, flops) in data:
        res = []
        for cfg in configs:
            tile = cfg["block_m"] // (HQ // HKV) if cfg["pack_gqa"] else cfg["block_m"]
            cu_h, seq_h = cu.cpu().numpy(), seq.cpu().numpy()
            tiles = torch.from_numpy(prefill_tiles(cu_h, seq_h, tile, -(-q.shape[0] // tile) + len(seq_h))).to(DEV)
            out = torch.empty_like(q)
            t = graph_time_us(lambda: ta._prefill_launch(q, k, v, pt, cu, seq, mq, 0.088, out, tiles, **cfg), 10, reps=5)
            res.append((t, cfg))
        for t, cfg in sorted(res, key=lambda r: r[0])[:5]:
            print(f"  {name:<12} {t:8.1f} us {flops / t / 1e6:5.0f} TFLOP/s  {cfg}", flush=True)


def host_overheads():
    print("\n## host overhead: CPU us per eager call (tiny shapes, so the GPU is never the limit)")
    q, k, v, pt, seq = make_decode(1, 64, seed=5)
    scale = 1.0 / math.sqrt(D)
    out = torch.empty_like(q)
    res = []
    res.append(("paged_decode_attention, 1 split", host_overhead(
        lambda: ta.paged_decode_attention(q, k, v, pt, seq, scale, out=out, num_splits=1))))
    res.append(("paged_decode_attention, 4 splits (+reduce)", host_overhead(
        lambda: ta.paged_decode_attention(q, k, v, pt, seq, scale, out=out, num_splits=4))))
    qp, kp, vp, ptp, cu, seqp, mq, _ = make_prefill([16], [0], seed=6)
    outp = torch.empty_like(qp)
    res.append(("paged_prefill_attention", host_overhead(
        lambda: ta.paged_prefill_attention(qp, kp, vp, ptp, cu, seqp, mq, scale, out=outp))))
    q4 = q.unsqueeze(2)
    k4 = gather_contig(k, pt, 64)
    res.append(("F.scaled_dot_product_attention (peer)", host_overhead(
        lambda: F.scaled_dot_product_attention(q4, k4, k4, enable_gqa=True))))
    x = torch.empty(16, device=DEV)
    res.append(("torch x.add_(1) (reference launch)", host_overhead(lambda: x.add_(1))))
    for name, t in res:
        print(f"  {name:<45} {t * 1e6:7.1f} us")


def sweeps(which):
    """Tuning sweeps (the figures behind `decode_plan` / `_prefill_config`)."""
    if which in ("decode", "all"):  # uniform contexts (the figures behind the shape-only split count)
        for B, ctx in ((1, 192), (1, 1024), (1, 4000), (4, 2000), (16, 256), (64, 192), (64, 1000), (128, 256), (256, 384)):
            splits = ta.decode_plan(B, HKV, 256 * PS).num_splits
            decode_sweep(B, HQ, [dict(num_splits=sp, block_n=bn, num_warps=4, num_stages=st, min_chunk=mc)
                                 for sp in sorted({splits, min(splits, 16), min(splits, 8)})
                                 for bn, mc in ((32, 32), (64, 64)) for st in (1, 2, 3)], layers=28, context=ctx, top=6)
    if which in ("mix", "all"):  # a rollout's mixed contexts: tiles and program order, then KV splits for mid-size batches
        tiles = ((64, 4, 1), (64, 4, 2), (32, 4, 2), (32, 2, 1), (64, 8, 2), (128, 8, 2), (64, 4, 3))
        for B, hq in ((512, 16), (256, 32), (64, 16)):
            decode_sweep(B, hq, [dict(num_splits=sp, block_n=bn, num_warps=nw, num_stages=st, min_chunk=bn, sorted=so)
                                 for sp in (1, 2, 4) for bn, nw, st in tiles for so in (False, True)
                                 if sp == 1 or (bn, nw, st) in tiles[:3]])
        # splitting only the long sequences (a 256-token minimum chunk) against one split, on mixed and uniform contexts
        for B, context in ((16, None), (32, None), (64, None), (128, None), (64, 192), (128, 256), (64, 1000)):
            decode_sweep(B, HQ, [dict(num_splits=sp, block_n=64, num_warps=4, num_stages=st, min_chunk=mc, sorted=True)
                                 for sp in (1, 2, 4, 8) for st in (1, 2) for mc in (64, 256) if sp > 1 or mc == 64],
                         context=context)
    if which in ("prefill", "all"):
        print("\n## prefill configs (through the tile list)")
        cfgs = [dict(block_m=bm, block_n=bn, num_warps=nw, num_stages=st, pack_gqa=pk)
                for bm in (64, 128) for bn in (32, 64) for nw in (4, 8) for st in (2, 3) for pk in (False, True)]
        prefill_sweep(cfgs, (("64x128", [128] * 64, [0] * 64), ("64x128+512", [128] * 64, [512] * 64),
                             ("8x1024", [1024] * 8, [0] * 8), ("1x8192", [8192], [0]), ("256x32", [32] * 256, [0] * 256)))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sweep", choices=["decode", "mix", "prefill", "all"], default=None,
                    help="only sweep kernel configs (tuning), no table")
    args = ap.parse_args()
    torch.manual_seed(0)
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  triton {triton.__version__}")
    if args.sweep:
        sweeps(args.sweep)
        return
    peak = d2d_bandwidth()
    host_overheads()
    drows = run_decode_table([(B, c) for B in (1, 64, 256) for c in (256, 640, 2048)])
    prows = run_prefill_table()
    print_decode_table(drows, peak)
    print_prefill_table(prows)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
