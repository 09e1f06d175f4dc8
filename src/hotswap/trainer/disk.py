"""Push weights through a filesystem the engines can read: write a sharded HF checkpoint (safetensors,
plus config and tokenizer files copied from a template folder), then `update_weights_from_disk`."""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import torch
from safetensors.torch import save_file

from hotswap.trainer.client import EngineHandle, EngineResult
from hotswap.trainer.push import DEFAULT_CALL_TIMEOUT_S, WeightPusher, WeightPushError, failure_reason
from hotswap.wire.buckets import BucketMetadata, Weights, iter_buckets, iter_named_tensors, tensor_nbytes

# Files beside the weights that make a folder a complete checkpoint.
SIDE_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
              "chat_template.jinja", "vocab.json", "merges.txt", "tokenizer.model", "added_tokens.json")


def save_hf_checkpoint(weights: Weights | Iterable[tuple[str, torch.Tensor]], path: str | Path, *, template_dir: str | Path | None = None,
                       max_shard_bytes: int = 5 * 1024**3, dtype: torch.dtype | None = None) -> list[Path]:
    """Write `weights` as a HF checkpoint folder: `model.safetensors`, or `model-0000i-of-0000n.safetensors`
    shards with `model.safetensors.index.json`; config/tokenizer files come from `template_dir`. One shard is
    held in host memory at a time. Refuses a folder that already holds safetensors files."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if any(path.glob("*.safetensors")):
        raise FileExistsError(f"{path} already holds safetensors files; choose an empty folder")
    tmp_names: list[Path] = []
    index: dict[str, str] = {}
    total = 0
    for k, shard in enumerate(iter_buckets(iter_named_tensors(weights), max_shard_bytes, dtype)):
        BucketMetadata.of(shard, dtype)
        tensors, storages = {}, set()
        for name, t in shard:
            host = t.detach().to(device="cpu", dtype=dtype or t.dtype).contiguous()
            ptr = host.untyped_storage().data_ptr()
            if ptr in storages and host.numel():
                host = host.clone()  # safetensors refuses tensors that share memory
            storages.add(host.untyped_storage().data_ptr())
            tensors[name] = host
            total += tensor_nbytes(t, dtype)
        f = path / f"shard-{k:05d}.safetensors.tmp"
        save_file(tensors, str(f), metadata={"format": "pt"})
        tmp_names.append(f)
        index.update({name: f.name for name in tensors})
        del tensors
    n = len(tmp_names)
    final = {}
    for i, f in enumerate(tmp_names, start=1):
        name = "model.safetensors" if n == 1 else f"model-{i:05d}-of-{n:05d}.safetensors"
        f.rename(path / name)
        final[f.name] = name
    if n > 1:
        (path / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": {k: final[v] for k, v in index.items()}}, indent=2))
    if template_dir is not None:
        src = Path(template_dir)
        for side in SIDE_FILES:
            if (src / side).is_file():
                shutil.copy2(src / side, path / side)
    return [path / final[f.name] for f in tmp_names]


class DiskWeightPusher(WeightPusher):
    """Write a checkpoint under `root_dir` (a fresh subfolder per push; a temporary folder when None) and
    have every engine load it with `update_weights_from_disk`. The folder is removed after a push unless
    `keep=True`. The engines must see the same filesystem path."""

    def __init__(self, engines: EngineHandle | Sequence[EngineHandle], *, template_dir: str | Path, root_dir: str | Path | None = None,
                 max_shard_bytes: int = 5 * 1024**3, dtype: torch.dtype | None = None, keep: bool = False,
                 flush_cache: bool = True, use_sessions: bool = True, call_timeout_s: float | None = DEFAULT_CALL_TIMEOUT_S):
        super().__init__(engines, bucket_bytes=max_shard_bytes, dtype=dtype, flush_cache=flush_cache, use_sessions=use_sessions,
                         call_timeout_s=call_timeout_s)
        self.template_dir = Path(template_dir)
        if not (self.template_dir / "config.json").is_file():
            raise FileNotFoundError(f"template_dir {str(self.template_dir)!r} has no config.json")
        self.root_dir = Path(root_dir) if root_dir is not None else None
        self.keep = keep
        self.last_path: Path | None = None
        self._count = 0

    def _folder(self, weight_version: str | None) -> Path:
        self._count += 1
        tag = re.sub(r"[^A-Za-z0-9_.-]", "_", weight_version or f"push-{self._count}")
        if self.root_dir is None:
            return Path(tempfile.mkdtemp(prefix=f"hotswap-{tag}-"))
        path = self.root_dir / tag
        k = 1
        while path.exists():
            k += 1
            path = self.root_dir / f"{tag}.{k}"
        return path

    def _send(self, named, weight_version: str | None, progress: Callable | None) -> dict:
        path = self._folder(self.push_version)
        self.last_path = path
        counts = {"num_tensors": 0, "num_bytes": 0}

        def counted():
            for name, t in named:
                counts["num_tensors"] += 1
                counts["num_bytes"] += tensor_nbytes(t, self.dtype)
                yield name, t

        try:
            files = save_hf_checkpoint(counted(), path, template_dir=self.template_dir, max_shard_bytes=self.bucket_bytes, dtype=self.dtype)
            results: list[EngineResult] = self.call_each("update_weights_from_disk", str(path), weight_version=weight_version,
                                                         flush_cache=self.flush_cache)
            if not all(results):
                raise WeightPushError(failure_reason("update_weights_from_disk", results, self.engines), results=results)
            if progress is not None:
                progress(0, counts["num_tensors"], counts["num_bytes"])
            return {**counts, "num_buckets": len(files), "last_results": results}
        finally:
            if not self.keep:
                shutil.rmtree(path, ignore_errors=True)
