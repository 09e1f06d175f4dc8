"""The tiny checkpoints must look like real Hugging Face ones, or engine tests built on them prove nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from hotswap.testing.tiny_models import FAMILIES, build_tiny_checkpoint


def _state(path: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        tensors.update(load_file(f))
    return tensors


@pytest.fixture(params=FAMILIES)
def checkpoint(request: pytest.FixtureRequest) -> Path:
    return request.getfixturevalue(f"tiny_{request.param}")


def test_loads_and_generates_varied_tokens(checkpoint: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(checkpoint).eval()
    tok = AutoTokenizer.from_pretrained(checkpoint)
    assert model.config.vocab_size == len(tok)
    ids = tok("Alice counts 12 apples", return_tensors="pt")["input_ids"]
    out = model.generate(ids, max_new_tokens=12, min_new_tokens=12, do_sample=False)
    new = out[0, ids.shape[1]:].tolist()
    assert len(new) == 12
    assert len(set(new)) >= 3, new


def test_tokenizer_round_trips_and_renders_chat(checkpoint: Path) -> None:
    tok = AutoTokenizer.from_pretrained(checkpoint)
    text = "What is 12+7? The answer is 19.\n  tabs\tünïcödé 🙂"
    ids = tok(text)["input_ids"]
    assert tok.decode(ids) == text
    assert tok.eos_token == tok.pad_token == "<|endoftext|>"
    assert ids[0] != tok.eos_token_id  # no BOS prepended
    rendered = tok.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    assert rendered == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n"
    assert tok.convert_ids_to_tokens(tok(rendered)["input_ids"][:1]) == ["<|im_start|>"]
    gen = json.loads((checkpoint / "generation_config.json").read_text())
    assert gen["eos_token_id"] == tok.eos_token_id


def test_llama_variant_options(tiny_llama: Path) -> None:
    config = AutoConfig.from_pretrained(tiny_llama)
    assert config.head_dim == 32 and config.hidden_size // config.num_attention_heads == 16
    assert config.tie_word_embeddings
    assert config.rope_parameters["rope_type"] == "llama3"
    assert "lm_head.weight" not in _state(tiny_llama)


def test_sharded_checkpoint_has_index_and_shards(tiny_qwen3_sharded: Path, tiny_qwen3: Path) -> None:
    index = json.loads((tiny_qwen3_sharded / "model.safetensors.index.json").read_text())
    shards = sorted(tiny_qwen3_sharded.glob("model-*-of-*.safetensors"))
    assert len(shards) > 1
    assert set(index["weight_map"].values()) == {s.name for s in shards}
    sharded, single = _state(tiny_qwen3_sharded), _state(tiny_qwen3)
    assert sharded.keys() == single.keys()
    assert all(torch.equal(sharded[k], single[k]) for k in single)  # same seed -> same weights


def test_perturbed_checkpoint_differs_with_same_layout(tiny_qwen3: Path, tiny_qwen3_v2: Path) -> None:
    old, new = _state(tiny_qwen3), _state(tiny_qwen3_v2)
    assert old.keys() == new.keys()
    for name in old:
        assert old[name].shape == new[name].shape and old[name].dtype == new[name].dtype
        assert not torch.equal(old[name], new[name]), name
    AutoModelForCausalLM.from_pretrained(tiny_qwen3_v2)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_dtype(tmp_path: Path, dtype: str) -> None:
    path = build_tiny_checkpoint(tmp_path, "qwen3", dtype=dtype, num_hidden_layers=1)
    assert {t.dtype for t in _state(path).values()} == {getattr(torch, dtype)}
    assert json.loads((path / "config.json").read_text())["torch_dtype"] == dtype
