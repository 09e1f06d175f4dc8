"""Parallel safetensors reader: checkpoint bytes straight into the live parameter storage.

Every (TensorInfo, WeightSlot) pair of a validated plan becomes byte ranges of its file. Ranges are cut at
fixed, page-aligned windows of `chunk` bytes (so a task never spans two windows) and grouped into tasks:
one task = one window of one file. Worker threads take tasks in file order and, per strategy:

- "plain" (CPU engines): `os.preadv` straight into the destination's memory; no staging.
- "pinned" (CUDA, the default): pread the window into one of the worker's pinned host staging buffers, then an H2D copy
  per piece on the worker's own CUDA stream (a ctypes `cudaMemcpyAsync`: it drops the GIL, where `copy_`
  held it ~25 us a piece); a buffer is reused once its copies' event has completed, so reads and copies
  overlap (two buffers per worker; total host staging = `staging_bytes`).
- "register" (CUDA): mmap the file, `cudaHostRegister(..., ReadOnly)` the window of the page cache itself and
  let the copy engine read it: no memcpy on the host. A worker keeps at most `REGISTER_DEPTH` windows
  registered and unregisters each one after its copies completed. A failed registration falls back to
  "pinned" for the rest of the load. Registration does not scale with threads: measured on the H100 host,
  13-16 GB/s in all from 2 to 16 threads, with or without MADV_POPULATE_READ first.
- "hybrid" (CUDA): `register_threads` workers register, the others read into pinned staging, from one queue
  of tasks. Measured slower than "pinned" alone (30.7 vs 36.2 GB/s on 4.8 GB): the registering workers
  take windows the pinned ones would have moved faster.

Tensors whose checkpoint dtype differs from the parameter's, or whose TP slice is not a contiguous byte
range (a slice along dim > 0), are read in whole rows into staging, copied to a device scratch buffer of
the same size, and converted/narrowed there on the GPU. Extra memory is therefore bounded: `staging_bytes`
of pinned host memory (and as much device scratch, only when conversions occur), plus at most
`threads * REGISTER_DEPTH` registered windows of page cache (no new memory).

`wait_for` maps slot names to CUDA events (originals saved for rollback): a copy into a slot waits for its
event on the worker's stream, so saving originals (D2H) and loading new bytes (H2D) overlap.

A load is planned (`prepare_read`: the validated tensors cut into tasks) then run (`run_read`);
`ReadPlanCache` keeps plans by checkpoint layout, so a trainer's new folder each step is not planned again.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import math
import mmap
import os
import threading
import time
import warnings
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import torch

from hotswap.errors import CheckpointError, HotswapError, shown
from hotswap.weights.loader import plan_checkpoint
from hotswap.weights.mapping import WeightMap, WeightSlot
from hotswap.weights.safetensors_io import TensorInfo, checkpoint_files, layout_signature

PAGE = 4096
REGISTER_DEPTH = 2  # registered windows a worker keeps in flight
CUDA_HOST_REGISTER_READ_ONLY = 8
STRATEGIES = ("auto", "plain", "pinned", "register", "hybrid")
DEFAULT_REGISTER_THREADS: int | None = None  # hybrid workers that register when ReaderOptions names none (None: threads // 8, >= 1)
MADV_POPULATE_READ = 22  # Linux >= 5.14: fault a range's page tables in at once (before registering it)
POPULATE = True


@dataclass(frozen=True, slots=True)
class ReaderOptions:
    threads: int = 16
    staging_bytes: int = 512 << 20
    strategy: str = "auto"  # auto: "pinned" on CUDA, "plain" on CPU
    check_finite: bool = False
    register_threads: int | None = None  # hybrid: workers that register the page cache (default threads // 8, >= 1)

    @classmethod
    def from_config(cls, config) -> ReaderOptions:
        return cls(threads=config.weight_load_threads, staging_bytes=config.weight_load_staging_bytes,
                   strategy=config.weight_load_strategy, check_finite=config.check_weights_finite)


@dataclass(slots=True)
class ReadStats:
    nbytes: int = 0  # checkpoint bytes copied into parameters
    elapsed_s: float = 0.0
    strategy: str = ""
    threads: int = 0
    staging_bytes: int = 0  # pinned host staging allocated
    scratch_bytes: int = 0  # device scratch allocated (dtype conversions, dim>0 TP slices)
    registered_bytes: int = 0  # page cache registered at the peak (no new memory)
    fell_back: str | None = None  # why "register" fell back to "pinned"


@dataclass(slots=True)
class _Piece:
    start: int  # absolute file offset
    nbytes: int
    dest: torch.Tensor  # direct: flat uint8 view of the destination; convert: destination rows
    slot: WeightSlot
    convert: tuple | None = None  # (file dtype, rows shape, (dim, start, len) narrow or None)


@dataclass(slots=True)
class _Task:
    file_idx: int
    start: int
    end: int
    pieces: list[_Piece] = field(default_factory=list)
    convert: bool = False


def _read_into(fd: int, view: memoryview, offset: int) -> None:
    """Fill `view` from `fd` at `offset` (positional: safe across threads). Tests patch this to inject faults."""
    done, n = 0, len(view)
    while done < n:
        got = os.preadv(fd, [view[done:]], offset + done)
        if got <= 0:
            raise OSError(f"unexpected end of file at byte {offset + done} (wanted {n - done} more)")
        done += got


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    """Flat uint8 view of a contiguous tensor."""
    flat = t.reshape(-1)
    return flat.view(torch.uint8) if flat.dtype != torch.uint8 else flat


def _np_bytes(t: torch.Tensor) -> memoryview:
    return memoryview(t.numpy()).cast("B")


def plan_tasks(plan: list[tuple[TensorInfo, WeightSlot]], chunk: int) -> tuple[list[Path], list[_Task], int]:
    """Cut the plan into window tasks (see module doc). Returns (files, tasks, total bytes). Few large
    windows beat many small ones: each task costs the worker Python time under the GIL (measured on the
    H100's host: 36 windows of 32 MiB read 1.19 GB in 43 ms, 248 windows of 1-32 MiB took 100 ms)."""
    files: list[Path] = []
    file_idx: dict[Path, int] = {}
    tasks: dict[tuple[int, int], _Task] = {}
    converts: list[_Task] = []
    total = 0
    for info, slot in plan:
        fi = file_idx.setdefault(info.file, len(files))
        if fi == len(files):
            files.append(info.file)
        spec, dest = slot.spec, slot.dest
        shape = info.shape
        rows = shape[0] if shape else 1
        row_elems = math.prod(shape[1:]) if shape else 1
        row_bytes = row_elems * info.dtype.itemsize
        sliced = spec.src_len != (shape[spec.src_dim] if shape else 1)
        r0, r1, narrow = 0, rows, None
        if sliced and spec.src_dim == 0:
            r0, r1 = spec.src_start, spec.src_start + spec.src_len
        elif sliced:
            narrow = (spec.src_dim, spec.src_start, spec.src_len)
        if r1 <= r0 or row_bytes == 0:
            continue
        direct = narrow is None and info.dtype == dest.dtype and dest.is_contiguous() and dest.numel() == (r1 - r0) * row_elems
        if direct:
            dbytes = _as_bytes(dest)
            pos, end = info.offset + r0 * row_bytes, info.offset + r1 * row_bytes
            total += end - pos
            while pos < end:
                w = pos // chunk
                stop = min(end, (w + 1) * chunk)
                task = tasks.get((fi, w))
                if task is None:
                    task = tasks[(fi, w)] = _Task(fi, pos, stop)
                task.start, task.end = min(task.start, pos), max(task.end, stop)
                d0 = pos - (info.offset + r0 * row_bytes)
                task.pieces.append(_Piece(pos, stop - pos, dbytes[d0 : d0 + (stop - pos)], slot))
                pos = stop
            continue
        # convert: whole rows through staging (+ device scratch), at most `chunk` bytes a task (>= one row)
        step = max(1, chunk // row_bytes)
        dest_rows = dest if dest.dim() else dest.reshape(1)
        for a in range(r0, r1, step):
            b = min(r1, a + step)
            start = info.offset + a * row_bytes
            n = (b - a) * row_bytes
            rows_shape = (b - a, *shape[1:]) if shape else (1,)
            d = dest_rows.narrow(0, a - r0, b - a) if narrow is None or spec.src_dim != 0 else dest_rows
            piece = _Piece(start, n, d, slot, convert=(info.dtype, rows_shape, narrow))
            converts.append(_Task(fi, start, start + n, [piece], convert=True))
            total += n
    ordered = sorted(tasks.values(), key=lambda t: (t.file_idx, t.start)) + converts
    return files, ordered, total


class _Failure:
    def __init__(self):
        self.error: BaseException | None = None
        self.lock = threading.Lock()

    def set(self, exc: BaseException) -> None:
        with self.lock:
            if self.error is None:
                self.error = exc


@dataclass(slots=True)
class ReadPlan:
    """A validated checkpoint cut into window tasks for a reader setting: what `run_read` executes."""

    files: list[Path]
    tasks: list[_Task]
    nbytes: int
    slots: list[WeightSlot]
    chunk: int
    threads: int


def _geometry(options: ReaderOptions) -> tuple[int, int]:
    """(window size, threads) of a reader setting: two staging buffers of one window per thread."""
    threads = max(1, options.threads)
    return max(PAGE, (options.staging_bytes // (2 * threads)) // PAGE * PAGE), threads


def prepare_read(plan: list[tuple[TensorInfo, WeightSlot]], options: ReaderOptions) -> ReadPlan:
    """The plan cut into tasks; `slots` in the order the tasks reach them, so originals saved for rollback
    in that order (the first ones on the device, the rest to the host) are ready before their reads."""
    chunk, threads = _geometry(options)
    files, tasks, total = plan_tasks(plan, chunk)
    order = {id(p.slot): p.slot for t in tasks for p in t.pieces}
    slots = [*order.values(), *(slot for _, slot in plan if id(slot) not in order)]
    return ReadPlan(files, tasks, total, slots, chunk, threads)


def load_checkpoint(weight_map: WeightMap, model_path: str | Path, options: ReaderOptions | None = None) -> ReadStats:
    """Startup load: validate headers, then copy every tensor into place (`options`: None = the defaults)."""
    return load_plan(plan_checkpoint(weight_map, model_path), options or ReaderOptions())


def load_plan(plan: list[tuple[TensorInfo, WeightSlot]], options: ReaderOptions = ReaderOptions(),
              wait_for: dict[str, torch.cuda.Event] | None = None) -> ReadStats:
    """Copy every tensor of a validated plan into its slot (`prepare_read` + `run_read`)."""
    return run_read(prepare_read(plan, options), options, wait_for)


def run_read(read: ReadPlan, options: ReaderOptions, wait_for: dict[str, torch.cuda.Event] | None = None,
             timeout_s: float | None = None) -> ReadStats:
    """Execute a ReadPlan. Raises CheckpointError on any read failure (what was already copied stays
    copied: callers protect originals with a RollbackBuffer). With `timeout_s` the reads run on worker
    threads only and a read still pending at the deadline fails the load: a worker that comes back later
    (a hung mount that wakes up) writes no live byte, and the files are closed once the last one returns."""
    if not read.tasks:
        return ReadStats(strategy="none")
    device = read.slots[0].dest.device
    strategy = options.strategy
    if strategy not in STRATEGIES:
        raise HotswapError(f"unknown weight_load_strategy {shown(strategy)}; use one of {STRATEGIES}")
    if device.type != "cuda":
        strategy = "plain"
    elif strategy in ("auto", "plain"):
        strategy = "pinned"  # measured fastest on the H100 host (docs/benchmarks.md); "register"/"hybrid" on request
    files, tasks, threads, chunk = read.files, read.tasks, read.threads, read.chunk
    stats = ReadStats(nbytes=read.nbytes, strategy=strategy, threads=threads)
    start = time.perf_counter()
    fds: list[int] = []
    try:
        for f in files:
            fds.append(os.open(f, os.O_RDONLY | os.O_NONBLOCK))  # a FIFO must not block the open (regular files ignore the flag)
        if strategy == "plain":
            _run_workers(threads, tasks, lambda it, fail: _plain_worker(it, fail, fds, chunk), timeout_s)
        else:
            _CudaLoad(device, files, fds, tasks, threads, chunk, strategy, wait_for or {}, stats, options.register_threads, timeout_s).run()
        if options.check_finite:
            _check_finite(read.slots)
    except _Abandoned as exc:
        _close_after(exc.workers, fds)
        fds = []
        raise CheckpointError(str(exc)) from None
    except CheckpointError:
        raise
    except OSError as exc:
        raise CheckpointError(f"failed reading checkpoint: {exc}") from exc
    finally:
        for fd in fds:
            os.close(fd)
    stats.elapsed_s = time.perf_counter() - start
    return stats


class _Abandoned(CheckpointError):
    """Reads still pending at the deadline; `workers` are the threads still inside them."""

    def __init__(self, message: str, workers: list[threading.Thread]):
        super().__init__(message)
        self.workers = workers


def _close_after(workers: list[threading.Thread], fds: list[int]) -> None:
    """Close the files once the abandoned workers return (closing them earlier could hand their numbers
    to another open while a worker still reads by number)."""
    def reap() -> None:
        for w in workers:
            w.join()
        for fd in fds:
            os.close(fd)

    threading.Thread(target=reap, name="hotswap-read-reaper", daemon=True).start()


class ReadPlanCache:
    """Checkpoint layout -> its ReadPlan. A trainer saves each step's weights to a new folder with the same
    layout: files whose names, sizes and header bytes equal a cached checkpoint's hold the same tensors at the
    same offsets, so validation and task planning (about 7 ms for a 0.6B model on the H100's host) are done
    once; only the files differ. Dropped when the weight map is rebuilt (memory resume)."""

    def __init__(self, max_entries: int = 4):
        self.max_entries = max_entries
        self.weight_map: weakref.ref | None = None
        self.plans: collections.OrderedDict[tuple, ReadPlan] = collections.OrderedDict()

    def prepare(self, weight_map: WeightMap, model_path: str | Path, options: ReaderOptions) -> ReadPlan:
        """The checkpoint's ReadPlan; raises CheckpointError naming what does not fit the model."""
        if self.weight_map is None or self.weight_map() is not weight_map:
            self.plans.clear()
            self.weight_map = weakref.ref(weight_map, lambda _ref: self.plans.clear())
        files = checkpoint_files(model_path)
        signature = layout_signature(files)
        key = (signature, _geometry(options))
        read = self.plans.get(key) if signature is not None else None
        if read is None:
            read = prepare_read(plan_checkpoint(weight_map, model_path), options)
            if signature is not None:
                self.plans[key] = read
                while len(self.plans) > self.max_entries:
                    self.plans.popitem(last=False)
            return read
        self.plans.move_to_end(key)
        by_name = {f.name: f for f in files}  # the same names as the cached checkpoint's (the signature says so)
        return dataclasses.replace(read, files=[by_name[f.name] for f in read.files])


def _run_workers(threads: int, tasks: list[_Task], work, timeout_s: float | None = None) -> None:
    """Run `work(task_iterator, failure)` on `threads` threads sharing one iterator of tasks; with
    `timeout_s`, raise _Abandoned if they have not all finished by then (the failure tells them to stop)."""
    it = iter(tasks)
    lock = threading.Lock()

    def next_task():
        with lock:
            return next(it, None)

    fail = _Failure()

    def body():
        try:
            work(next_task, fail)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller
            fail.set(exc)

    n = min(threads, len(tasks))
    if n <= 1 and timeout_s is None:
        body()
    else:
        workers = [threading.Thread(target=body, name=f"hotswap-read-{i}", daemon=True) for i in range(max(1, n))]
        for w in workers:
            w.start()
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        for w in workers:
            w.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        stuck = [w for w in workers if w.is_alive()]
        if stuck:
            message = (f"reading the checkpoint did not finish within {timeout_s:g} s (weight_read_timeout_s): a hung "
                       "mount or a file that never ends")
            fail.set(CheckpointError(message))
            raise _Abandoned(message, stuck)
    if fail.error is not None:
        raise fail.error


def _plain_worker(next_task, fail: _Failure, fds: list[int], chunk: int) -> None:
    """Each window into a private buffer, then into its destinations: a read that returns after the
    load was abandoned writes nothing live."""
    buf = torch.empty(chunk, dtype=torch.uint8)
    while fail.error is None and (task := next_task()) is not None:
        n = task.end - task.start
        if n > buf.numel():  # a single row wider than a window
            buf = torch.empty(n, dtype=torch.uint8)
        view = buf[:n]
        _read_into(fds[task.file_idx], _np_bytes(view), task.start)
        if fail.error is not None:
            return
        for piece in task.pieces:
            raw = view[piece.start - task.start : piece.start - task.start + piece.nbytes]
            if piece.convert is None:
                piece.dest.copy_(raw)
            else:
                _apply_convert(piece, raw)


def _apply_convert(piece: _Piece, raw: torch.Tensor) -> None:
    dtype, rows_shape, narrow = piece.convert
    src = raw.view(dtype).view(rows_shape)
    if narrow is not None:
        src = src.narrow(*narrow)
    piece.dest.copy_(src.reshape(piece.dest.shape), non_blocking=True)


_CUDART_LIB = None
_H2D = 1  # cudaMemcpyHostToDevice


def _cudart():
    """The libcudart this process already loaded, through ctypes (torch's own bindings lack what we call);
    None when it cannot be found. ctypes drops the GIL around each call."""
    global _CUDART_LIB
    if _CUDART_LIB is None:
        import ctypes

        path = None
        try:
            with open("/proc/self/maps") as f:
                path = next((line.split()[-1] for line in f if "libcudart.so" in line), None)
        except OSError:
            pass
        try:
            lib = ctypes.CDLL(path or "libcudart.so")
            lib.cudaMemcpyAsync.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_void_p]
            lib.cudaMemcpyAsync.restype = ctypes.c_int
            _CUDART_LIB = lib
        except (OSError, AttributeError):
            _CUDART_LIB = False
    return _CUDART_LIB or None


def _clear_cuda_error() -> None:
    """cudaGetLastError(): a failed runtime call leaves a per-thread error a later launch check would raise."""
    lib = _cudart()
    if lib is not None:
        lib.cudaGetLastError()


def _check_finite(slots: list[WeightSlot]) -> None:
    flags = torch.stack([torch.isfinite(s.dest).all() for s in slots]).cpu()
    bad = [s.hf_name for s, ok in zip(slots, flags.tolist()) if not ok]
    if bad:
        raise CheckpointError(f"tensor {shown(bad[0])} holds NaN or Inf values" + (f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""))


class _CudaLoad:
    """One load onto a CUDA device: per-worker streams, staging rings and (for "register") mmaps."""

    _streams: dict[tuple[int, int], list[torch.cuda.Stream]] = {}

    def __init__(self, device, files, fds, tasks, threads, chunk, strategy, wait_for, stats: ReadStats, register_threads=None,
                 timeout_s: float | None = None):
        self.device, self.files, self.fds, self.tasks, self.timeout_s = device, files, fds, tasks, timeout_s
        self.threads, self.chunk, self.strategy, self.wait_for, self.stats = threads, chunk, strategy, wait_for, stats
        self.register_ok = strategy in ("register", "hybrid")
        n = min(threads, len(tasks))
        if strategy == "register":
            self.registering = n
        elif strategy == "hybrid":
            if register_threads is None:
                register_threads = DEFAULT_REGISTER_THREADS if DEFAULT_REGISTER_THREADS is not None else max(1, threads // 8)
            self.registering = min(n, register_threads)
        else:
            self.registering = 0
        self.maps: list[tuple[mmap.mmap, torch.Tensor] | None] = [None] * len(files)
        self.map_lock = threading.Lock()
        self.registered = 0
        self.reg_lock = threading.Lock()
        self.cudart = torch.cuda.cudart() if self.registering else None
        self.staging_lock = threading.Lock()

    @classmethod
    def streams(cls, device: torch.device, n: int) -> list[torch.cuda.Stream]:
        key = (device.index if device.index is not None else torch.cuda.current_device(), n)
        if key not in cls._streams:
            cls._streams[key] = [torch.cuda.Stream(device=device) for _ in range(n)]
        return cls._streams[key]

    def run(self) -> None:
        n = min(self.threads, len(self.tasks))
        streams = self.streams(self.device, max(1, n))
        current = torch.cuda.current_stream(self.device)
        for s in streams:
            s.wait_stream(current)  # slots may still be written by earlier work on the engine's stream
        counter = itertools.count()
        try:
            def work(it, fail):
                i = next(counter)
                self.worker(it, fail, streams[i], register=i < self.registering)

            _run_workers(n, self.tasks, work, self.timeout_s)
        finally:
            for s in streams:
                current.wait_stream(s)
            torch.cuda.synchronize(self.device)  # every registered window / staging buffer is done with
            self._close_maps()

    # ---- per worker --------------------------------------------------------------------------------

    def worker(self, next_task, fail: _Failure, stream: torch.cuda.Stream, register: bool) -> None:
        torch.cuda.set_device(self.device)
        ring: list[tuple[torch.Tensor, torch.cuda.Event | None]] = []  # pinned staging buffers
        scratch: list[torch.Tensor | None] = []
        k = 0
        pending: collections.deque = collections.deque()  # (event, ptr, nbytes) registered windows
        cudart, handle = _cudart(), stream.cuda_stream
        try:
            while fail.error is None and (task := next_task()) is not None:
                if register and not task.convert and self.register_ok and self._copy_registered(task, stream, pending):
                    continue
                if not ring:
                    ring, scratch = self._alloc_ring()
                buf, ev = ring[k]
                if ev is not None:
                    ev.synchronize()  # its previous copy has drained: the buffer is free
                n = task.end - task.start
                if n > buf.numel():  # a single row wider than a staging buffer (never for real models)
                    buf = torch.empty(n, dtype=torch.uint8, pin_memory=True)
                view = buf[:n]
                _read_into(self.fds[task.file_idx], _np_bytes(view), task.start)
                if fail.error is not None:  # abandoned at its deadline: copy nothing live
                    break
                with torch.cuda.stream(stream):
                    self._wait_slots(task, stream)
                    if task.convert:
                        dev = scratch[k]
                        if dev is None or dev.numel() < n:
                            dev = scratch[k] = torch.empty(max(n, buf.numel()), dtype=torch.uint8, device=self.device)
                            self._count_scratch(dev.numel())
                        dev[:n].copy_(view, non_blocking=True)
                        for piece in task.pieces:
                            _apply_convert(piece, dev[piece.start - task.start : piece.start - task.start + piece.nbytes])
                    elif cudart is not None:  # one ctypes call a piece: torch's copy_ costs ~25 us of GIL time each
                        base = view.data_ptr() - task.start
                        for piece in task.pieces:
                            err = cudart.cudaMemcpyAsync(piece.dest.data_ptr(), base + piece.start, piece.nbytes, _H2D, handle)
                            if err:
                                _clear_cuda_error()
                                raise HotswapError(f"cudaMemcpyAsync of {shown(piece.slot.hf_name)} failed with CUDA error {err}")
                    else:
                        for piece in task.pieces:
                            a = piece.start - task.start
                            piece.dest.copy_(view[a : a + piece.nbytes], non_blocking=True)
                    done = torch.cuda.Event()
                    done.record(stream)
                ring[k] = (buf, done)  # (an oversized buffer takes the slot: in flight, it must outlive its copies)
                k = (k + 1) % len(ring)
        finally:
            while pending:
                self._unregister(*pending.popleft())
            stream.synchronize()  # the raw copies told no allocator about the staging ring: done with it before it is freed

    def _alloc_ring(self):
        ring = [(torch.empty(self.chunk, dtype=torch.uint8, pin_memory=True), None) for _ in range(2)]
        with self.staging_lock:
            self.stats.staging_bytes += 2 * self.chunk
        return ring, [None, None]

    def _count_scratch(self, n: int) -> None:
        with self.staging_lock:
            self.stats.scratch_bytes += n

    def _wait_slots(self, task: _Task, stream: torch.cuda.Stream) -> None:
        if self.wait_for:
            seen = set()
            for piece in task.pieces:
                ev = self.wait_for.get(piece.slot.hf_name)
                if ev is not None and id(ev) not in seen:
                    seen.add(id(ev))
                    stream.wait_event(ev)

    # ---- registered page cache ---------------------------------------------------------------------

    def _map(self, fi: int) -> tuple[mmap.mmap, torch.Tensor]:
        with self.map_lock:
            if self.maps[fi] is None:
                mm = mmap.mmap(self.fds[fi], 0, access=mmap.ACCESS_READ)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # read-only buffer: we only ever read from it
                    t = torch.frombuffer(mm, dtype=torch.uint8)
                self.maps[fi] = (mm, t)
            return self.maps[fi]

    def _copy_registered(self, task: _Task, stream: torch.cuda.Stream, pending: collections.deque) -> bool:
        mm, base = self._map(task.file_idx)
        a = task.start // PAGE * PAGE
        b = min(-(-task.end // PAGE) * PAGE, -(-len(mm) // PAGE) * PAGE)
        ptr = base.data_ptr() + a
        while len(pending) >= REGISTER_DEPTH:
            self._unregister(*pending.popleft())
        global POPULATE
        if POPULATE:
            try:
                mm.madvise(MADV_POPULATE_READ, a, b - a)
            except (OSError, ValueError):
                POPULATE = False
        err = self.cudart.cudaHostRegister(ptr, b - a, CUDA_HOST_REGISTER_READ_ONLY)
        if int(err) != 0:
            _clear_cuda_error()  # a failed runtime call leaves a per-thread error a later launch check would raise
            self.register_ok = False
            self.stats.fell_back = f"cudaHostRegister failed: {self.cudart.cudaGetErrorString(err)}"
            return False
        with self.reg_lock:
            self.registered += b - a
            self.stats.registered_bytes = max(self.stats.registered_bytes, self.registered)
        entry = [stream, ptr, b - a]
        pending.append(entry)  # unregistered even if a copy below fails
        with torch.cuda.stream(stream):
            self._wait_slots(task, stream)
            for piece in task.pieces:
                piece.dest.copy_(base[piece.start : piece.start + piece.nbytes], non_blocking=True)
            done = torch.cuda.Event()
            done.record(stream)
        entry[0] = done
        return True

    def _unregister(self, done, ptr: int, nbytes: int) -> None:
        done.synchronize()  # the event of its copies (or the whole stream after a failure)
        if int(self.cudart.cudaHostUnregister(ptr)) != 0:
            _clear_cuda_error()
        with self.reg_lock:
            self.registered -= nbytes

    def _close_maps(self) -> None:
        for i, m in enumerate(self.maps):
            if m is not None:
                mm, t = m
                self.maps[i] = None
                del t, m
                try:
                    mm.close()
                except BufferError:  # a view is still referenced somewhere: the map goes with it
                    pass
