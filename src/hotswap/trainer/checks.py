"""Prove engines hold exactly the trainer's weights: the same per-tensor sha256 manifest on both sides."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from hotswap.trainer.client import EngineHandle, EngineResult
from hotswap.trainer.push import DEFAULT_CALL_TIMEOUT_S, as_engines, call_method, spawn, wait_result
from hotswap.wire.checksum import state_dict_manifest
from hotswap.wire.dtypes import dtype_from_name


class DtypeUnknown(RuntimeError):
    """dtype="auto" and the engine did not say which dtype it stores: a manifest in another dtype would report
    every tensor as differing."""


def engine_dtype(engine: EngineHandle, timeout_s: float | None = DEFAULT_CALL_TIMEOUT_S) -> torch.dtype:
    """The dtype the engine stores its weights in; raises DtypeUnknown naming why it cannot say."""
    r = wait_result(spawn(call_method, engine, "get_model_info"), timeout_s, "get_model_info")
    dtype = dtype_from_name(r.get("dtype") or "") if r.success else None
    if dtype is None:
        why = (r.message or "no reply") if not r.success else f"its model info names no weight dtype ({r.get('dtype')!r})"
        raise DtypeUnknown(f"cannot read the weight dtype of {engine!r} for dtype='auto': {why}; pass the dtype instead")
    return dtype


def verify_engine_weights(engine: EngineHandle, state_dict: Mapping[str, torch.Tensor], dtype: torch.dtype | str | None = None) -> EngineResult:
    """Compare the engine's checksums with `state_dict_manifest(state_dict, dtype)`.

    `dtype` casts the trainer's tensors first (an fp32 trainer proving a bf16 engine's weights); "auto"
    asks the engine which dtype it stores. Returns the engine's reply as an EngineResult: `success` when
    every checksum matches, else `data["mismatches"]` names the parameters that differ."""
    try:
        dtype = engine_dtype(engine) if dtype == "auto" else _resolve(dtype)
    except DtypeUnknown as exc:
        return EngineResult(False, str(exc))
    manifest = state_dict_manifest(state_dict, dtype)
    return wait_result(spawn(call_method, engine, "check_weights", "checksum", expected=manifest), DEFAULT_CALL_TIMEOUT_S,
                       "check_weights('checksum')")


@dataclass(frozen=True, slots=True)
class EngineWeightsReport:
    """One engine's weights against the trainer's manifest: the tensors whose checksums differ, those the
    trainer has and the engine lacks, and those only the engine has; `error` when it could not say."""

    engine: str
    differ: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    extra: list[str] = field(default_factory=list)
    error: str = ""

    @property
    def ok(self) -> bool:
        return not (self.differ or self.missing or self.extra or self.error)

    def __str__(self) -> str:
        if self.ok:
            return f"{self.engine}: every checksum matches"
        if self.error:
            return f"{self.engine}: {self.error}"
        parts = [f"{label} {names[:5]}{' and %d more' % (len(names) - 5) if len(names) > 5 else ''}"
                 for label, names in (("differ:", self.differ), ("missing on the engine:", self.missing),
                                      ("only on the engine:", self.extra)) if names]
        return f"{self.engine}: " + "; ".join(parts)


def verify_engines(engines: EngineHandle | Sequence[EngineHandle], state_dict: Mapping[str, torch.Tensor],
                   dtype: torch.dtype | str | None = None, *, timeout_s: float | None = DEFAULT_CALL_TIMEOUT_S) -> list[EngineWeightsReport]:
    """After a push: every engine's checksum manifest against the trainer's, compared here (one manifest
    per dtype, however many engines), one report per engine naming the tensors that differ. `dtype` as
    in `verify_engine_weights` ("auto": each engine's own)."""
    engines = as_engines(engines)
    dtypes = [_dtype_or_error(e, timeout_s) if dtype == "auto" else _resolve(dtype) for e in engines]
    manifests: dict[torch.dtype | None, dict[str, str]] = {}
    futures = [spawn(call_method, e, "check_weights", "checksum") for e in engines]
    reports = []
    for engine, dt, future in zip(engines, dtypes, futures):
        if isinstance(dt, DtypeUnknown):
            reports.append(EngineWeightsReport(engine=repr(engine), error=str(dt)))
            continue
        r = wait_result(future, timeout_s, "check_weights('checksum')")
        got = r.get("checksums")
        if not r.success or not isinstance(got, Mapping):
            reports.append(EngineWeightsReport(engine=repr(engine), error=f"no checksums: {r.message or r.data}"))
            continue
        want = manifests.get(dt)
        if want is None:
            want = manifests[dt] = state_dict_manifest(state_dict, dt)
        reports.append(EngineWeightsReport(engine=repr(engine), differ=sorted(n for n in want.keys() & got.keys() if want[n] != got[n]),
                                           missing=sorted(want.keys() - got.keys()), extra=sorted(got.keys() - want.keys())))
    return reports


def _dtype_or_error(engine: EngineHandle, timeout_s: float | None) -> torch.dtype | DtypeUnknown:
    try:
        return engine_dtype(engine, timeout_s)
    except DtypeUnknown as exc:
        return exc


def _resolve(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if isinstance(dtype, str):
        resolved = dtype_from_name(dtype)
        if resolved is None:
            raise ValueError(f"unknown dtype {dtype!r}")
        return resolved
    return dtype
