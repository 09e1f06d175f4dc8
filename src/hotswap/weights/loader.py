"""Validate a set of HF-named tensors against the live model, before any live byte changes."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from hotswap.errors import CheckpointError, shown
from hotswap.weights.mapping import WeightMap, WeightSlot
from hotswap.weights.safetensors_io import TensorInfo, checkpoint_files, read_headers

# Checkpoint entries that are derived state, not parameters (old Llama exports carry rotary caches, ColossalAI's
# its cos/sin tables: SGLang's load_weights skips the same three).
IGNORED_SUFFIXES = (".rotary_emb.inv_freq", ".rotary_emb.cos_cached", ".rotary_emb.sin_cached")


@dataclass(frozen=True, slots=True)
class TensorMeta:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]


def check_tensor_metas(weight_map: WeightMap, metas: list[TensorMeta], *, require_all: bool) -> list[tuple[TensorMeta, WeightSlot]]:
    """Pair each incoming tensor with its slot, or raise naming every problem found."""
    problems: list[str] = []
    pairs: list[tuple[TensorMeta, WeightSlot]] = []
    seen: dict[str, str] = {}  # slot name -> the incoming name that filled it
    parts_seen: dict[str, int] = {}  # canonical name -> how many of its per-expert parts came
    # a tied alias (lm_head.weight) given beside what it aliases is skipped whatever the order, as SGLang's load_weights
    # skips lm_head when tied: the embedding is what serves, from disk (files sorted by name) as from a trainer's list
    given = {meta.name for meta in metas}
    for meta in metas:
        if meta.name.endswith(IGNORED_SUFFIXES) or weight_map.aliases.get(meta.name) in given:
            continue
        slot = weight_map.resolve(meta.name)
        if slot is None:
            problems.append(f"unknown parameter {shown(meta.name)}")
            continue
        if slot.hf_name in seen:
            problems.append(f"parameter {shown(meta.name)} given twice")
            continue
        seen[slot.hf_name] = meta.name
        canonical = weight_map.part_of.get(slot.hf_name)
        if canonical is not None:
            parts_seen[canonical] = parts_seen.get(canonical, 0) + 1
        if tuple(meta.shape) != slot.hf_shape:
            problems.append(f"shape mismatch for {shown(meta.name)}: got {list(meta.shape)}, expected {list(slot.hf_shape)}")
        if not (meta.dtype.is_floating_point and slot.dtype.is_floating_point):
            problems.append(f"dtype {meta.dtype} of {shown(meta.name)} cannot be loaded into a {slot.dtype} parameter")
        pairs.append((meta, slot))
    both = sorted(name for name in parts_seen if name in seen)
    if both:
        problems.append(f"parameter(s) {both[:3]} given both whole and per expert")
    if require_all:
        whole = {name for name, count in parts_seen.items() if count == len(weight_map.part_names[name])}
        missing = sorted(set(weight_map.names) - seen.keys() - whole)
        if missing:
            more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
            problems.append(f"checkpoint lacks parameter(s) {missing[:5]}{more}")
    if problems:
        more = f"; and {len(problems) - 10} more problem(s)" if len(problems) > 10 else ""
        raise CheckpointError("; ".join(problems[:10]) + more)
    return pairs


def plan_checkpoint(weight_map: WeightMap, model_path: str | Path) -> list[tuple[TensorInfo, WeightSlot]]:
    """Read only the headers of a checkpoint and check it fits the model whole."""
    infos = read_headers(checkpoint_files(model_path))
    metas = [TensorMeta(i.name, i.dtype, i.shape) for i in infos.values()]
    pairs = check_tensor_metas(weight_map, metas, require_all=True)
    return [(infos[meta.name], slot) for meta, slot in pairs]

