"""bench/common.decode_step_bytes: what a decode step must read, dense and mixture-of-experts."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from common import config_only_checkpoint, decode_step_bytes, decode_step_flops, kv_bytes_per_token, weight_bytes  # noqa: E402

from hotswap import Engine  # noqa: E402


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    out = {}
    for shape in ("tiny", "tiny-moe"):
        path = config_only_checkpoint(tmp_path_factory.mktemp(shape), shape, "float32", max_positions=256)
        out[shape] = Engine(str(path), device="cpu", load_format="dummy", page_size=4, num_pages=16, max_running_requests=4)
    yield out
    for eng in out.values():
        eng.shutdown()


def test_dense_step_reads_every_weight_and_the_kv(engines):
    eng = engines["tiny"]
    assert decode_step_bytes(eng, 4, 10.0) == weight_bytes(eng) + 4 * 10.0 * kv_bytes_per_token(eng)


def test_moe_step_reads_only_the_experts_its_rows_route_to(engines):
    eng = engines["tiny-moe"]
    mc = eng.model_config
    per_expert = 3 * mc.moe_intermediate_size * mc.hidden_size * mc.torch_dtype.itemsize
    all_experts = len(mc.moe_layers) * mc.num_experts * per_expert
    embed = mc.vocab_size * mc.hidden_size * mc.torch_dtype.itemsize
    rest = weight_bytes(eng) - all_experts - embed  # attention, norms, routers, LM head
    row = mc.hidden_size * mc.torch_dtype.itemsize  # one embedding row per token
    # one row: its top-k experts per MoE layer, its embedding row
    assert decode_step_bytes(eng, 1, 0.0) == pytest.approx(rest + row + len(mc.moe_layers) * mc.num_experts_per_tok * per_expert)
    # many rows: every expert (uniform routing touches them all), still only the rows' embeddings
    assert decode_step_bytes(eng, 4096, 0.0) == pytest.approx(rest + 4096 * row + all_experts)
    # the KV adds as for a dense model
    assert decode_step_bytes(eng, 2, 8.0) - decode_step_bytes(eng, 2, 0.0) == pytest.approx(2 * 8.0 * kv_bytes_per_token(eng))


def test_step_flops_count_each_multiplied_weight_twice_and_attention_over_the_context(engines):
    dense, moe = engines["tiny"], engines["tiny-moe"]
    for eng in (dense, moe):
        mc = eng.model_config
        attention_per_ctx = 4 * mc.num_heads * mc.head_dim * mc.num_layers
        assert decode_step_flops(eng, 3, 10.0) == pytest.approx(3 * decode_step_flops(eng, 1, 10.0))
        assert decode_step_flops(eng, 1, 10.0) - decode_step_flops(eng, 1, 0.0) == pytest.approx(10 * attention_per_ctx)
    mc = dense.model_config
    embed = mc.vocab_size * mc.hidden_size
    params = weight_bytes(dense) / mc.torch_dtype.itemsize - (0 if mc.tie_word_embeddings else embed)
    assert decode_step_flops(dense, 1, 0.0) == pytest.approx(2 * params)
    # MoE: a row multiplies by k of the E experts of each MoE layer, never by the others
    mc = moe.model_config
    per_expert = 3 * mc.moe_intermediate_size * mc.hidden_size
    all_params = weight_bytes(moe) / mc.torch_dtype.itemsize - (0 if mc.tie_word_embeddings else mc.vocab_size * mc.hidden_size)
    idle = len(mc.moe_layers) * (mc.num_experts - mc.num_experts_per_tok) * per_expert
    assert decode_step_flops(moe, 1, 0.0) == pytest.approx(2 * (all_params - idle))


def test_kernel_profile_files_each_kernel_by_what_it_does():
    from kernel_profile import category

    assert category("_decode_split_kernel") == "attention" and category("_decode_reduce_kernel") == "attention"
    assert category("_down_pairs_kernel") == "MoE experts" and category("_topk_softmax_kernel") == "MoE experts"
    assert category("_skinny_kernel") == "batch-1 matmuls"
    assert category("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64") == "matmuls (cuBLAS)"
    assert category("nvjet_tst_128x64_64x8_1x1_v_bz_coopA_TNT") == "matmuls (cuBLAS)"
    assert category("_partials_kernel") == "sampling" and category("_finish_kernel") == "sampling"
    assert category("_rmsnorm_kernel") == "norms, rotary, KV store" and category("_qk_norm_rope_kernel") == "norms, rotary, KV store"
    assert category("Memcpy DtoD (Device -> Device)") == "copies"
    assert category("some_new_kernel") == "other"
