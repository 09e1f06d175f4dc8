"""Reading HF safetensors checkpoints: the file list, headers without data (for validation), tensors."""

from __future__ import annotations

import contextlib
import io
import json
import os
import stat
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from hotswap.errors import CheckpointError, shown
from hotswap.wire.buckets import first_overlap

SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


@dataclass(frozen=True, slots=True)
class TensorInfo:
    name: str
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # absolute byte offset of the data in the file
    nbytes: int


def checkpoint_files(model_path: str | Path) -> list[Path]:
    """The safetensors files of a HF checkpoint folder (from its index when there is one)."""
    path = Path(model_path)
    if not path.is_dir():
        raise CheckpointError(f"model path {shown(str(path))} is not a directory")
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(_read_index(index))["weight_map"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, RecursionError) as exc:
            raise CheckpointError(f"{index} is not a valid safetensors index: {type(exc).__name__}: {exc}") from exc
        if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
            raise CheckpointError(f"{index} is not a valid safetensors index: weight_map must map tensor names to shard file names")
        odd = sorted({f for f in weight_map.values() if Path(f).name != f or f in (".", "..") or not f.endswith(".safetensors")})
        if odd:
            raise CheckpointError(f"{index} names shard(s) {odd[:3]} that are not plain *.safetensors file names in the checkpoint folder")
        files = [path / f for f in sorted(set(weight_map.values()))]
        missing = [str(f) for f in files if not f.exists()]
        if missing:
            raise CheckpointError(f"checkpoint index names missing shard(s): {missing}")
        return _regular(files)
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{shown(str(path))} holds no *.safetensors files (hotswap loads safetensors only)")
    return _regular(files)


MAX_INDEX_BYTES = 64 << 20  # a checkpoint index names its tensors' shards: a few MB for the largest models


@contextlib.contextmanager
def _open_regular(file: Path) -> Iterator[tuple[io.BufferedReader, int]]:
    """`file` opened for reading with its size, refused unless the opened file itself is a regular one with something in
    it. Opened non-blocking: a FIFO swapped in after a check, or a file that reads as regular and never ends
    (/proc/kmsg; procfs reports size 0), is refused or fails at once instead of holding the reader forever."""
    fd = os.open(file, os.O_RDONLY | os.O_NONBLOCK)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size == 0:
            raise CheckpointError(f"{file} is empty or not a regular file (a FIFO, device or /proc file never reads as a checkpoint)")
        f = os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
    with f:
        yield f, st.st_size


def _read_index(index: Path) -> bytes:
    """A checkpoint index's bytes, at most MAX_INDEX_BYTES of them."""
    try:
        with _open_regular(index) as (f, size):
            if size > MAX_INDEX_BYTES:
                raise CheckpointError(f"{index} has {size} bytes; a checkpoint index has at most {MAX_INDEX_BYTES}")
            return f.read(size)
    except OSError as exc:
        raise CheckpointError(f"cannot read checkpoint index {index}: {exc}") from exc


def _regular(files: list[Path]) -> list[Path]:
    """Refuse anything but regular files up front: opening or reading a FIFO (or a device) can block forever."""
    odd = []
    for f in files:
        try:
            mode = f.stat().st_mode
        except OSError as exc:
            raise CheckpointError(f"cannot stat checkpoint file {f}: {exc}") from exc
        if not stat.S_ISREG(mode):
            odd.append(str(f))
    if odd:
        raise CheckpointError(f"checkpoint file(s) {odd} are not regular files (a FIFO, socket or device never reads as a checkpoint)")
    return files


def _raw_header(file: Path) -> tuple[bytes, int]:
    """A file's header bytes (unparsed) and the file's size; raises CheckpointError naming what is wrong."""
    try:
        with _open_regular(file) as (f, size):
            if size < 8:
                raise CheckpointError(f"{file} is truncated (no safetensors header)")
            (n,) = struct.unpack("<Q", f.read(8))
            if n > min(size - 8, 100 * 1024 * 1024):
                raise CheckpointError(f"{file} has an implausible header size {n} (the file has {size} bytes)")
            header = f.read(n)
            if len(header) != n:
                raise CheckpointError(f"{file} is truncated (its header says {n} bytes)")
        return header, size
    except OSError as exc:
        raise CheckpointError(f"cannot read safetensors header of {file}: {exc}") from exc


def read_header(file: Path) -> dict[str, TensorInfo]:
    """Parse one file's header; never touches tensor data."""
    raw, size = _raw_header(file)
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"cannot read safetensors header of {file}: {exc}") from exc
    if not isinstance(header, dict):
        raise CheckpointError(f"{file}: damaged safetensors header: a JSON object was expected, got {type(header).__name__}")
    out = {}
    base = 8 + len(raw)
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        out[name] = _tensor_info(file, name, meta, base, size)
    overlap = first_overlap((i.name, i.offset, i.offset + i.nbytes) for i in out.values())
    if overlap is not None:
        raise CheckpointError(f"{file}: damaged safetensors header: {overlap}")
    return out


def _is_uint(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _tensor_info(file: Path, name: str, meta, base: int, size: int) -> TensorInfo:
    """One header entry, checked field by field: a damaged header is named, never a KeyError."""
    if not isinstance(meta, dict):
        raise CheckpointError(f"{file}: damaged safetensors header: the entry of tensor {shown(name)} is not an object")
    missing = [k for k in ("dtype", "shape", "data_offsets") if k not in meta]
    if missing:
        raise CheckpointError(f"{file}: damaged safetensors header: tensor {shown(name)} lacks {', '.join(missing)}")
    if meta["dtype"] not in SAFETENSORS_DTYPES:
        raise CheckpointError(f"{file}: tensor {shown(name)} has unsupported dtype {shown(meta['dtype'])}")
    shape, offsets = meta["shape"], meta["data_offsets"]
    if not isinstance(shape, list) or not all(map(_is_uint, shape)):
        raise CheckpointError(f"{file}: damaged safetensors header: tensor {shown(name)} has shape {shown(shape)}")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(map(_is_uint, offsets)) or offsets[0] > offsets[1]:
        raise CheckpointError(f"{file}: damaged safetensors header: tensor {shown(name)} has data_offsets {shown(offsets)}")
    dtype = SAFETENSORS_DTYPES[meta["dtype"]]
    start, end = offsets
    numel = 1
    for n in shape:
        numel *= n
    if end - start != numel * dtype.itemsize:
        raise CheckpointError(f"{file}: damaged safetensors header: tensor {shown(name)} of shape {shape} and dtype {meta['dtype']} "
                              f"needs {numel * dtype.itemsize} bytes, its data_offsets span {end - start}")
    if base + end > size:
        raise CheckpointError(f"{file} is truncated: tensor {shown(name)} ends past the end of the file")
    return TensorInfo(name, file, dtype, tuple(shape), base + start, end - start)


def layout_signature(files: list[Path]) -> tuple | None:
    """(name, size, raw header bytes) per file: equal signatures mean the same tensors at the same offsets.
    Reads only the headers' bytes, without parsing them; None when one cannot be read (`read_header` says why)."""
    out = []
    for file in files:
        try:
            header, size = _raw_header(file)
        except CheckpointError:
            return None
        out.append((file.name, size, header))
    return tuple(out)


def read_headers(files: list[Path]) -> dict[str, TensorInfo]:
    infos: dict[str, TensorInfo] = {}
    for file in files:
        for name, info in read_header(file).items():
            if name in infos:
                raise CheckpointError(f"tensor {shown(name)} appears in both {infos[name].file.name} and {file.name}")
            infos[name] = info
    return infos
