"""Write the live weights as a sharded HF checkpoint (loadable by transformers and hotswap).

Tensors come from `whole(names)`, which yields each HF tensor whole: a tensor-parallel engine gathers its
slices to rank 0 there, so the files are the same at every TP size."""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from safetensors.torch import save_file

from hotswap.errors import HotswapError
from hotswap.weights.mapping import WeightMap

# Files beside the weights that make a folder a complete checkpoint.
_SIDE_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
               "special_tokens_map.json", "chat_template.jinja", "vocab.json", "merges.txt", "tokenizer.model")


Whole = Callable[[list[str]], Iterable[tuple[str, torch.Tensor]]]


def save_sharded(weight_map: WeightMap, whole: Whole, path: Path, source_model_path: str, *, pattern: str | None, max_size: int) -> list[Path]:
    if max_size <= 0:
        raise HotswapError(f"max_size must be positive, got {max_size}")
    path.mkdir(parents=True, exist_ok=True)
    if any(path.glob("*.safetensors")):
        raise HotswapError(f"{path} already holds safetensors files; choose an empty folder")
    sizes = {name: torch.Size(slot.hf_shape).numel() * slot.dtype.itemsize for name, slot in weight_map.slots.items()}
    shards: list[list[str]] = [[]]
    size = 0
    for name in weight_map.names:
        n = sizes[name]
        if shards[-1] and size + n > max_size:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += n
    total = len(shards)
    files, index = [], {}
    for i, names in enumerate(shards, start=1):
        fname = pattern.format(rank=0, part=i, total=total) if pattern else (
            "model.safetensors" if total == 1 else f"model-{i:05d}-of-{total:05d}.safetensors")
        tensors = {part: t.detach().contiguous().cpu() for n, w in whole(names) for part, t in weight_map.checkpoint_layout(n, w)}
        save_file(tensors, str(path / fname), metadata={"format": "pt"})
        files.append(path / fname)
        index.update({n: fname for n in tensors})
    if total > 1 or pattern:
        (path / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": sum(sizes.values())}, "weight_map": index}, indent=2))
    src = Path(source_model_path)
    for side in _SIDE_FILES:
        if (src / side).is_file():
            shutil.copy2(src / side, path / side)
    return files


def save_remote(weight_map: WeightMap, whole: Whole, url: str, source_model_path: str, max_size: int = 5 * 1024**3) -> None:
    """Save to a temporary folder, then upload it with fsspec (s3://, gs://, memory://, file://, ...)."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(url)
    with tempfile.TemporaryDirectory() as tmp:
        save_sharded(weight_map, whole, Path(tmp), source_model_path, pattern=None, max_size=max_size)
        fs.makedirs(root, exist_ok=True)
        for f in sorted(Path(tmp).iterdir()):
            fs.put_file(str(f), f"{root.rstrip('/')}/{f.name}")
