"""Write the live weights as a sharded HF checkpoint (loadable by transformers and hotswap).

Tensors come from `whole(names)`, which yields each HF tensor whole: a tensor-parallel engine gathers its
slices to rank 0 there, so the files are the same at every TP size.

A save never writes outside its folder and never replaces a file without `overwrite=True`: the shard-name
`pattern` may only use the fields {rank}, {part} and {total} with plain integer formats and must give plain
file names; each shard is written as `NAME.partial` in a private staging folder made inside the target (mode
0700, a fresh name: a link planted there by someone else who can write to the folder is never written
through) and renamed into place only when every shard is complete, so a failed save leaves nothing behind
and a killed one leaves only its staging folder (which the loader ignores and the next save removes)."""

from __future__ import annotations

import json
import os
import re
import shutil
import string
import tempfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import torch
from safetensors.torch import save_file

from hotswap.errors import HotswapError, shown
from hotswap.weights.mapping import WeightMap

# Files beside the weights that make a folder a complete checkpoint.
_SIDE_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
               "special_tokens_map.json", "chat_template.jinja", "vocab.json", "merges.txt", "tokenizer.model")
_INDEX = "model.safetensors.index.json"
_PARTIAL = ".partial"
_STAGING = ".hotswap-save-"  # + a random part: a save's private folder inside its target
_PATTERN_FIELDS = ("rank", "part", "total")
_INT_SPEC = re.compile(r"0?[1-9]?\d?d?")  # "", "d", "05d", "5": plain integer formats only


Whole = Callable[[list[str]], Iterable[tuple[str, torch.Tensor]]]


def shard_names(pattern: str | None, total: int) -> list[str]:
    """The shard file names for `total` parts. A pattern may use only {rank}, {part} and {total} with plain
    integer formats (no attribute or index lookups, no conversions) and must give distinct plain file names
    ending in .safetensors: nothing outside the target folder can be named."""
    if not pattern:
        return ["model.safetensors"] if total == 1 else [f"model-{i:05d}-of-{total:05d}.safetensors" for i in range(1, total + 1)]
    if not isinstance(pattern, str):
        raise HotswapError(f"pattern must be a string, got {type(pattern).__name__}")
    try:
        fields = list(string.Formatter().parse(pattern))
    except ValueError as exc:
        raise HotswapError(f"pattern {shown(pattern)} is not a valid format string: {exc}") from None
    for _, field_name, spec, conversion in fields:
        if field_name is None:
            continue
        if field_name not in _PATTERN_FIELDS:
            raise HotswapError(f"pattern {shown(pattern)}: field {{{field_name}}} is not allowed; use only {{rank}}, {{part}} and {{total}}")
        if conversion is not None or not _INT_SPEC.fullmatch(spec or ""):
            raise HotswapError(f"pattern {shown(pattern)}: field {{{field_name}}} may only take a plain integer format such as :05d")
    names = [pattern.format(rank=0, part=i, total=total) for i in range(1, total + 1)]
    for name in names:
        if (not name or name != os.path.basename(name) or "\\" in name or "\0" in name or name.startswith(".")
                or not name.endswith(".safetensors") or name == _INDEX):
            raise HotswapError(f"pattern {shown(pattern)} gives {shown(name)}: shard names must be plain file names ending in .safetensors "
                               "(no folders, no leading dot)")
    if len(set(names)) != len(names):
        raise HotswapError(f"pattern {shown(pattern)} gives the same name to several of the {total} shards; use {{part}}")
    return names


def _plan_shards(weight_map: WeightMap, max_size: int) -> tuple[list[list[str]], int]:
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
    return shards, sum(sizes.values())


def _existing(path: Path, written: Sequence[str]) -> list[str]:
    """Files a save into `path` would replace or leave mixed in: the names it writes, and any other shards."""
    clash = {name for name in written if (path / name).exists()}
    clash.update(f.name for f in path.glob("*.safetensors"))
    return sorted(clash)


def save_sharded(weight_map: WeightMap, whole: Whole, path: Path, source_model_path: str, *, pattern: str | None, max_size: int,
                 overwrite: bool = False) -> list[Path]:
    if isinstance(max_size, bool) or not isinstance(max_size, int) or max_size <= 0:
        raise HotswapError(f"max_size must be a positive integer, got {shown(max_size)}")
    shards, total_size = _plan_shards(weight_map, max_size)
    names = shard_names(pattern, len(shards))
    src = Path(source_model_path)
    sides = [s for s in _SIDE_FILES if (src / s).is_file()]
    index = len(shards) > 1 or bool(pattern)
    if path.exists() and not path.is_dir():
        raise HotswapError(f"{path} exists and is not a directory")
    path.mkdir(parents=True, exist_ok=True)
    for stale in path.glob(f"{_STAGING}*"):  # left by a save that was killed
        if stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale, ignore_errors=True)
    clash = _existing(path, [*names, *sides, _INDEX])  # an old index is replaced or removed: it counts either way
    if clash and not overwrite:
        listed = ", ".join(clash[:8]) + (f" and {len(clash) - 8} more" if len(clash) > 8 else "")
        raise HotswapError(f"{path} already holds {listed}; choose an empty folder or pass overwrite=true to replace them")
    staging = Path(tempfile.mkdtemp(prefix=_STAGING, dir=path))
    partial: list[Path] = []
    weight_index: dict[str, str] = {}  # checkpoint tensor name -> its shard (stacked experts are written per expert)
    try:
        for fname, shard in zip(names, shards):
            tmp = staging / (fname + _PARTIAL)
            partial.append(tmp)
            tensors = {part: t.detach().contiguous().cpu() for n, w in whole(shard) for part, t in weight_map.checkpoint_layout(n, w)}
            save_file(tensors, str(tmp), metadata={"format": "pt"})
            weight_index.update(dict.fromkeys(tensors, fname))
        if index:
            tmp = staging / (_INDEX + _PARTIAL)
            partial.append(tmp)
            tmp.write_text(json.dumps({"metadata": {"total_size": total_size}, "weight_map": weight_index}, indent=2))
        for side in sides:
            tmp = staging / (side + _PARTIAL)
            partial.append(tmp)
            shutil.copy2(src / side, tmp)
        # every file is complete: drop shards of an older checkpoint this one replaces, then move the new ones in
        for old in path.glob("*.safetensors"):
            if old.name not in names:
                old.unlink()
        if not index:
            (path / _INDEX).unlink(missing_ok=True)
        for tmp in partial:
            os.replace(tmp, path / tmp.name.removesuffix(_PARTIAL))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return [path / name for name in names]


def _matches_store(url: str, store: str) -> bool:
    """Whether `url` lies in `store` (scheme and prefix; the prefix ends at a path boundary)."""
    store = store.rstrip("/")
    return url == store or url.startswith(store + "/")


def check_remote_url(url: str, stores: Sequence[str]) -> None:
    """Refuse a save_remote_model URL outside the configured stores (a server's --remote-model-stores)."""
    if not isinstance(url, str) or "://" not in url:
        raise HotswapError(f"url {shown(url)} is not a URL like s3://bucket/prefix")
    if ".." in url.split("://", 1)[1].split("/"):
        raise HotswapError(f"url {shown(url)} may not contain '..'")
    if not stores:
        raise HotswapError("save_remote_model is off on this server: start it with --remote-model-stores s3://bucket/prefix[,...]")
    if not any(_matches_store(url, s) for s in stores):
        raise HotswapError(f"url {shown(url)} is outside the stores this server may write to ({', '.join(stores)})")


_REMOTE_TMP = "hotswap-save-remote-"  # + the saving process's id + "-" + a random part


def remove_orphaned_remote_saves() -> list[Path]:
    """Remove the local copies that remote saves of dead processes left (a process killed mid-save runs no
    clean-up): this user's `hotswap-save-remote-PID-*` folders in the temp folder whose PID is gone."""
    removed = []
    for folder in Path(tempfile.gettempdir()).glob(f"{_REMOTE_TMP}*-*"):
        pid = folder.name[len(_REMOTE_TMP):].split("-", 1)[0]
        try:
            mine = folder.is_dir() and not folder.is_symlink() and folder.stat().st_uid == os.getuid()
        except OSError:
            continue
        if mine and pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def save_remote(weight_map: WeightMap, whole: Whole, url: str, source_model_path: str, max_size: int = 5 * 1024**3,
                overwrite: bool = False) -> None:
    """Save to a temporary local folder, then upload it with fsspec (s3://, gs://, memory://, file://, ...).
    Refuses a destination that already holds files unless `overwrite`; a failed upload removes what it put, and
    the local copy a killed save left is removed by the next one."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(url)
    root = root.rstrip("/")
    if not overwrite and fs.exists(root) and (not fs.isdir(root) or fs.ls(root, detail=False)):
        raise HotswapError(f"{url} already exists and is not empty; pass overwrite=true to replace it")
    remove_orphaned_remote_saves()
    with tempfile.TemporaryDirectory(prefix=f"{_REMOTE_TMP}{os.getpid()}-") as tmp:
        save_sharded(weight_map, whole, Path(tmp), source_model_path, pattern=None, max_size=max_size)
        fs.makedirs(root, exist_ok=True)
        put: list[str] = []
        try:
            for f in sorted(Path(tmp).iterdir()):
                put.append(f"{root}/{f.name}")
                fs.put_file(str(f), put[-1])
        except BaseException:
            for target in put:
                try:
                    fs.rm_file(target)
                except (OSError, FileNotFoundError):
                    pass
            raise
