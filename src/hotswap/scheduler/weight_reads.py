"""Reading the live weights whole: get_weights_by_name, checksums, snapshots, saves, and reset_tensors.

Reads see whole HF tensors (gathered from every rank under tensor parallelism, through `ranks`), so they
look the same at every TP size. They need the weights resident, not the KV cache."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from hotswap import protocol as p
from hotswap.config import EngineConfig
from hotswap.errors import HotswapError, shown
from hotswap.runner.model_runner import ModelRunner
from hotswap.weights import saver
from hotswap.weights.ranks import WeightRanks
from hotswap.wire.checksum import manifest_digest, tensor_sha256

RELEASED = "the weights are released; resume_memory_occupation(['weights']) first"


@dataclass(kw_only=True, slots=True)
class WeightReads:
    model_runner: ModelRunner
    config: EngineConfig
    ranks: WeightRanks
    weights_released: Callable[[], bool]
    is_idle: Callable[[], bool]
    flush_cache: Callable[[], bool]
    mark_version: Callable[[str], None]  # the weights changed with no version naming them
    snapshot: dict[str, torch.Tensor] | None = None
    loaded_from: str | None = None  # the folder the last successful disk update read

    def _whole(self, names: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
        return self.ranks.gather(self.model_runner.weight_map, names)

    def get_weights_by_name(self, req: p.GetWeightsByNameRequest) -> p.GetWeightsByNameOutput:
        """The first `truncate_size` rows of a parameter (0: all of it)."""
        size = req.truncate_size
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            return p.GetWeightsByNameOutput(success=False, message=f"truncate_size must be a non-negative integer (0: the whole tensor), got {shown(size)}")
        slot = self.model_runner.weight_map.resolve(req.name) if isinstance(req.name, str) else None
        if slot is None:
            return p.GetWeightsByNameOutput(success=False, message=f"unknown parameter {shown(req.name)}")
        if self.weights_released():
            return p.GetWeightsByNameOutput(success=False, message=RELEASED)
        wm = self.model_runner.weight_map
        canonical = wm.part_of.get(slot.hf_name, slot.hf_name)  # one expert's tensor: read its stacked parameter
        _, t = next(iter(self._whole([canonical])))
        if canonical != slot.hf_name:
            t = slot.spec.dest_view(t)
        part = t[:size] if size else t
        return p.GetWeightsByNameOutput(success=True, parameter=part.float().cpu().tolist(), dtype=str(t.dtype).removeprefix("torch."),
                                        shape=list(t.shape))

    def check_weights(self, req: p.CheckWeightsRequest) -> p.CheckWeightsOutput:
        """`checksum` hashes whole HF tensors: the manifest equals a trainer's `state_dict_manifest` of the
        same weights whatever the engine's TP size; the reply also carries SGLang's `ranks` shape.
        `skip_tensor_list` (SGLang's) leaves those parameters out of checksum and compare."""
        wm = self.model_runner.weight_map
        if self.weights_released():
            return p.CheckWeightsOutput(success=False, message=RELEASED)
        skip = set(req.skip_tensor_list or ())
        names = [n for n in wm.names if n not in skip]
        if req.action == "checksum":
            # a manifest may name experts one by one (the checkpoint layout, which every transport takes): those
            # stacked parameters are compared expert by expert; one expert skipped leaves out a stacked parameter
            # compared whole
            by_part = {wm.part_of[n] for n in req.expected or () if n in wm.part_of} - skip
            whole_skip = {wm.part_of[n] for n in skip if n in wm.part_of} - by_part
            sums, part_sums = {}, {}
            for name, t in self._whole(names):
                sums[name] = tensor_sha256(t)
                for part in wm.part_names[name] if name in by_part else ():
                    if part not in skip:
                        part_sums[part] = tensor_sha256(wm.parts[part].spec.dest_view(t))
            digest = manifest_digest(sums)
            ranks = [self._rank_entry(sums, digest)]
            if req.expected is not None:
                expected = {n: v for n, v in req.expected.items() if n not in skip and n not in whole_skip}
                got = {n: v for n, v in sums.items() if n not in whole_skip and (n not in by_part or n in expected)} | part_sums
                mism = sorted(n for n in set(got) | set(expected) if got.get(n) != expected.get(n))
                return p.CheckWeightsOutput(success=not mism, checksums=sums, digest=digest, mismatches=mism, ranks=ranks,
                                            message="all checksums match" if not mism else f"{len(mism)} parameter(s) differ, e.g. {mism[:3]}")
            return p.CheckWeightsOutput(success=True, checksums=sums, digest=digest, ranks=ranks, message=f"{len(sums)} checksums")
        if req.action == "snapshot":
            self.snapshot = {name: t.detach().to("cpu", copy=True) for name, t in self._whole(wm.names)}
            return p.CheckWeightsOutput(success=True, message=f"snapshot of {len(self.snapshot)} tensors")
        if req.action == "compare":
            if self.snapshot is None:
                return p.CheckWeightsOutput(success=False, message="no snapshot to compare against; call check_weights('snapshot') first")
            report = [(n, _difference(t.cpu(), self.snapshot[n])) for n, t in self._whole(names)]
            mism = [n for n, diff in report if diff is not None]
            if not mism:
                return p.CheckWeightsOutput(success=True, mismatches=[], message="weights equal the snapshot")
            # SGLang's report: a header, then one line per differing tensor
            lines = [f"name={n} {diff}" for n, diff in report if diff is not None]
            return p.CheckWeightsOutput(success=False, mismatches=mism, message="check tensor equality failed:\n" + "\n".join(lines))
        if req.action == "reset_tensors":
            return self._reset(wm)
        # SGLang's wording (WeightChecker.handle), then ours
        return p.CheckWeightsOutput(success=False, message=f"Unsupported action={shown(req.action)}; use snapshot, compare, reset_tensors or checksum")

    def _rank_entry(self, sums: dict[str, str], digest: str) -> dict:
        """SGLang's per-rank checksum entry. hotswap's checksums are of whole (gathered) tensors, the same on
        every TP rank, so one entry stands for the engine; `parallelism_info` is a list of role dicts as
        miles reads it (upstream SGLang sends one dict)."""
        size = self.ranks.size
        info = {"tp_rank": 0, "tp_size": size, "dp_rank": 0, "dp_size": 1, "pp_rank": 0, "pp_size": 1, "rank": 0, "size": size}
        return {"checksums": sums, "per_gpu_checksum": digest, "parallelism_info": [info]}

    def _reset(self, wm) -> p.CheckWeightsOutput:
        """Zero every weight on every rank; the version is marked (`+reset`): these are other weights."""
        if not self.is_idle():
            return p.CheckWeightsOutput(success=False, message="reset_tensors refused while requests are running")
        self.ranks.reset_tensors()
        for name in wm.names:
            wm.slots[name].dest.zero_()
        self.flush_cache()
        self.mark_version("reset")
        failure = self.ranks.agree(None)
        if failure is not None:
            return p.CheckWeightsOutput(success=False, message=f"reset_tensors failed: {failure}")
        return p.CheckWeightsOutput(success=True, message=f"zeroed {len(wm.names)} tensors")

    def side_files_source(self) -> str:
        """The folder a save copies config.json and the tokenizer files from: the one the served weights were last read
        from, else the launch folder, whichever still holds a config.json (a trainer's checkpoint retention deletes old
        step folders, the launch folder among them: a save then held weights only and no longer loaded)."""
        candidates = [path for path in (self.loaded_from, self.config.model_path) if path is not None]
        return next((path for path in candidates if (Path(path) / "config.json").is_file()), self.config.model_path)

    def save_sharded_model(self, req: p.SaveShardedModelRequest) -> p.ControlOutput:
        if self.weights_released():
            return p.ControlOutput(success=False, message=RELEASED)
        try:
            files = saver.save_sharded(self.model_runner.weight_map, self._whole, Path(req.path), self.side_files_source(),
                                       pattern=req.pattern, max_size=req.max_size, overwrite=req.overwrite)
        except (HotswapError, OSError) as exc:
            return p.ControlOutput(success=False, message=f"save_sharded_model failed: {exc}")
        return p.ControlOutput(success=True, message=f"saved {len(files)} file(s) to {req.path}")

    def save_remote_model(self, req: p.SaveRemoteModelRequest) -> p.ControlOutput:
        if self.weights_released():
            return p.ControlOutput(success=False, message=RELEASED)
        try:
            saver.save_remote(self.model_runner.weight_map, self._whole, req.url, self.side_files_source(), overwrite=req.overwrite)
        except (HotswapError, OSError, ValueError, ImportError) as exc:
            return p.ControlOutput(success=False, message=f"save_remote_model failed: {exc}")
        return p.ControlOutput(success=True, message=f"saved to {req.url}")


def _difference(current: torch.Tensor, snapshot: torch.Tensor) -> str | None:
    """None when equal, else SGLang's per-tensor line: max and mean absolute error, elements that differ."""
    if current.shape != snapshot.shape or current.dtype != snapshot.dtype:
        return f"shape/dtype {tuple(current.shape)}/{current.dtype} vs snapshot {tuple(snapshot.shape)}/{snapshot.dtype}"
    if torch.equal(current, snapshot):
        return None
    err = (current.float() - snapshot.float()).abs()
    return f"max_abs_err={err.max().item():.6g} mean_abs_err={err.mean().item():.6g} num_exceed={int((err > 0).sum())}"
