"""Holding generation: pause_generation / continue_generation, with SGLang's state rules.

A second pause, or a continue while running, answers success (frameworks retry them) and changes no hold; a
second pause's abort or retract still acts on the requests held, as each SGLang pause does (AReaL pauses twice:
abort, then in_place).
Updates made during a pause form one session (`Sessions.open_pause`), committed at continue; each
version they give is readable at once. A continue while a `begin_weight_update` session is open is
refused and the session stays open: committing it would serve a half-pushed update.

Modes: `abort` ends in-flight requests, `retract` returns them to the queue (recomputed on continue),
`in_place` freezes them where they are, `wait` (vLLM's) lets started requests finish first: the scheduler
holds it back, admitting nothing new, until they have (as it does a weight update).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from hotswap import protocol as p
from hotswap.errors import shown
from hotswap.weights.session import Sessions

MODES = ("abort", "retract", "in_place", "wait")


@dataclass(kw_only=True, slots=True)
class GenerationPause:
    sessions: Sessions
    abort_all: Callable[[str], int]
    retract_all: Callable[[], None]
    paused: bool = False

    @property
    def held(self) -> bool:
        """No batch may run: generation is paused or an explicit update session is open."""
        return self.paused or self.sessions.open

    def expire(self) -> None:
        """A session whose trainer went silent is rolled back, and serving resumes."""
        if self.sessions.expire():
            self.paused = False

    def pause_generation(self, req: p.PauseGenerationRequest) -> p.ControlOutput:
        if req.mode not in MODES:
            return p.ControlOutput(success=False, message=f"unknown pause mode {shown(req.mode)}; use abort, retract, in_place or wait")
        if self.paused:  # the hold stays as it is; an abort or retract still acts, as each of SGLang's pauses does
            if req.mode == "abort" and (n := self.abort_all("aborted by pause_generation")):
                return p.ControlOutput(success=True, message=f"generation is already paused; aborted {n} request(s)")
            if req.mode == "retract":
                self.retract_all()
                return p.ControlOutput(success=True, message="generation is already paused; started requests retracted")
            return p.ControlOutput(success=True, message="generation is already paused (no-op)")
        if req.mode == "abort":
            self.abort_all("aborted by pause_generation")
        elif req.mode == "retract":
            self.retract_all()
        self.paused = True
        self.sessions.open_pause()
        return p.ControlOutput(success=True, message=f"generation paused ({req.mode})")

    def continue_generation(self, req: p.ContinueGenerationRequest) -> p.ControlOutput:
        done = self.sessions.close_pause()
        if done is None:
            return p.ControlOutput(success=False, message=(
                "continue_generation refused: a begin_weight_update session is open and holds a partial update; end it with "
                "end_weight_update (or abort it) first; the session stays open"))
        if not self.paused:
            return p.ControlOutput(success=True, message="generation is not paused (no-op)")
        self.paused = False
        return p.ControlOutput(success=True, message="generation continues" + (f"; {done}" if done else ""))
