"""A HF checkpoint folder on disk -> its validated ReadPlan (cached by layout), or a refusal.

Everything that touches the files is bounded by `timeout_s` (config `weight_read_timeout_s`): the
headers are read on a helper thread and the data by the reader's own threads, so a hung mount cannot
stall the thread that serves. Non-regular files (a FIFO never ends) are refused before anything opens.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TypeVar

from hotswap import protocol as p
from hotswap.errors import CheckpointError, HotswapError, shown
from hotswap.weights.fast_reader import ReaderOptions, ReadPlan, ReadPlanCache
from hotswap.weights.mapping import WeightMap

T = TypeVar("T")


def check_request(req: p.UpdateWeightsFromDiskRequest) -> None:
    if req.load_format not in (None, "auto", "safetensors"):
        raise HotswapError(f"unsupported load_format {shown(req.load_format)}; hotswap loads safetensors")
    if req.is_async:
        raise HotswapError("is_async=true is not supported: the update is applied before the reply; leave it false")
    if req.manifest is not None:
        raise HotswapError("a manifest is not supported: the checkpoint's own safetensors headers describe its tensors; "
                           "leave it unset")


def plan_disk(model_path: str, weight_map: WeightMap, plans: ReadPlanCache, options: ReaderOptions, timeout_s: float) -> ReadPlan:
    """The checkpoint's ReadPlan, validated against the model; raises CheckpointError naming what is wrong."""
    return bounded(lambda: plans.prepare(weight_map, model_path, options), timeout_s, f"reading the checkpoint headers in {model_path}")


def bounded(fn: Callable[[], T], timeout_s: float, what: str) -> T:
    """`fn()` on a helper thread, waited for at most `timeout_s`; raises CheckpointError past it (the thread
    is left to finish on its own: it only reads)."""
    box: list = []

    def run() -> None:
        try:
            box.append((True, fn()))
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller
            box.append((False, exc))

    t = threading.Thread(target=run, name="hotswap-read-headers", daemon=True)
    t.start()
    t.join(timeout_s)
    if not box:
        raise CheckpointError(f"{what} did not finish within {timeout_s:g} s (weight_read_timeout_s): a hung mount or a file that never ends")
    ok, value = box[0]
    if not ok:
        raise value
    return value
