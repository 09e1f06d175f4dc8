"""A checkpoint folder without tokenizer files is refused at load, naming what is missing (transformers would
build an empty tokenizer that encodes every text to nothing and decodes every output to "")."""

import shutil

import pytest

from hotswap import Engine
from hotswap.errors import HotswapError


def test_a_checkpoint_without_tokenizer_files_is_refused(tiny_qwen3, tmp_path):
    folder = tmp_path / "no_tokenizer"
    shutil.copytree(tiny_qwen3, folder)
    for f in folder.iterdir():
        if f.name.startswith(("tokenizer", "vocab", "merges", "special_tokens", "chat_template")):
            f.unlink()
    with pytest.raises(HotswapError, match="no vocabulary"):
        Engine(str(folder), device="cpu", page_size=4)


def test_its_tokenizer_from_tokenizer_path_serves(tiny_qwen3, tmp_path):
    folder = tmp_path / "no_tokenizer"
    shutil.copytree(tiny_qwen3, folder)
    for f in folder.glob("tokenizer*"):
        f.unlink()
    with Engine(str(folder), device="cpu", page_size=4, tokenizer_path=str(tiny_qwen3)) as engine:
        assert engine.generate("Alice likes", {"max_new_tokens": 2})["meta_info"]["completion_tokens"] == 2
