"""Checkpoint variants against transformers: every rope type hotswap serves (both config spellings), o_proj and MLP
biases, Qwen2's always-on q/k/v bias, rotary tables that cover the served context, and clear refusals of what the
decoder does not compute."""

from __future__ import annotations

import json

import pytest
import torch
from hf_reference import assert_greedy_matches_hf, prompt_ids
from transformers import AutoModelForCausalLM, LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from hotswap import Engine
from hotswap.config import ModelConfig, _rope
from hotswap.errors import HotswapError, UnsupportedModelError
from hotswap.models.layers import RotaryEmbedding
from hotswap.testing.tiny_models import build_tiny_checkpoint, build_tokenizer

ROPES = {
    "linear": {"rope_type": "linear", "factor": 2.0},
    "dynamic": {"rope_type": "dynamic", "factor": 2.0},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128},
    "yarn_tuned": {"rope_type": "yarn", "factor": 3.0, "original_max_position_embeddings": 128, "attention_factor": 0.9,
                   "beta_fast": 16, "beta_slow": 2, "truncate": False},
    "yarn_mscale": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128, "mscale": 1.0, "mscale_all_dim": 0.5},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 128},
}
PROMPTS = [prompt_ids(1, 5), prompt_ids(2, 23), prompt_ids(3, 60)]


@pytest.mark.parametrize("name", sorted(ROPES))
@pytest.mark.parametrize("spelling", ["transformers5", "transformers4"])
def test_rotary_table_equals_transformers_cos_sin(name, spelling):
    rope = ROPES[name]
    config = LlamaConfig(hidden_size=64, num_attention_heads=4, head_dim=16, max_position_embeddings=512,
                         rope_parameters={**rope, "rope_theta": 5000.0})
    positions = torch.arange(512)[None]
    cos, sin = LlamaRotaryEmbedding(config)(torch.zeros(1, dtype=torch.float32), positions)
    legacy = {("type" if name in ("linear", "dynamic") else "rope_type"): rope["rope_type"],
              **{k: v for k, v in rope.items() if k != "rope_type"}}
    raw = ({"rope_parameters": {**rope, "rope_theta": 5000.0}, "max_position_embeddings": 512} if spelling == "transformers5"
           else {"rope_scaling": legacy, "rope_theta": 5000.0, "max_position_embeddings": 512})
    theta, scaling = _rope(raw)
    table = RotaryEmbedding(16, 512, theta, scaling, torch.device("cpu"), 512).cos_sin
    torch.testing.assert_close(table[:, :8], cos[0, :, :8], atol=1e-6, rtol=0)
    torch.testing.assert_close(table[:, 8:], sin[0, :, :8], atol=1e-6, rtol=0)
    if name != "dynamic":  # dynamic scales only past max_position_embeddings
        plain = RotaryEmbedding(16, 512, theta, None, torch.device("cpu")).cos_sin
        assert not torch.allclose(table, plain)


@pytest.mark.parametrize("family,name", [("qwen3", "yarn"), ("qwen2", "linear"), ("llama", "yarn_tuned"), ("qwen3", "dynamic")])
def test_scaled_rope_checkpoints_generate_transformers_tokens(family, name, tmp_path):
    path = build_tiny_checkpoint(tmp_path, family, rope_scaling=ROPES[name])
    with Engine(str(path), device="cpu", page_size=4, chunked_prefill_size=16) as eng:
        outs = eng.generate(input_ids=PROMPTS, sampling_params={"max_new_tokens": 6, "temperature": 0, "ignore_eos": True},
                            return_logprob=True)
    assert_greedy_matches_hf(path, PROMPTS, outs, 6)


def _llama_with_biases(path, hidden_size: int = 64, dtype: torch.dtype = torch.float32, **flags):
    """A tiny Llama with transformers' attention_bias (q/k/v and o_proj) and mlp_bias (gate, up, down) switches."""
    tok = build_tokenizer(path)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, **flags)
    model = AutoModelForCausalLM.from_config(config).to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    model.save_pretrained(path)
    return path


@pytest.mark.parametrize("flags", [{"attention_bias": True}, {"mlp_bias": True}])
def test_llama_biases_load_and_match_transformers(flags, tmp_path):
    path = _llama_with_biases(tmp_path, **flags)
    with Engine(str(path), device="cpu", page_size=4) as eng:
        outs = eng.generate(input_ids=PROMPTS, sampling_params={"max_new_tokens": 6, "temperature": 0, "ignore_eos": True},
                            return_logprob=True)
    assert_greedy_matches_hf(path, PROMPTS, outs, 6)


def test_qwen3_attention_bias_and_qwen2_bias_whatever_the_config_says(tmp_path):
    qwen3 = build_tiny_checkpoint(tmp_path / "qwen3", "qwen3", attention_bias=True)
    qwen2 = build_tiny_checkpoint(tmp_path / "qwen2", "qwen2")
    config = json.loads((qwen2 / "config.json").read_text())
    (qwen2 / "config.json").write_text(json.dumps({**config, "attention_bias": False}))  # Qwen2Attention ignores it
    for path in (qwen3, qwen2):
        with Engine(str(path), device="cpu", page_size=4) as eng:
            outs = eng.generate(input_ids=PROMPTS[:2], sampling_params={"max_new_tokens": 4, "temperature": 0, "ignore_eos": True},
                                return_logprob=True)
        assert_greedy_matches_hf(path, PROMPTS[:2], outs, 4)


def _patched(path, **keys):
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, **keys}))
    return path


def test_what_the_decoder_does_not_compute_is_refused_by_name(tiny_qwen2, tmp_path):
    import shutil

    path = tmp_path / "m"
    shutil.copytree(tiny_qwen2, path)
    with pytest.raises(UnsupportedModelError, match="sliding-window attention"):
        ModelConfig.from_pretrained(_patched(path, use_sliding_window=True, sliding_window=8, max_window_layers=1, layer_types=None))
    _patched(path, use_sliding_window=False)
    with pytest.raises(UnsupportedModelError, match="hidden_act 'gelu'"):
        ModelConfig.from_pretrained(_patched(path, hidden_act="gelu"))
    _patched(path, hidden_act="silu")
    with pytest.raises(UnsupportedModelError, match="unsupported rope type 'longrope'"):
        ModelConfig.from_pretrained(_patched(path, rope_scaling={"rope_type": "longrope", "short_factor": [1.0] * 8,
                                                                 "long_factor": [2.0] * 8, "original_max_position_embeddings": 128}))


def test_a_context_past_max_position_embeddings_needs_sglangs_switch_and_then_is_served(tmp_path, monkeypatch):
    path = build_tiny_checkpoint(tmp_path, "qwen3", max_position_embeddings=64)
    monkeypatch.delenv("SGLANG_ALLOW_OVERWRITE_LONGER_CONTEXT_LEN", raising=False)
    with pytest.raises(HotswapError, match="SGLANG_ALLOW_OVERWRITE_LONGER_CONTEXT_LEN"):
        Engine(str(path), device="cpu", max_context_len=256)
    monkeypatch.setenv("SGLANG_ALLOW_OVERWRITE_LONGER_CONTEXT_LEN", "1")
    with Engine(str(path), device="cpu", page_size=4, max_context_len=256) as eng:
        out = eng.generate(input_ids=prompt_ids(4, 100), sampling_params={"max_new_tokens": 4, "temperature": 0, "ignore_eos": True})
    assert out["meta_info"]["finish_reason"]["type"] == "length" and len(out["output_ids"]) == 4  # was an internal error
    dynamic = build_tiny_checkpoint(tmp_path / "dynamic", "qwen3", max_position_embeddings=64, rope_scaling=ROPES["dynamic"])
    with pytest.raises(HotswapError, match="dynamic rope"):
        Engine(str(dynamic), device="cpu", max_context_len=256)


def test_derived_context_length_is_sglangs(tmp_path):
    """SGLang's get_context_length: max_position_embeddings times the rope's factor unless the rope names its
    original_max_position_embeddings (or is llama3); a YaRN table past max_position_embeddings is transformers'."""
    cases = {"yarn_bare": ({"rope_type": "yarn", "factor": 4.0}, 256), "yarn": (ROPES["yarn"], 64), "linear": (ROPES["linear"], 128),
             "llama3": (ROPES["llama3"], 64), "dynamic": (ROPES["dynamic"], 64)}
    for name, (rope, served) in cases.items():
        path = build_tiny_checkpoint(tmp_path / name, "llama", max_position_embeddings=64, rope_scaling=rope)
        raw = json.loads((path / "config.json").read_text())
        raw.pop("rope_parameters", None)  # transformers 4's spelling alone: save_pretrained fills in the original length
        (path / "config.json").write_text(json.dumps(raw))
        with Engine(str(path), device="cpu", page_size=4, num_pages=128) as eng:
            assert eng.max_context_len == served, name
            if name == "yarn_bare":
                config = LlamaConfig(hidden_size=64, num_attention_heads=4, head_dim=16, max_position_embeddings=64,
                                     rope_parameters={**rope, "rope_theta": raw.get("rope_theta", 10000.0)})
                cos, sin = LlamaRotaryEmbedding(config)(torch.zeros(1), torch.arange(256)[None])
                table = eng.model_runner.model.model.rotary.cos_sin
                torch.testing.assert_close(table[:256, :8], cos[0, :, :8], atol=1e-6, rtol=0)


def test_rotary_caches_saved_in_a_checkpoint_are_skipped(tmp_path):
    from safetensors.torch import load_file, save_file

    path = build_tiny_checkpoint(tmp_path, "llama")
    tensors = load_file(path / "model.safetensors")
    for leaf in ("inv_freq", "cos_cached", "sin_cached"):  # old Llama exports, ColossalAI
        tensors[f"model.layers.0.self_attn.rotary_emb.{leaf}"] = torch.ones(8)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    with Engine(str(path), device="cpu", page_size=4) as eng:
        outs = eng.generate(input_ids=PROMPTS[:1], sampling_params={"max_new_tokens": 4, "temperature": 0, "ignore_eos": True},
                            return_logprob=True)
    assert_greedy_matches_hf(path, PROMPTS[:1], outs, 4)


GPU_CASES = ["yarn", "biases"]


def _gpu_checkpoint(case: str, path, dtype: str):
    """Wide enough (hidden 128) for the few-rows matmul's tiles: decode batches of 4 run every projection through it, the
    biases and YaRN's scaled table through the epilogues (bias before SiLU-and-mul; q/k rotated in the heads epilogue)."""
    if case == "yarn":
        return build_tiny_checkpoint(path, "qwen3", hidden_size=128, intermediate_size=256, dtype=dtype, rope_scaling=ROPES["yarn"])
    return _llama_with_biases(path, hidden_size=128, dtype=getattr(torch, dtype), attention_bias=True, mlp_bias=True)


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_CASES)
def test_variants_on_cuda_float32_match_transformers(case, tmp_path):
    """Triton attention and the decode graphs on YaRN's table and the o_proj / MLP biases: HF's tokens and logprobs."""
    path = _gpu_checkpoint(case, tmp_path, "float32")
    with Engine(str(path), device="cuda", page_size=16) as eng:
        outs = eng.generate(input_ids=PROMPTS, sampling_params={"max_new_tokens": 6, "temperature": 0, "ignore_eos": True},
                            return_logprob=True)
    assert_greedy_matches_hf(path, PROMPTS, outs, 6)


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_CASES)
def test_variants_in_bf16_through_the_few_rows_kernels(case, tmp_path):
    from hf_reference import assert_bf16_greedy_within_hf_rounding

    path = _gpu_checkpoint(case, tmp_path, "bfloat16")
    prompts = [prompt_ids(90 + i, 12 + 3 * i) for i in range(4)]
    with Engine(str(path), device="cuda", dtype="bfloat16") as eng:
        assert eng.model_runner.use_rows_matmul(4)
        outs = eng.generate(input_ids=prompts, sampling_params={"max_new_tokens": 12, "temperature": 0, "ignore_eos": True})
    assert_bf16_greedy_within_hf_rounding(path, prompts, [o["output_ids"] for o in outs])
