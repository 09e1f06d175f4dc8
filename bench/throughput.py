"""Offline generation throughput: hotswap beside HF transformers `generate` in the same process, and the
memory-bound decode roofline at the device-to-device bandwidth measured in the run (each step reads all
weights plus every sequence's KV at its average context; an MoE model only the experts its batch routes
to, see common.decode_step_bytes), and the same with arithmetic: each step the longer of its bytes at that
bandwidth and its FLOPs (common.decode_step_flops) at a dense matmul's rate measured in the run
(common.decode_step_seconds), and that of the whole timed run: the timed generate includes the prefill of the
prompts, so its ceiling adds the prefill's least time (common.prefill_seconds) to the decode steps'.

    python bench/throughput.py --shape tiny                      # CPU
    python bench/throughput.py --shape qwen3-0.6b --cases 1x128x128,64x128x128,256x128x512 --hf dynamic,static
    python bench/throughput.py --shape qwen3-30b-a3b --cases 1x128x128,64x128x128,256x128x512   # MoE, random bf16 weights
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    SHAPES,
    ceilings_line,
    config_only_checkpoint,
    d2d_bytes_per_s,
    decode_step_seconds,
    device_name,
    matmul_flops_per_s,
    prefill_seconds,
    print_table,
    timed,
)

from hotswap import Engine  # noqa: E402


def roofline_tok_s(engine, batch: int, prompt: int, output: int, bandwidth: float, flops: float = float("inf")) -> float:
    """Decode tokens/s at the roofline: bytes at `bandwidth`, or FLOPs at `flops` where they take longer."""
    return batch / decode_step_seconds(engine, batch, prompt + output / 2, bandwidth, flops)[0]


def run_roofline_tok_s(engine, batch: int, prompt: int, output: int, decode_tok_s: float, bandwidth: float, flops: float) -> float:
    """Output tokens/s of the whole timed run at its ceiling: the prefill's least time, then the `output` decode steps
    at `decode_tok_s` (the bytes-or-FLOPs roofline)."""
    tokens = batch * output
    return tokens / (prefill_seconds(engine, batch, prompt, bandwidth, flops) + tokens / decode_tok_s)


def hf_model_like(engine, device):
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(engine.config.model_path)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=engine.model_config.torch_dtype).eval()
    return model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="tiny")
    ap.add_argument("--cases", default=None, help="BATCHxPROMPTxOUTPUT,... (default by device)")
    ap.add_argument("--hf", default=None, help="comma list of HF cache kinds to run: dynamic,static or none "
                                               "(default dynamic; none for MoE shapes, whose HF copy would not fit beside ours)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", default=None, help="append the table to this file")
    ap.add_argument("--engine", action="append", default=[], metavar="FIELD=INT",
                    help="an integer EngineConfig override, e.g. enable_skinny_matmul=0 (repeatable)")
    args = ap.parse_args()
    overrides = {k: int(v) for k, v in (kv.split("=", 1) for kv in args.engine)}
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else (args.device if args.device != "auto" else "cpu"))
    on_gpu = device.type == "cuda"
    cases = args.cases or ("1x128x128,64x128x128,256x128x512" if on_gpu else "1x32x32,8x32x32")
    cases = [tuple(int(x) for x in c.split("x")) for c in cases.split(",")]
    max_pos = max(p + o for _, p, o in cases) + 16
    tmp = Path(tempfile.mkdtemp())
    path = config_only_checkpoint(tmp / args.shape, args.shape, "bfloat16" if on_gpu else "float32", max_positions=max(max_pos, 1024))
    page_size = 16
    # size the KV cache to the largest case (plus slack) so HF has room to run beside it in this process
    num_pages = max(b * -(-(p + o + 1) // page_size) for b, p, o in cases) + 256
    engine = Engine(str(path), device=str(device), load_format="dummy", max_running_requests=max(b for b, _, _ in cases),
                    page_size=page_size, num_pages=num_pages, **overrides)
    hf_arg = args.hf or ("none" if "num_experts" in SHAPES[args.shape] else "dynamic")
    hf_kinds = [k for k in hf_arg.split(",") if k and k != "none"]
    hf = None
    if hf_kinds:
        hf = hf_model_like(engine, device)
        res = engine.update_weights_from_tensor(list(hf.state_dict().items()))  # identical weights in both
        assert res.success, res.message
    bandwidth = d2d_bytes_per_s(device) if on_gpu else float("nan")
    flops = matmul_flops_per_s(device) if on_gpu else float("nan")
    rows = []
    g = torch.Generator().manual_seed(0)
    for batch, prompt, output in cases:
        prompts = torch.randint(3, 500, (batch, prompt), generator=g)
        sp = {"max_new_tokens": output, "temperature": 0, "ignore_eos": True}
        # warm-up: the same workload once, so graphs for its prefill/mixed shapes are captured (first use)
        engine.generate(input_ids=prompts.tolist(), sampling_params=sp)
        engine.flush_cache()
        _, t_prefill = timed(lambda: engine.generate(input_ids=prompts.tolist(), sampling_params=dict(sp, max_new_tokens=1)), on_gpu)
        engine.flush_cache()
        outs, t = timed(lambda: engine.generate(input_ids=prompts.tolist(), sampling_params=sp), on_gpu)
        engine.flush_cache()
        ours = batch * output / t
        roof = roofline_tok_s(engine, batch, prompt, output, bandwidth)
        roof_flops = roofline_tok_s(engine, batch, prompt, output, bandwidth, flops)
        roof_run = run_roofline_tok_s(engine, batch, prompt, output, roof_flops, bandwidth, flops) if on_gpu else float("nan")
        row = [f"{batch}, {prompt}/{output}", f"{ours:,.0f}", f"{batch * prompt / t_prefill:,.0f}"]
        hf_cells = []
        for kind in hf_kinds:
            kw = dict(max_new_tokens=output, min_new_tokens=output, do_sample=False, eos_token_id=None, pad_token_id=0)
            if kind == "static":
                kw["cache_implementation"] = "static"
            ids = prompts.to(device)
            with torch.no_grad():
                hf.generate(ids[:, :8], **dict(kw, max_new_tokens=4, min_new_tokens=4))  # warm-up / compile
                ref, t_hf = timed(lambda: hf.generate(ids, **kw), on_gpu)
            same = 0
            for a, b in zip(outs[0]["output_ids"], ref[0, prompt:].tolist()):
                if a != b:
                    break
                same += 1
            hf_cells.append(f"{batch * output / t_hf:,.0f} ({same}/{output} same)")
        row += hf_cells + ([f"{roof:,.0f}", f"{100 * ours / roof:.1f}%", f"{roof_flops:,.0f}", f"{100 * ours / roof_flops:.1f}%",
                            f"{roof_run:,.0f}", f"{100 * ours / roof_run:.1f}%"] if on_gpu else ["-"] * 6)
        rows.append(row)
    header = (["batch, prompt/output", "hotswap output tok/s", "hotswap prefill tok/s"] + [f"HF {k} tok/s (greedy prefix = ours)" for k in hf_kinds]
              + ["decode roofline tok/s", "% of roofline", "bytes-or-FLOPs roofline tok/s", "% of it",
                 "whole-run roofline tok/s (prefill + decode)", "% of that"])
    variant = "".join(f", {k}={v}" for k, v in overrides.items())
    d2d = f"; {ceilings_line(device)}, dense matmul {flops / 1e12:,.0f} TFLOP/s (measured)" if on_gpu else ""
    text = print_table(f"throughput, {args.shape}, {device_name(device)}, {engine.model_config.torch_dtype}{variant}{d2d}", header, rows)
    if args.out:
        with open(args.out, "a") as f:
            f.write(text + "\n\n")
    engine.shutdown()


if __name__ == "__main__":
    main()
