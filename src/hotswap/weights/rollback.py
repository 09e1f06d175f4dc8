"""Keeps the slices an update session overwrites, so a failure anywhere restores the weights exactly."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from hotswap.weights.mapping import WeightSlot

_ALIGN = 256  # bytes; every dtype view of an arena slice starts aligned
_STREAMS: dict[torch.device, torch.cuda.Stream] = {}


def _save_stream(device: torch.device) -> torch.cuda.Stream:
    """One side stream per device for every session: the caching allocator keeps freed blocks per stream, so
    a new stream per session would cudaMalloc its device copies afresh each time (and strand the old ones)."""
    stream = _STREAMS.get(device)
    if stream is None:
        stream = _STREAMS[device] = torch.cuda.Stream(device=device)
    return stream


@dataclass(slots=True)
class HostArena:
    """Pinned host memory for saved originals, kept across sessions (pinning is slow: pay it once).

    A bump allocator over persistent segments: `take` hands out slices, `reset` makes them all free
    again. It holds its high-water mark (at most the model's size beyond the device budget)."""

    min_segment: int = 1 << 30
    segments: list[torch.Tensor] = field(default_factory=list)
    seg: int = 0  # segment the cursor is in
    pos: int = 0  # cursor in that segment

    def take(self, nbytes: int, pin: bool) -> torch.Tensor:
        need = -(-nbytes // _ALIGN) * _ALIGN
        while self.seg < len(self.segments):
            buf = self.segments[self.seg]
            if self.pos + need <= buf.numel():
                out = buf[self.pos : self.pos + nbytes]
                self.pos += need
                return out
            self.seg, self.pos = self.seg + 1, 0
        size = max(need, self.min_segment)
        size = 1 << (size - 1).bit_length()  # the pinned allocator rounds to a power of two anyway: use it all
        buf = torch.empty(size, dtype=torch.uint8, pin_memory=pin)
        self.segments.append(buf)
        self.seg, self.pos = len(self.segments) - 1, need
        return buf[:nbytes]

    def reset(self) -> None:
        self.seg = self.pos = 0

    @property
    def nbytes(self) -> int:
        return sum(s.numel() for s in self.segments)


@dataclass(kw_only=True, slots=True)
class RollbackBuffer:
    """Originals live in memory lent for the session first (`scratch`: the KV pool's bytes when no request holds
    a page, so a large model's saves copy at device speed instead of to the host), then in device memory up to
    `device_budget_bytes`, then in (pinned) host memory."""

    device_budget_bytes: int
    arena: HostArena | None = None  # shared with later sessions; a private one when not given
    # asked once, at the first save: a flat uint8 tensor on the weights' device this buffer may fill until it is
    # cleared, or None (nothing to lend)
    scratch: Callable[[], torch.Tensor | None] | None = None
    lent: torch.Tensor | None = None
    scratch_bytes: int = 0  # used of `lent`
    saved: dict[str, tuple[WeightSlot, torch.Tensor]] = field(default_factory=dict)
    device_bytes: int = 0
    host_bytes: int = 0
    stream: torch.cuda.Stream | None = None

    def _lent_copy(self, src: torch.Tensor) -> torch.Tensor | None:
        """A view of the lent memory shaped as `src`, or None when it is not lent or `src` does not fit in what is left."""
        if self.scratch is not None:
            self.lent, self.scratch = self.scratch(), None
        nbytes = src.numel() * src.element_size()
        lent = self.lent
        if lent is None or lent.device != src.device or self.scratch_bytes + nbytes > lent.numel():
            return None
        out = lent[self.scratch_bytes : self.scratch_bytes + nbytes].view(src.dtype).view(src.shape)
        self.scratch_bytes += -(-nbytes // _ALIGN) * _ALIGN
        return out

    def _host_copy(self, src: torch.Tensor) -> torch.Tensor:
        nbytes = src.numel() * src.element_size()
        if src.device.type != "cuda" or not nbytes:
            return torch.empty(src.shape, dtype=src.dtype)
        if self.arena is None:
            self.arena = HostArena()
        return self.arena.take(nbytes, pin=True).view(src.dtype).view(src.shape)

    def protect_many(self, slots: list[WeightSlot], overlap: bool = False) -> dict[str, torch.cuda.Event] | None:
        """Save the originals of `slots` (those not saved yet in this session).

        On CUDA the copies run on a side stream: device copies (up to the budget) as one grouped copy,
        the rest device-to-host into the pinned arena. With `overlap`, returns an event per slot that a
        writer must wait for before overwriting it (the disk reader does, so saving and loading overlap);
        otherwise the current stream waits for all of them before returning."""
        todo = [s for s in {s.hf_name: s for s in slots}.values() if s.hf_name not in self.saved]
        if not todo:
            return {} if overlap else None
        if todo[0].dest.device.type != "cuda":
            for s in todo:
                copy = self._lent_copy(s.dest)
                if copy is None:
                    copy = self._host_copy(s.dest)
                    self.host_bytes += copy.numel() * copy.element_size()
                copy.copy_(s.dest)
                self.saved[s.hf_name] = (s, copy)
            return {} if overlap else None
        device = todo[0].dest.device
        if self.stream is None:
            self.stream = _save_stream(device)
        current = torch.cuda.current_stream(device)
        self.stream.wait_stream(current)  # save what earlier work wrote
        events: dict[str, torch.cuda.Event] = {}
        with torch.cuda.stream(self.stream):
            on_device, host, copies, sources = [], [], [], []
            budget = self.device_budget_bytes - self.device_bytes
            for s in todo:
                nbytes = s.dest.numel() * s.dest.element_size()
                lent = self._lent_copy(s.dest)
                if lent is not None:
                    copies.append(lent)
                    sources.append(s)
                    self.saved[s.hf_name] = (s, lent)
                elif nbytes <= budget:
                    on_device.append(s)
                    budget -= -(-nbytes // _ALIGN) * _ALIGN
                else:
                    host.append(s)
            if on_device:  # one allocation for the device part, one view per slot
                sizes = [-(-s.dest.numel() * s.dest.element_size() // _ALIGN) * _ALIGN for s in on_device]
                block = torch.empty(sum(sizes), dtype=torch.uint8, device=device)
                off = 0
                for s, size in zip(on_device, sizes):
                    nbytes = s.dest.numel() * s.dest.element_size()
                    copy = block[off : off + nbytes].view(s.dest.dtype).view(s.dest.shape)
                    off += size
                    copies.append(copy)
                    sources.append(s)
                    self.device_bytes += size
                    self.saved[s.hf_name] = (s, copy)
            if copies:
                # one grouped launch: a copy_ per slot costs a launch each (300 for a 0.6B model) on the host
                torch._foreach_copy_(copies, [s.dest for s in sources], non_blocking=True)
                if overlap:
                    ev = torch.cuda.Event()
                    ev.record(self.stream)
                    events.update(dict.fromkeys((s.hf_name for s in sources), ev))
            for s in host:
                copy = self._host_copy(s.dest)
                self.host_bytes += copy.numel() * copy.element_size()
                self.saved[s.hf_name] = (s, copy)
            for s in host:
                copy = self.saved[s.hf_name][1]
                copy.copy_(s.dest, non_blocking=True)
                if overlap:
                    ev = torch.cuda.Event()
                    ev.record(self.stream)
                    events[s.hf_name] = ev
        if overlap:
            return events
        current.wait_stream(self.stream)
        return None

    def restore(self) -> int:
        """Put every saved original back, the latest saved first: slots may overlap (a stacked expert
        tensor and one expert's slice of it), and a later save of overlapping bytes may hold values an
        earlier call wrote, so the earliest save of each byte must be written last."""
        cuda = any(s.dest.device.type == "cuda" for s, _ in self.saved.values())
        if cuda:
            torch.cuda.synchronize()  # saves and any in-flight writes have finished
        for slot, copy in reversed(self.saved.values()):
            slot.dest.copy_(copy, non_blocking=True)
        if cuda:
            torch.cuda.synchronize()
        n = len(self.saved)
        self.clear()
        return n

    def clear(self) -> None:
        if self.stream is not None and self.saved:
            self.stream.synchronize()  # no copy still reads a slice the arena is about to hand out again
        self.saved.clear()
        self.device_bytes = self.host_bytes = self.scratch_bytes = 0
        self.lent = self.scratch = None  # the lent memory goes back to its owner
        if self.arena is not None:
            self.arena.reset()

    @property
    def extra_bytes(self) -> tuple[int, int]:
        """(device, host) bytes held for the originals now."""
        return self.device_bytes, self.host_bytes
