"""Shared bench helpers: model shapes, a config-only checkpoint folder, device ceilings measured in the run."""

from __future__ import annotations

import functools
import json
import os
import platform
import time
from pathlib import Path

import torch

SHAPES = {
    "tiny": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                 head_dim=32, vocab_size=512, tie_word_embeddings=False),
    "qwen3-0.6b": dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
                       head_dim=128, vocab_size=151936, tie_word_embeddings=True),
    "qwen3-8b": dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8,
                     head_dim=128, vocab_size=151936, tie_word_embeddings=False),
    # mixture of experts (Qwen3MoeForCausalLM): every layer sparse
    "tiny-moe": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                     head_dim=32, vocab_size=512, tie_word_embeddings=False, num_experts=8, num_experts_per_tok=2,
                     moe_intermediate_size=64, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[]),
    "qwen3-30b-a3b": dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4,
                          head_dim=128, vocab_size=151936, tie_word_embeddings=False, num_experts=128, num_experts_per_tok=8,
                          moe_intermediate_size=768, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[]),
}


def config_only_checkpoint(out_dir: Path, shape: str, dtype: str = "bfloat16", max_positions: int = 4096) -> Path:
    """A folder with config.json and a small tokenizer; weights come from load_format='dummy'."""
    from hotswap.testing.tiny_models import build_tokenizer

    out_dir.mkdir(parents=True, exist_ok=True)
    s = SHAPES[shape]
    moe = "num_experts" in s
    cfg = {
        "architectures": ["Qwen3MoeForCausalLM" if moe else "Qwen3ForCausalLM"], "model_type": "qwen3_moe" if moe else "qwen3",
        "hidden_act": "silu", "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0, "max_position_embeddings": max_positions, "torch_dtype": dtype, "attention_bias": False,
        "eos_token_id": 0, "bos_token_id": 0, "pad_token_id": 0, **s,
    }
    (out_dir / "config.json").write_text(json.dumps(cfg, indent=2))
    build_tokenizer(out_dir)
    return out_dir


def weight_bytes(engine) -> int:
    return engine.model_runner.weight_map.total_bytes


def decode_step_bytes(engine, batch: int, avg_ctx: float) -> float:
    """What one decode step of `batch` sequences at context `avg_ctx` must read at least.

    Dense: every weight plus the KV. MoE: the weights outside the experts (attention, norms, routers, the
    LM head), the embedding rows of the batch's tokens, per MoE layer the experts the batch routes to
    (expected distinct count under uniform top-k routing: E * (1 - (1 - k/E)^batch)), plus the KV."""
    mc = engine.model_config
    # under tensor parallelism: one rank's share (the weight map holds rank 0's slices, its cache its KV heads)
    kv = batch * avg_ctx * kv_bytes_per_token(engine) * rank_share(engine)
    if not mc.num_experts:
        return weight_bytes(engine) + kv
    slots = engine.model_runner.weight_map.slots
    size = lambda name: slots[name].dest.numel() * slots[name].dest.element_size()
    experts = sum(size(n) for n in slots if ".mlp.experts." in n)
    embed = size("model.embed_tokens.weight") if not mc.tie_word_embeddings else 0  # tied: read whole as the LM head
    rest = weight_bytes(engine) - experts - embed
    e, k = mc.num_experts, mc.num_experts_per_tok
    touched = e * (1.0 - (1.0 - k / e) ** batch)
    per_expert = 3 * mc.moe_intermediate_size * mc.hidden_size * mc.torch_dtype.itemsize
    embed_rows = batch * mc.hidden_size * mc.torch_dtype.itemsize if embed else 0
    return rest + embed_rows + len(mc.moe_layers) * touched * per_expert + kv


def decode_step_flops(engine, batch: int, avg_ctx: float) -> float:
    """The arithmetic one decode step of `batch` sequences at context `avg_ctx` must do: 2 FLOPs per weight
    a row is multiplied by (dense: every weight but an untied embedding table, which is only indexed; MoE:
    the weights outside the experts and, per MoE layer, its k experts) plus attention's two products over
    the context (4 * context * query heads * head_dim a layer). At a few hundred rows an 8B model's matmuls
    need about as long as its reads: the bytes roofline alone then promises more than the device can do."""
    mc = engine.model_config
    itemsize = mc.torch_dtype.itemsize
    slots = engine.model_runner.weight_map.slots
    size = lambda name: slots[name].dest.numel() * slots[name].dest.element_size()
    embed = size("model.embed_tokens.weight") if not mc.tie_word_embeddings else 0
    params = (weight_bytes(engine) - embed) / itemsize
    if mc.num_experts:
        experts = sum(size(n) for n in slots if ".mlp.experts." in n) / itemsize
        per_expert = 3 * mc.moe_intermediate_size * mc.hidden_size
        params += len(mc.moe_layers) * mc.num_experts_per_tok * per_expert - experts
    attention = 4 * avg_ctx * mc.num_heads * rank_share(engine) * mc.head_dim * mc.num_layers
    return batch * (2 * params + attention)


def decode_step_seconds(engine, batch: int, avg_ctx: float, bandwidth: float, flops: float = float("inf")) -> tuple[float, bool]:
    """(The least seconds a decode step takes: its bytes at `bandwidth`, or its FLOPs at `flops` where those take
    longer; whether the FLOPs set it). The default `flops` gives the bytes roofline alone."""
    read = decode_step_bytes(engine, batch, avg_ctx) / bandwidth
    compute = decode_step_flops(engine, batch, avg_ctx) / flops
    return max(read, compute), compute > read


def prefill_seconds(engine, batch: int, prompt: int, bandwidth: float, flops: float) -> float:
    """The least seconds a prefill of `batch` prompts of `prompt` tokens takes: every weight read once and the prompts'
    KV written at `bandwidth`, or its FLOPs at `flops` where those take longer (decode_step_flops of that many rows:
    every weight per token and attention over half the prompt on average, less the LM head of every token but each
    prompt's last, the only one sampled). A timed generate includes its prefill, so its ceiling does too."""
    read = (weight_bytes(engine) + batch * prompt * kv_bytes_per_token(engine) * rank_share(engine)) / bandwidth
    slots = engine.model_runner.weight_map.slots
    head = slots["lm_head.weight"] if "lm_head.weight" in slots else slots["model.embed_tokens.weight"]
    unsampled = 2 * head.dest.numel() * batch * (prompt - 1)
    return max(read, (decode_step_flops(engine, batch * prompt, prompt / 2) - unsampled) / flops)


def rank_share(engine) -> float:
    """The share of the attention heads (and so of the KV) this engine's rank holds: 1 without tensor parallelism."""
    return engine.model_runner.kv_cache.num_kv_heads / engine.model_config.num_kv_heads


def kv_bytes_per_token(engine) -> int:
    mc = engine.model_config
    return 2 * mc.num_kv_heads * mc.head_dim * mc.torch_dtype.itemsize * mc.num_layers


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()})"


def timed(fn, sync: bool):
    if sync:
        torch.cuda.synchronize()
    t = time.perf_counter()
    out = fn()
    if sync:
        torch.cuda.synchronize()
    return out, time.perf_counter() - t


def decode_graph_replay_ms(engine, batch: int, replays: int = 50) -> float:
    """The engine's captured decode graph for `batch` rows (its bucket) replayed alone: the GPU's time for one
    decode step, to hold beside a whole step's (a step slower than this is host-bound)."""
    from hotswap.runner.cuda_graph import graph_bucket

    graphs = engine.model_runner.cuda_graphs
    graph = graphs.graphs[graph_bucket(graphs.buckets, batch)]
    graph.replay()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(replays):
        graph.replay()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / replays * 1e3


def graph_time_us(fn, calls: int, reps: int = 20) -> float:
    """Median time of one `fn()` call, from a CUDA graph of `calls` calls replayed `reps` times (no
    launch overhead between calls, as inside a decode step's graph)."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(calls):
            fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        g.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / calls)
    return sorted(times)[len(times) // 2]


def proc_cpu_s(stat: str) -> float | None:
    """CPU seconds (user + system) of the process or thread whose /proc stat file this is; None where it is not."""
    try:
        fields = Path(stat).read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def print_table(title: str, header: list[str], rows: list[list]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]

    def line(r: list) -> str:
        return "| " + " | ".join(str(x).rjust(w) for x, w in zip(r, widths)) + " |"

    text = "\n".join([f"### {title}", "", line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])
    print(text + "\n", flush=True)
    return text


def _median_copy_s(dst: torch.Tensor, src: torch.Tensor, reps: int) -> float:
    """Median seconds of one `dst.copy_(src)` (device events when either side is on CUDA)."""
    device = dst.device if dst.is_cuda else src.device
    return timed_median(lambda: dst.copy_(src, non_blocking=True), device, reps)


@functools.cache
def d2d_bytes_per_s(device: torch.device) -> float:
    """Device-to-device copy bandwidth, bytes read + written, measured now (once per process): the memory
    roofline's speed. On the CPU, the host memory copy (the CPU engine's ceiling). Random data: never zeros."""
    n = (1 << 30) if device.type == "cuda" else (64 << 20)
    a = torch.empty(n, dtype=torch.uint8, device=device).random_()
    b = torch.empty_like(a)
    return 2 * n / _median_copy_s(b, a, 20)


@functools.cache
def matmul_flops_per_s(device: torch.device, dtype: torch.dtype = torch.bfloat16) -> float:
    """Dense matmul throughput measured now (once per process): the median of a square product large enough
    to run at the tensor cores' practical peak (8192 on CUDA; 1024 in float32 on the CPU); the compute
    roofline's speed."""
    n, dtype = (8192, dtype) if device.type == "cuda" else (1024, torch.float32)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    seconds = timed_median(lambda: torch.matmul(a, b, out=out), device, reps=10)
    return 2 * n**3 / seconds


def timed_median(fn, device: torch.device, reps: int) -> float:
    """Median seconds of `fn()` after a warm-up (device events on CUDA)."""
    fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) * 1e-3)
        else:
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


@functools.cache
def h2d_bytes_per_s(device: torch.device) -> float:
    """Pinned host-to-device copy bandwidth, measured now (once per process); NaN on the CPU."""
    if device.type != "cuda":
        return float("nan")
    n = 256 << 20
    host = torch.empty(n, dtype=torch.uint8, pin_memory=True).random_()
    dev = torch.empty(n, dtype=torch.uint8, device=device)
    return n / _median_copy_s(dev, host, 10)


def ceilings_line(device: torch.device) -> str:
    """The measured ceilings, for a bench's table title."""
    h2d = h2d_bytes_per_s(device)
    h2d_text = f", H2D {h2d / 1e9:.1f} GB/s" if h2d == h2d else ""
    return f"D2D {d2d_bytes_per_s(device) / 1e9:,.0f} GB/s{h2d_text} (measured, bytes read + written for D2D)"
