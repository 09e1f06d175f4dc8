"""The demo's built-in policy: a tiny Qwen3 with a character-level tokenizer over digits.

Nothing is downloaded. The vocabulary is 14 tokens (`<|endoftext|>`, `0`-`9`, `+`, `=`, space), so a
random policy picks the right one-digit answer about 1 time in 14, and a tiny model can learn the
demo's tasks by reinforcement alone within a minute or two on a laptop CPU.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch

EOS_TOKEN = "<|endoftext|>"
CHARS = "0123456789+= "


def build_char_tokenizer(out_dir: str | Path):
    """One token per character of `CHARS`, plus EOS; saved as a fast tokenizer AutoTokenizer can load."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {EOS_TOKEN: 0, **{c: i + 1 for i, c in enumerate(CHARS)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=EOS_TOKEN))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS_TOKEN, pad_token=EOS_TOKEN, model_max_length=512)
    hf.save_pretrained(out_dir)
    return hf


def build_digit_model(out_dir: str | Path, *, hidden_size: int = 64, num_layers: int = 2, seed: int = 0,
                      dtype: str = "float32") -> Path:
    """Write a randomly initialised Qwen3 causal LM with the character tokenizer as a HF folder.

    Initialisation is transformers' own (`from_config` under `torch.manual_seed(seed)`): a near-uniform
    policy, the honest starting point for the demo's chance-level reward."""
    from transformers import AutoModelForCausalLM, GenerationConfig, Qwen3Config
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = build_char_tokenizer(out)
    heads = max(2, hidden_size // 32)
    config = Qwen3Config(
        vocab_size=len(tok), hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=num_layers,
        num_attention_heads=heads, num_key_value_heads=max(1, heads // 2), head_dim=hidden_size // heads,
        max_position_embeddings=64, tie_word_embeddings=False, bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config = GenerationConfig(bos_token_id=0, eos_token_id=0, pad_token_id=0)
    model.to(getattr(torch, dtype))
    model.save_pretrained(out)
    # older readers (and hotswap's ModelConfig) look for torch_dtype
    cfg = json.loads((out / "config.json").read_text())
    cfg["torch_dtype"] = dtype
    (out / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    return out


def cached_digit_model(cache_dir: str | Path, *, hidden_size: int = 64, num_layers: int = 2, seed: int = 0,
                       dtype: str = "float32") -> Path:
    """`build_digit_model` into `cache_dir/digits-h{hidden}-l{layers}-s{seed}-{dtype}`, built once."""
    path = Path(cache_dir) / f"digits-h{hidden_size}-l{num_layers}-s{seed}-{dtype}"
    if not (path / "config.json").is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=path.name + ".tmp-"))
        build_digit_model(tmp, hidden_size=hidden_size, num_layers=num_layers, seed=seed, dtype=dtype)
        try:
            tmp.rename(path)  # atomic: a concurrent builder either wins or finds the folder complete
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
    return path
