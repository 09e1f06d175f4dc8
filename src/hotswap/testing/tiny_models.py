"""Build tiny random Hugging Face checkpoints and a trained byte-level BPE tokenizer.

Nothing can be downloaded in tests or the demo, so every model is generated
locally: real transformers config classes, real ``save_pretrained`` layouts
(single file or sharded safetensors), and weights re-drawn from a seeded
generator so that outputs are reproducible yet not degenerate.
"""

from __future__ import annotations

import atexit
import json
import random
import shutil
import tempfile
import zlib
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoModelForCausalLM,
    GenerationConfig,
    LlamaConfig,
    PretrainedConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2MoeConfig,
    Qwen3Config,
    Qwen3MoeConfig,
)

FAMILIES = ("llama", "qwen2", "qwen3", "qwen3_moe", "qwen2_moe")

# The tiny Qwen3-MoE: 8 experts, top-2 renormalised, and (with 3 layers) a dense layer in the middle.
TINY_MOE = {"num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 32, "norm_topk_prob": True,
            "decoder_sparse_step": 1, "mlp_only_layers": [1]}
# Qwen2-MoE adds a gated shared expert and keeps the routing weights unnormalised (its default)
TINY_QWEN2_MOE = {**TINY_MOE, "norm_topk_prob": False, "shared_expert_intermediate_size": 48}

EOS_TOKEN = "<|endoftext|>"
SPECIAL_TOKENS = (EOS_TOKEN, "<|im_start|>", "<|im_end|>")

# Qwen-style ChatML; `add_generation_prompt` opens the assistant turn.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- endif -%}"
)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_CONFIG_CLASSES: dict[str, type[PretrainedConfig]] = {
    "llama": LlamaConfig,
    "qwen2": Qwen2Config,
    "qwen3": Qwen3Config,
    "qwen3_moe": Qwen3MoeConfig,
    "qwen2_moe": Qwen2MoeConfig,
}

# vocab_size -> temp dir holding the saved tokenizer; training once per process keeps fixtures cheap.
_TOKENIZER_CACHE: dict[int, Path] = {}


def _patch_json(path: Path, extra: dict[str, Any]) -> None:
    """Merge keys into a JSON file that transformers already wrote."""
    data = json.loads(path.read_text())
    data.update(extra)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _corpus() -> list[str]:
    """A few hundred deterministic English/arithmetic lines, varied enough for BPE to learn merges."""
    rng = random.Random(0)
    names = ["Alice", "Bob", "Carol", "Dave", "Eve", "Frank", "Grace", "Heidi"]
    verbs = ["likes", "sees", "finds", "counts", "reads", "writes", "takes", "gives"]
    things = ["apples", "books", "numbers", "stones", "letters", "cards", "birds", "coins"]
    places = ["in the garden", "at school", "on the table", "by the river", "at home", "in the box"]
    words = ["the", "a", "and", "is", "of", "to", "what", "answer", "question", "sum", "plus", "minus",
             "equals", "total", "first", "then", "finally", "because", "therefore", "so"]
    lines = []
    for _ in range(150):
        lines.append(f"{rng.choice(names)} {rng.choice(verbs)} {rng.randint(1, 99)} "
                     f"{rng.choice(things)} {rng.choice(places)}.")
    for _ in range(150):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        lines.append(f"{a}+{b}={a + b}" if rng.random() < 0.6 else f"What is {a} plus {b}? The answer is {a + b}.")
    for _ in range(100):
        lines.append(" ".join(rng.choice(words) for _ in range(rng.randint(4, 12))).capitalize() + "!")
    lines.extend(" ".join(str(i) for i in range(start, start + 10)) for start in range(0, 100, 10))
    return lines


def _train_tokenizer(vocab_size: int, out_dir: Path) -> None:
    """Train byte-level BPE (GPT-2/Qwen style: no BOS, exact byte round-trip) and save it."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        additional_special_tokens=list(SPECIAL_TOKENS[1:]),
        chat_template=CHAT_TEMPLATE,
        model_max_length=32768,
    )
    hf_tok.save_pretrained(out_dir)
    # Published checkpoints name the generic fast class and keep the template inline; transformers 5
    # would otherwise write its own class name, which older readers do not know.
    _patch_json(out_dir / "tokenizer_config.json",
                {"tokenizer_class": "PreTrainedTokenizerFast", "chat_template": CHAT_TEMPLATE})


def build_tokenizer(out_dir: str | Path, vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """Write a trained byte-level BPE tokenizer with a ChatML template into ``out_dir`` and load it."""
    cached = _TOKENIZER_CACHE.get(vocab_size)
    if cached is None:
        cached = Path(tempfile.mkdtemp(prefix=f"hotswap-tok{vocab_size}-"))
        atexit.register(shutil.rmtree, cached, True)
        _train_tokenizer(vocab_size, cached)
        _TOKENIZER_CACHE[vocab_size] = cached
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for f in cached.iterdir():
        shutil.copy2(f, out / f.name)
    return PreTrainedTokenizerFast.from_pretrained(out)


def _make_config(family: str, **kw: Any) -> PretrainedConfig:
    """Instantiate the family's own transformers config, applying only what that class understands."""
    if family not in _CONFIG_CLASSES:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")
    if family in ("qwen2", "qwen2_moe"):
        # Qwen2 always has q/k/v biases and no attention_bias switch (Qwen2-MoE calls it qkv_bias).
        kw.pop("attention_bias")
    elif kw["attention_bias"] is None:
        kw["attention_bias"] = False
    if kw["head_dim"] is None:
        kw["head_dim"] = kw["hidden_size"] // kw["num_attention_heads"]
    if family in ("qwen2", "qwen2_moe") and kw["head_dim"] != kw["hidden_size"] // kw["num_attention_heads"]:
        raise ValueError("qwen2 derives head_dim from hidden_size / num_attention_heads")
    head_dim = kw.pop("head_dim")
    config = _CONFIG_CLASSES[family](**kw)
    config.head_dim = head_dim
    return config


@torch.no_grad()
def _reinit_(model: torch.nn.Module, *, seed: int, init_std: float) -> None:
    """Redraw every parameter from one seeded generator so weights are reproducible and non-trivial.

    Norm weights become 1 + N(0, 0.1) rather than exactly 1 so that a norm-scale bug in an engine
    shows up as a numeric mismatch; everything else is N(0, init_std) so greedy decoding varies.
    """
    gen = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        noise = torch.randn(param.shape, generator=gen, dtype=torch.float32)
        if param.dim() == 1 and "norm" in name:
            param.copy_(1.0 + 0.1 * noise)
        else:
            param.copy_(init_std * noise)


def build_tiny_checkpoint(
    out_dir: str | Path,
    family: str = "qwen3",
    *,
    hidden_size: int = 64,
    intermediate_size: int = 128,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    head_dim: int | None = None,
    vocab_size: int | None = None,
    tie_word_embeddings: bool = False,
    dtype: str = "float32",
    max_position_embeddings: int = 512,
    rope_theta: float = 10000.0,
    rope_scaling: dict[str, Any] | None = None,
    init_std: float = 0.2,
    seed: int = 0,
    max_shard_size: str | int | None = None,
    attention_bias: bool | None = None,
    moe: dict[str, Any] | None = None,
) -> Path:
    """Save a random ``family`` causal LM plus tokenizer in Hugging Face layout; return the folder.

    ``vocab_size`` defaults to the tokenizer's size. ``max_shard_size`` (e.g. ``"20KB"``) forces a
    sharded safetensors layout with ``model.safetensors.index.json``. ``moe`` (families ``qwen3_moe``,
    ``qwen2_moe``) overrides ``TINY_MOE`` / ``TINY_QWEN2_MOE``; transformers writes the experts per expert (``experts.{e}.gate_proj.weight``),
    as published checkpoints hold them. ``config.json`` carries both
    the transformers-5 ``rope_parameters``/``dtype`` keys and the legacy ``rope_theta``/
    ``rope_scaling``/``torch_dtype`` keys that published checkpoints use.
    """
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {tuple(_DTYPES)}, got {dtype!r}")
    out = Path(out_dir)
    tokenizer = build_tokenizer(out)
    eos_id = tokenizer.convert_tokens_to_ids(EOS_TOKEN)
    rope_parameters = {"rope_type": "default", **(rope_scaling or {}), "rope_theta": rope_theta}
    config = _make_config(
        family,
        vocab_size=vocab_size or len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        head_dim=head_dim,
        max_position_embeddings=max_position_embeddings,
        rope_parameters=rope_parameters,
        tie_word_embeddings=tie_word_embeddings,
        attention_bias=attention_bias,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
        dtype=dtype,
        **({**{"qwen3_moe": TINY_MOE, "qwen2_moe": TINY_QWEN2_MOE}[family], **(moe or {})} if family.endswith("_moe") else {}),
    )
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _reinit_(model, seed=seed, init_std=init_std)
    model.to(_DTYPES[dtype])
    model.config.dtype = dtype
    model.generation_config = GenerationConfig(bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=eos_id)
    save_kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(out, **save_kwargs)
    _patch_json(out / "config.json", {"rope_theta": rope_theta, "rope_scaling": rope_scaling, "torch_dtype": dtype})
    return out


def perturb_checkpoint(src_dir: str | Path, out_dir: str | Path, *, seed: int, scale: float = 0.05) -> Path:
    """Copy a checkpoint and add seeded N(0, scale) noise to every floating tensor ("new weights").

    Names, shapes, dtypes and shard layout are preserved, so the copy is a drop-in weight update.
    Noise is seeded per tensor name, making it independent of how the checkpoint is sharded.
    """
    src, out = Path(src_dir), Path(out_dir)
    shutil.copytree(src, out, dirs_exist_ok=True)
    for shard in sorted(out.glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as f:
            metadata = f.metadata()
        tensors = load_file(shard)
        for name, t in tensors.items():
            if not t.is_floating_point():
                continue
            gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
            noise = torch.randn(t.shape, generator=gen, dtype=torch.float32)
            tensors[name] = (t.float() + scale * noise).to(t.dtype)
        save_file(tensors, shard, metadata=metadata)
    return out
