"""Qwen3-MoE: parity with transformers, and every weight operation on the stacked experts under both the
checkpoint's per-expert names and transformers 5's fused expert tensors."""

from __future__ import annotations

import contextlib
import json
import shutil

import numpy as np
import pytest
import torch
from engine_support import fail_disk_read, make_engine
from hf_reference import (
    UPDATE_PROMPTS,
    assert_bf16_greedy_agrees,
    assert_greedy_matches_hf,
    greedy_ids,
    hf_greedy,
    prompt_ids,
    reference_ids,
)
from safetensors.torch import save_file
from trainer_support import checkpoint_tensors
from transformers import AutoModelForCausalLM

from hotswap import Engine, HotswapError
from hotswap.config import EngineConfig, ModelConfig, model_config_for
from hotswap.trainer import decode_routed_experts
from hotswap.wire.checksum import state_dict_manifest

GREEDY = {"max_new_tokens": 10, "temperature": 0, "ignore_eos": True}
FUSED = "model.layers.0.mlp.experts.gate_up_proj"


@pytest.fixture(scope="module")
def engine(tiny_qwen3_moe):
    with make_engine(tiny_qwen3_moe) as eng:
        yield eng


@pytest.fixture
def fresh(tiny_qwen3_moe):
    with make_engine(tiny_qwen3_moe) as eng:
        yield eng
        assert eng.check_invariants().success


def hf_state(path) -> dict[str, torch.Tensor]:
    """transformers 5's state_dict of the checkpoint: experts fused ([E, 2I, H] and [E, H, I])."""
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).state_dict()


def fused_checkpoint(src, dst):
    """A copy of checkpoint `src` holding transformers 5's fused expert names (its state_dict saved as is)."""
    shutil.copytree(src, dst)
    save_file({k: v.contiguous() for k, v in hf_state(src).items()}, str(dst / "model.safetensors"), metadata={"format": "pt"})
    assert FUSED in checkpoint_tensors(dst)
    return dst


def test_config_reads_the_moe_layout(tiny_qwen3_moe):
    mc = ModelConfig.from_pretrained(tiny_qwen3_moe)
    assert (mc.architecture, mc.num_experts, mc.num_experts_per_tok, mc.moe_intermediate_size) == ("Qwen3MoeForCausalLM", 8, 2, 32)
    assert mc.norm_topk_prob and mc.moe_layers == [0, 2]
    mc.decoder_sparse_step, mc.mlp_only_layers = 2, []
    assert mc.moe_layers == [1]
    with pytest.raises(HotswapError, match="mixture-of-experts"):
        model_config_for(EngineConfig(model_path=str(tiny_qwen3_moe), tensor_parallel_size=2))


def test_greedy_and_logprob_parity_ragged_batch(engine, tiny_qwen3_moe):
    prompts = [prompt_ids(i, n) for i, n in enumerate([3, 17, 40, 9])]
    outs = engine.generate(input_ids=prompts, sampling_params=GREEDY, return_logprob=True)
    assert_greedy_matches_hf(tiny_qwen3_moe, prompts, outs, GREEDY["max_new_tokens"])


def test_prefix_hits_and_chunked_prefill_match(tiny_qwen3_moe):
    prefix = prompt_ids(100, 48)
    prompts = [prefix + prompt_ids(200 + i, 5) for i in range(3)] + [prompt_ids(400, 90)]
    with make_engine(tiny_qwen3_moe, chunked_prefill_size=32, max_num_batched_tokens=40) as eng:
        first = eng.generate(input_ids=prompts[0], sampling_params=GREEDY)
        rest = eng.generate(input_ids=prompts[1:], sampling_params=GREEDY)
        assert [o["meta_info"]["cached_tokens"] for o in rest[:2]] == [48, 48]
        for ids, out in zip(prompts, [first, *rest]):
            assert out["output_ids"] == hf_greedy(tiny_qwen3_moe, ids, 10)[0]
        assert eng.check_invariants().success


def test_check_weights_equals_the_hf_state_dict_manifest(engine, tiny_qwen3_moe):
    state = hf_state(tiny_qwen3_moe)
    assert FUSED in state  # transformers 5 stacks the experts
    res = engine.check_weights("checksum", expected=state_dict_manifest(state))
    assert res.success, res.message
    assert set(res.checksums) == set(state)


def test_get_weights_by_name_reads_fused_and_per_expert_names(engine, tiny_qwen3_moe):
    state, ckpt = hf_state(tiny_qwen3_moe), checkpoint_tensors(tiny_qwen3_moe)
    for name, ref in ((FUSED, state[FUSED]), ("model.layers.2.mlp.experts.down_proj", state["model.layers.2.mlp.experts.down_proj"]),
                      ("model.layers.0.mlp.experts.5.up_proj.weight", ckpt["model.layers.0.mlp.experts.5.up_proj.weight"]),
                      ("model.layers.2.mlp.experts.7.down_proj.weight", ckpt["model.layers.2.mlp.experts.7.down_proj.weight"]),
                      ("model.layers.0.mlp.gate.weight", ckpt["model.layers.0.mlp.gate.weight"])):
        out = engine.get_weights_by_name(name, truncate_size=2)  # SGLang's bare nested list of the first rows
        torch.testing.assert_close(torch.tensor(out), ref[:2], rtol=0, atol=0)
    # the per-expert view is the same storage as the fused tensor's slice
    up = state[FUSED][5, 32:]
    torch.testing.assert_close(up, ckpt["model.layers.0.mlp.experts.5.up_proj.weight"], rtol=0, atol=0)


def test_update_from_disk_per_expert_and_fused_checkpoints(fresh, tiny_qwen3_moe, tiny_qwen3_moe_v2, tmp_path):
    v2_state = hf_state(tiny_qwen3_moe_v2)
    res = fresh.update_weights_from_disk(str(tiny_qwen3_moe_v2))
    assert res.success, res.message
    assert fresh.check_weights("checksum", expected=state_dict_manifest(v2_state)).success
    assert greedy_ids(fresh) == reference_ids(tiny_qwen3_moe_v2)
    fused = fused_checkpoint(tiny_qwen3_moe, tmp_path / "fused")
    assert fresh.update_weights_from_disk(str(fused)).success
    assert fresh.check_weights("checksum", expected=state_dict_manifest(hf_state(tiny_qwen3_moe))).success
    assert greedy_ids(fresh) == reference_ids(tiny_qwen3_moe)


def test_update_from_tensor_per_expert_and_fused_names(fresh, tiny_qwen3_moe, tiny_qwen3_moe_v2):
    per_expert = checkpoint_tensors(tiny_qwen3_moe_v2)
    assert "model.layers.0.mlp.experts.3.gate_proj.weight" in per_expert and FUSED not in per_expert
    assert fresh.update_weights_from_tensor(list(per_expert.items())).success
    assert fresh.check_weights("checksum", expected=state_dict_manifest(hf_state(tiny_qwen3_moe_v2))).success
    assert greedy_ids(fresh) == reference_ids(tiny_qwen3_moe_v2)
    fused = hf_state(tiny_qwen3_moe)
    assert fresh.update_weights_from_tensor(list(fused.items())).success
    assert fresh.check_weights("checksum", expected=state_dict_manifest(fused)).success
    # one expert alone, by its checkpoint name, changes exactly that slice
    one = per_expert["model.layers.2.mlp.experts.4.down_proj.weight"]
    assert fresh.update_weights_from_tensor([("model.layers.2.mlp.experts.4.down_proj.weight", one)]).success
    down = fresh.get_weights_by_name("model.layers.2.mlp.experts.down_proj", truncate_size=0)
    expected = fused["model.layers.2.mlp.experts.down_proj"].clone()
    expected[4] = one
    torch.testing.assert_close(torch.tensor(down), expected, rtol=0, atol=0)


def test_refused_expert_updates_leave_weights_bit_exact(fresh, tiny_qwen3_moe_v2):
    before = fresh.check_weights("checksum").digest
    per_expert = checkpoint_tensors(tiny_qwen3_moe_v2)
    fused = hf_state(tiny_qwen3_moe_v2)
    cases = [
        ([("model.layers.0.mlp.experts.1.gate_proj.weight", torch.zeros(32, 65))], "shape mismatch"),
        ([(FUSED, torch.zeros(8, 64, 63))], "shape mismatch"),
        ([("model.layers.0.mlp.experts.8.up_proj.weight", torch.zeros(32, 64))], "unknown parameter"),
        ([("model.layers.1.mlp.experts.0.up_proj.weight", torch.zeros(32, 64))], "unknown parameter"),  # layer 1 is dense
        ([(FUSED, fused[FUSED]), ("model.layers.0.mlp.experts.2.up_proj.weight", per_expert["model.layers.0.mlp.experts.2.up_proj.weight"])],
         "both whole and per expert"),
        (list(per_expert.items())[:3] + [("model.layers.2.mlp.experts.0.down_proj.weight", torch.zeros(64, 31))], "shape mismatch"),
    ]
    for named, message in cases:
        res = fresh.update_weights_from_tensor(named)
        assert not res.success and message in res.message, res.message
        assert fresh.check_weights("checksum").digest == before


def test_partial_per_expert_checkpoint_is_refused_from_disk(fresh, tiny_qwen3_moe, tmp_path):
    before = fresh.check_weights("checksum").digest
    partial = tmp_path / "partial"
    shutil.copytree(tiny_qwen3_moe, partial)
    tensors = checkpoint_tensors(tiny_qwen3_moe)
    del tensors["model.layers.2.mlp.experts.6.gate_proj.weight"]
    save_file(tensors, str(partial / "model.safetensors"), metadata={"format": "pt"})
    res = fresh.update_weights_from_disk(str(partial))
    assert not res.success and "model.layers.2.mlp.experts.gate_up_proj" in res.message, res.message
    assert fresh.check_weights("checksum").digest == before


def test_fault_mid_read_of_experts_rolls_back(tiny_qwen3_moe, tiny_qwen3_moe_v2, monkeypatch):
    # small windows on one thread: the fault lands after earlier windows (experts among them) were copied in
    with make_engine(tiny_qwen3_moe, weight_load_threads=1, weight_load_staging_bytes=2 * 16384) as eng:
        before = eng.check_weights("checksum").digest
        fail_disk_read(monkeypatch, at=20)
        res = eng.update_weights_from_disk(str(tiny_qwen3_moe_v2))
        assert not res.success and "injected I/O error" in res.message and res.rolled_back
        assert eng.check_weights("checksum").digest == before
        assert eng.check_invariants().success


@pytest.mark.parametrize("names", ["per_expert", "fused"])
def test_trainer_pushes_experts_over_torch_distributed(fresh, tiny_qwen3_moe_v2, tmp_path, names):
    """A trainer process broadcasts the experts in 3 buckets (gloo), under either naming scheme."""
    from trainer_support import TrainerProcess, serve_engine_http

    from hotswap.trainer import free_port

    source = tiny_qwen3_moe_v2 if names == "per_expert" else fused_checkpoint(tiny_qwen3_moe_v2, tmp_path / "fused")
    url, server = serve_engine_http(fresh)
    try:
        trainer = TrainerProcess({"base_url": url, "checkpoint": str(source), "master_port": free_port(), "group_name": "moe",
                                  "buckets": 3, "pushes": [{"version": "v2"}]})
        trainer.expect("connected")
        assert trainer.expect("pushed")["buckets"] == 3
        trainer.expect("closed")
        assert trainer.join() == 0
    finally:
        server.shutdown()
    assert fresh.check_weights("checksum", expected=state_dict_manifest(hf_state(tiny_qwen3_moe_v2))).success
    assert greedy_ids(fresh) == reference_ids(tiny_qwen3_moe_v2)
    assert fresh.weight_version == "v2"


def test_save_sharded_model_reloads_in_hf_bit_exactly(fresh, tiny_qwen3_moe_v2, tmp_path):
    assert fresh.update_weights_from_disk(str(tiny_qwen3_moe_v2)).success
    out = tmp_path / "saved"
    res = fresh.save_sharded_model(str(out), max_size=60_000)
    assert res.success, res.message
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    saved = checkpoint_tensors(out)
    assert set(index) == set(saved)
    # written as transformers writes it: per expert, the same bytes as the source checkpoint
    assert state_dict_manifest(saved) == state_dict_manifest(checkpoint_tensors(tiny_qwen3_moe_v2))
    assert state_dict_manifest(hf_state(out)) == state_dict_manifest(hf_state(tiny_qwen3_moe_v2))
    with make_engine(out) as again:
        assert again.check_weights("checksum").digest == fresh.check_weights("checksum").digest


def test_release_resume_keeps_the_experts(fresh, tiny_qwen3_moe):
    before = fresh.check_weights("checksum").digest
    assert fresh.release_memory_occupation().success
    assert fresh.resume_memory_occupation().success
    assert fresh.check_weights("checksum").digest == before
    assert fresh.update_weights_from_tensor([("model.layers.0.mlp.experts.0.up_proj.weight",
                                              checkpoint_tensors(tiny_qwen3_moe)["model.layers.0.mlp.experts.0.up_proj.weight"])]).success
    assert greedy_ids(fresh, UPDATE_PROMPTS) == reference_ids(tiny_qwen3_moe)


@pytest.mark.gpu
def test_cuda_fp32_with_graphs_equals_cpu(tiny_qwen3_moe):
    """The fused Triton MoE path, eager and under decode and extend CUDA graphs, gives the CPU's tokens."""
    prompts = [prompt_ids(i, n) for i, n in enumerate([5, 33, 70, 12])]
    with make_engine(tiny_qwen3_moe) as cpu:
        ref = [o["output_ids"] for o in cpu.generate(input_ids=prompts, sampling_params=GREEDY)]
    for graphs in (True, False):
        with Engine(str(tiny_qwen3_moe), device="cuda", dtype="float32", enable_cuda_graph=graphs) as gpu:
            assert (gpu.model_runner.cuda_graphs is not None) == graphs
            assert [o["output_ids"] for o in gpu.generate(input_ids=prompts, sampling_params=GREEDY)] == ref


@contextlib.contextmanager
def replayed_routing(hf, rows: np.ndarray):
    """HF's MoE layers route as `rows` [positions, layers, k] (our returned routing) says: the same experts, each
    weighted by HF's own router probabilities, renormalised over the k as the checkpoint asks (routing replay,
    what R3 does for a trainer). Positions past `rows` keep HF's own choice."""
    gates = {i: layer.mlp.gate for i, layer in enumerate(hf.model.layers) if hasattr(layer.mlp, "gate")}
    for layer, gate in gates.items():
        ours = torch.as_tensor(rows[:, layer], dtype=torch.long, device=gate.weight.device)

        def forward(hidden, gate=gate, ours=ours, original=gate.forward):
            logits, _, chosen = original(hidden)
            chosen = chosen.clone()
            chosen[: ours.shape[0]] = ours
            probs = torch.softmax(logits, dim=-1, dtype=torch.float32).gather(1, chosen)
            if gate.norm_topk_prob:
                probs = probs / probs.sum(dim=-1, keepdim=True)
            return logits, probs.to(logits.dtype), chosen

        gate.forward = forward
    try:
        yield
    finally:
        for gate in gates.values():
            del gate.forward  # back to the class's own


@pytest.mark.gpu
@pytest.mark.parametrize("batch", [1, 4])
def test_bf16_greedy_agrees_with_hf(tiny_qwen3_moe, batch):
    """Judged as the dense bf16 test judges it, with HF routing as we did (`replayed_routing`). The tiny model's
    bf16 router logits are 1-22 % of their scale off float32, so the k-th and (k+1)-th experts are often closer
    than rounding and either engine may pick either (seen on the H200: one token 2.2 logits off at batch 1);
    replaying our choice into HF judges every kernel on the same experts."""
    hf = AutoModelForCausalLM.from_pretrained(tiny_qwen3_moe, dtype=torch.bfloat16).cuda().eval()
    prompts = [prompt_ids(70 + i, 16) for i in range(batch)]
    with Engine(str(tiny_qwen3_moe), device="cuda", dtype="bfloat16", enable_return_routed_experts=True) as eng:
        got = eng.generate(input_ids=prompts, sampling_params=GREEDY, return_routed_experts=True)
    for ids, out in zip(prompts, got):
        with replayed_routing(hf, decode_routed_experts(out, hf.config.num_hidden_layers, hf.config.num_experts_per_tok)):
            assert_bf16_greedy_agrees(hf, [ids], [out["output_ids"]])


def test_qwen2_moe_shared_expert_parity_and_weights(tiny_qwen2_moe):
    prompts = [prompt_ids(i, n) for i, n in enumerate([4, 23])]
    with make_engine(tiny_qwen2_moe) as eng:
        outs = eng.generate(input_ids=prompts, sampling_params=GREEDY, return_logprob=True)
        assert_greedy_matches_hf(tiny_qwen2_moe, prompts, outs, GREEDY["max_new_tokens"])
        state = hf_state(tiny_qwen2_moe)
        assert "model.layers.0.mlp.shared_expert_gate.weight" in state and "model.layers.0.self_attn.q_proj.bias" in state
        assert eng.check_weights("checksum", expected=state_dict_manifest(state)).success


def test_ipc_pusher_sends_fused_experts_and_verify_proves_them(fresh, tiny_qwen3_moe_v2):
    """The trainer library's shared-memory pusher, in buckets, with a transformers 5 state_dict (fused
    experts); `verify_engine_weights` on that state_dict then proves the engine holds it."""
    from hotswap.trainer import IPCWeightPusher, verify_engine_weights

    state = hf_state(tiny_qwen3_moe_v2)
    assert not verify_engine_weights(fresh, state).success
    with IPCWeightPusher(fresh, bucket_bytes=200_000) as pusher:
        res = pusher.push(state, weight_version="v2")
    assert res.num_buckets > 1
    check = verify_engine_weights(fresh, state)
    assert check.success, check.get("mismatches")
    assert greedy_ids(fresh) == reference_ids(tiny_qwen3_moe_v2)


def test_check_weights_takes_a_per_expert_manifest(engine, tiny_qwen3_moe):
    """The checkpoint's own per-expert layout, which every transport takes, also verifies: its experts are compared
    expert by expert; a wrong or missing expert is named, and skip_tensor_list may name one expert."""
    from hotswap.trainer import verify_engine_weights

    per_expert = checkpoint_tensors(tiny_qwen3_moe)
    name = "model.layers.2.mlp.experts.5.down_proj.weight"
    assert verify_engine_weights(engine, per_expert).success
    wrong = {**per_expert, name: per_expert[name] + 1}
    assert verify_engine_weights(engine, wrong).get("mismatches") == [name]
    missing = {k: v for k, v in per_expert.items() if k != name}
    assert verify_engine_weights(engine, missing).get("mismatches") == [name]
    assert engine.check_weights("checksum", expected=state_dict_manifest(wrong), skip_tensor_list=[name]).success
    other = "model.layers.2.mlp.experts.6.down_proj.weight"  # the stacked parameter's other experts are still compared
    res = engine.check_weights("checksum", expected=state_dict_manifest({**wrong, other: per_expert[other] * 2}), skip_tensor_list=[name])
    assert res.mismatches == [other]
    fused = hf_state(tiny_qwen3_moe)
    down = "model.layers.2.mlp.experts.down_proj"
    changed = {**fused, down: fused[down].clone().index_fill_(0, torch.tensor([5]), 0.0)}
    assert not engine.check_weights("checksum", expected=state_dict_manifest(changed)).success
    assert engine.check_weights("checksum", expected=state_dict_manifest(changed), skip_tensor_list=[name]).success
    assert engine.check_weights("checksum", expected=state_dict_manifest(hf_state(tiny_qwen3_moe))).success  # fused, as before
