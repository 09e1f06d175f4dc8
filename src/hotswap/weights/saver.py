"""Write the live weights as a sharded HF checkpoint (loadable by transformers and hotswap)."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from safetensors.torch import save_file

from hotswap.errors import HotswapError
from hotswap.weights.mapping import WeightMap

# Files beside the weights that make a folder a complete checkpoint.
_SIDE_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
               "special_tokens_map.json", "chat_template.jinja", "vocab.json", "merges.txt", "tokenizer.model")


def save_sharded(weight_map: WeightMap, path: Path, source_model_path: str, *, pattern: str | None, max_size: int, tp_rank: int = 0) -> list[Path]:
    if max_size <= 0:
        raise HotswapError(f"max_size must be positive, got {max_size}")
    if any(not s.is_full for s in weight_map.slots.values()):
        raise HotswapError("this rank holds tensor-parallel slices; saving a sharded TP checkpoint needs a gather first")
    path.mkdir(parents=True, exist_ok=True)
    if any(path.glob("*.safetensors")):
        raise HotswapError(f"{path} already holds safetensors files; choose an empty folder")
    shards: list[list[str]] = [[]]
    size = 0
    for name in weight_map.names:
        n = weight_map.slots[name].dest.numel() * weight_map.slots[name].dest.element_size()
        if shards[-1] and size + n > max_size:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += n
    total = len(shards)
    files, index = [], {}
    for i, names in enumerate(shards, start=1):
        fname = pattern.format(rank=tp_rank, part=i, total=total) if pattern else (
            "model.safetensors" if total == 1 else f"model-{i:05d}-of-{total:05d}.safetensors")
        tensors = {n: weight_map.slots[n].dest.detach().contiguous().cpu() for n in names}
        save_file(tensors, str(path / fname), metadata={"format": "pt"})
        files.append(path / fname)
        index.update({n: fname for n in names})
    if total > 1 or pattern:
        (path / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": weight_map.total_bytes}, "weight_map": index}, indent=2))
    src = Path(source_model_path)
    for side in _SIDE_FILES:
        if (src / side).is_file():
            shutil.copy2(src / side, path / side)
    return files


def save_remote(weight_map: WeightMap, url: str, source_model_path: str, max_size: int = 5 * 1024**3) -> None:
    """Save to a temporary folder, then upload it with fsspec (s3://, gs://, memory://, file://, ...)."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(url)
    with tempfile.TemporaryDirectory() as tmp:
        save_sharded(weight_map, Path(tmp), source_model_path, pattern=None, max_size=max_size)
        fs.makedirs(root, exist_ok=True)
        for f in sorted(Path(tmp).iterdir()):
            fs.put_file(str(f), f"{root.rstrip('/')}/{f.name}")
