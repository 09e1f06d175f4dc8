"""Host cost of the one-launch weight copy's program tables (weights/fast_copy.chunk_tables) for every bucket of a
push, beside the per-program Python listing they replaced (the peer). A copy plan is built once per bucket name
set and cached for the whole push (BUCKET_CALLS_REMEMBERED); a push with more buckets than the cache holds, or a
first push, builds one per call. No device is involved: tensors are `meta`, with the shapes the engine holds
(stacked experts for MoE), bucketed as the trainer library buckets them.

    python bench/copy_plan_cost.py --shape qwen3-30b-a3b --bucket-mib 512
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from common import SHAPES, print_table  # noqa: E402

from hotswap.weights.fast_copy import _CHUNK, chunk_tables  # noqa: E402
from hotswap.wire.buckets import iter_buckets  # noqa: E402


def listed_tables(sizes: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The previous construction: every program listed in Python, then made a tensor."""
    first, owner = [], []
    for row, words in enumerate(sizes):
        first.append(len(owner))
        owner.extend([row] * max(1, -(-words // _CHUNK)))
    return torch.tensor(owner, dtype=torch.int32), torch.tensor(first, dtype=torch.int32)


def engine_shapes(shape: str) -> list[tuple[str, tuple[int, ...]]]:
    """Qwen3 (dense or MoE, experts stacked [E, 2I, H] and [E, H, I]) tensors in load order."""
    s = SHAPES[shape]
    h, d, layers = s["hidden_size"], s["head_dim"], s["num_hidden_layers"]
    q, kv = s["num_attention_heads"] * d, s["num_key_value_heads"] * d
    out = [("model.embed_tokens.weight", (s["vocab_size"], h))]
    for i in range(layers):
        p = f"model.layers.{i}."
        out += [(p + "self_attn.q_proj.weight", (q, h)), (p + "self_attn.k_proj.weight", (kv, h)), (p + "self_attn.v_proj.weight", (kv, h)),
                (p + "self_attn.o_proj.weight", (h, q)), (p + "self_attn.q_norm.weight", (d,)), (p + "self_attn.k_norm.weight", (d,)),
                (p + "input_layernorm.weight", (h,)), (p + "post_attention_layernorm.weight", (h,))]
        if "num_experts" in s:
            e, i_moe = s["num_experts"], s["moe_intermediate_size"]
            out += [(p + "mlp.gate.weight", (e, h)), (p + "mlp.experts.gate_up_proj", (e, 2 * i_moe, h)),
                    (p + "mlp.experts.down_proj", (e, h, i_moe))]
        else:
            i_mlp = s["intermediate_size"]
            out += [(p + "mlp.gate_proj.weight", (i_mlp, h)), (p + "mlp.up_proj.weight", (i_mlp, h)), (p + "mlp.down_proj.weight", (h, i_mlp))]
    out.append(("model.norm.weight", (h,)))
    if not s["tie_word_embeddings"]:
        out.append(("lm_head.weight", (s["vocab_size"], h)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="qwen3-30b-a3b", choices=sorted(SHAPES))
    ap.add_argument("--bucket-mib", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    named = [(n, torch.empty(shape, dtype=torch.bfloat16, device="meta")) for n, shape in engine_shapes(args.shape)]
    buckets = [[t.numel() * t.element_size() // 4 for _, t in b] for b in iter_buckets(named, args.bucket_mib << 20)]
    programs = sum(max(1, -(-w // _CHUNK)) for b in buckets for w in b)
    rows = []
    results = {}
    for label, fn in (("peer: every program listed in Python, then a tensor", listed_tables), ("chunk_tables (tensor ops)", chunk_tables)):
        runs = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            for sizes in buckets:
                fn(sizes)
            runs.append(time.perf_counter() - t)
        results[label] = statistics.median(runs)
        rows.append([label, f"{results[label] * 1e3:.1f}", f"{results[label] / len(buckets) * 1e3:.3f}"])
    a, b = (fn(buckets[0]) for fn in (listed_tables, chunk_tables))
    assert all(torch.equal(x, y) for x, y in zip(a, b)), "the two constructions disagree"
    gb = sum(t.numel() * t.element_size() for _, t in named) / 1e9
    print_table(f"copy_plan_cost: {args.shape} ({gb:.1f} GB bf16), {len(buckets)} buckets of <= {args.bucket_mib} MiB, {programs:,} copy "
                f"programs of {_CHUNK * 4 // 1024} KiB; host only, median of {args.repeats}",
                ["tables for every bucket of one push", "ms a push", "ms a bucket"], rows)


if __name__ == "__main__":
    main()
