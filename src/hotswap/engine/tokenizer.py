"""Load the engine's tokenizer: from the model folder or `tokenizer_path`, with an optional chat template
file replacing the tokenizer's own (SGLang's --tokenizer-path and --chat-template); none at all under SGLang's
skip_tokenizer_init (token ids in, token ids out)."""

from __future__ import annotations

from pathlib import Path

from transformers import AutoTokenizer

from hotswap.config import EngineConfig
from hotswap.errors import HotswapError, shown

SKIPPED_MESSAGE = ("The engine initialized with skip_tokenizer_init=True cannot accept text prompts. Please provide input_ids "
                   "or re-initialize the engine with skip_tokenizer_init=False.")  # SGLang's words (TokenizerManager)


def skips_tokenizer(config: EngineConfig) -> bool:
    """SGLang's skip_tokenizer_init: no tokenizer is loaded (the folder need hold none); requests give input_ids,
    replies carry output_ids and no text."""
    return bool(config.sglang_settings.get("skip_tokenizer_init"))


def load_tokenizer(config: EngineConfig):
    """The tokenizer `config` names, or None under skip_tokenizer_init. Remote code is never run (no
    trust_remote_code): hotswap serves only the architectures it implements, whose tokenizers transformers loads itself."""
    if skips_tokenizer(config):
        return None
    source = config.tokenizer_path or config.model_path
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except Exception as exc:
        raise HotswapError(f"cannot load a tokenizer from {shown(source)}: {exc}") from exc
    if set(tokenizer.get_vocab()) <= set(tokenizer.all_special_tokens):
        # transformers builds an empty tokenizer for a folder without tokenizer files: every text prompt would
        # encode to nothing and every output decode to ""
        raise HotswapError(f"the tokenizer loaded from {shown(source)} has no vocabulary (only special tokens): the folder holds "
                           f"no tokenizer files (tokenizer.json, tokenizer.model or vocab.json); copy them in or give tokenizer_path")
    if config.chat_template:
        path = Path(config.chat_template).expanduser()
        if not path.is_file():
            raise HotswapError(f"chat_template {shown(config.chat_template)} is not a file (give a Jinja template file)")
        try:
            tokenizer.chat_template = path.read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise HotswapError(f"cannot read chat_template {shown(config.chat_template)}: {exc}") from exc
    return tokenizer
