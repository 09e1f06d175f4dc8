"""The engine's side of a pipe to a front end in another process (`RemoteEngine`, engine/remote.py).

Why: the HTTP front end (uvicorn, JSON, SSE, detokenization of hundreds of streams) and the scheduler thread
share one interpreter lock when they share a process, and a busy event loop then delays every scheduler
step. With the front end in its own process the only Python this process runs for it is one pickled message
per scheduler step carrying every request's new outputs, and one per control reply.

Messages (pickled by multiprocessing's Connection; both ends are this package, one process spawned by the
other: nothing from the network is unpickled here):
  front end -> engine: `(call_id, request)`: any protocol request; a GenerateBatch's requests arrive without
                       their callbacks, which this side fills in
  engine -> front end: `("outputs", rows, tokens)` once per scheduler step with outputs: each GenerateOutput as
                       the tuple of its fields (`output_rows`; a tuple pickles in a third of the time a dataclass
                       does, and this process's interpreter lock is the scheduler's), and each streamed output that
                       is one plain new token as its token row (`protocol.output_of_token_row`, `GenerateRequest.sink_token`;
                       no GenerateOutput made here at all);
                       `("reply", call_id, output, error)` when the scheduler answers a request;
                       `("model_path", path)` when a sibling front end's update_weights_from_disk changed the folder
                       the served weights came from (each front end reports it: `/get_model_info`, the OpenAI model id)
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import operator
import os
import queue
import socket
import threading
from collections import Counter
from concurrent.futures import Future
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.reduction import ForkingPickler

from hotswap import protocol as p
from hotswap.cache.page_allocator import PoolCapacity
from hotswap.config import EngineConfig, ModelConfig
from hotswap.errors import HotswapError, duplicate_rid_message

log = logging.getLogger("hotswap.engine")

# held while a front end's rids are checked against its siblings' and taken: two front ends sending one rid at once
# cannot both find it free
_ADMISSION = threading.Lock()

_OUTPUT_FIELDS = tuple(f.name for f in dataclasses.fields(p.GenerateOutput))
_output_row = operator.attrgetter(*_OUTPUT_FIELDS)


def output_rows(outs: list[p.GenerateOutput]) -> list[tuple]:
    """A step's outputs as the pipe carries them: each one's field values, in field order."""
    return [_output_row(out) for out in outs]


def outputs_from_rows(rows: list[tuple], tokens: list[tuple] = ()) -> list[p.GenerateOutput]:
    """A step's message undone: the outputs its token rows stand for, then `output_rows` undone (both ends of the
    pipe are this package, so the field order is the same). Token rows first keeps each request's order: a step
    emits at most one output per running request, and a request's finished output (an abort taken while the step
    ran, say) comes after any token of it; once finished it emits nothing more."""
    return list(map(p.output_of_token_row, tokens)) + [p.GenerateOutput(**dict(zip(_OUTPUT_FIELDS, row))) for row in rows]


def shut_down(conn: Connection) -> None:
    """Shut a Pipe end's socket down both ways: the peer's reader sees EOF, ours too, and the handle stays valid."""
    try:
        with socket.socket(fileno=os.dup(conn.fileno())) as sock:
            sock.shutdown(socket.SHUT_RDWR)
    except OSError:  # closed already
        pass


def close_pipe(conn: Connection, readers: tuple[threading.Thread, ...], timeout: float) -> None:
    """Close a duplex Pipe end (a socket) whose reader may be blocked in recv: shut the socket down first, so
    the reader sees EOF instead of a handle closed under it, join the threads (bounded), then close."""
    shut_down(conn)
    for t in readers:
        if t.is_alive() and t is not threading.current_thread():
            t.join(timeout)
    conn.close()


@dataclass(frozen=True, slots=True)
class EngineInfo:
    """What a front end needs to stand in for the engine: sent once, when it starts."""

    config: EngineConfig
    model_config: ModelConfig
    device: str
    model_path: str  # the folder the served weights came from now
    capacity: PoolCapacity
    accelerator: str | None  # the GPU's name (a front end process never starts CUDA to ask it)


class EngineService:
    """Serves one RemoteEngine over `conn`: its requests go to the engine's scheduler; the scheduler's replies
    and per-step outputs go back, in the order the scheduler produced them. When the pipe closes (the front
    end exited) its unfinished requests are aborted and `closed` is set. `siblings`: the services of the other
    front ends of one server (`hotswap serve --frontend-workers`), a list every one of them joins."""

    def __init__(self, engine, conn: Connection, siblings: list[EngineService] | None = None):
        self.engine = engine
        self.siblings = siblings if siblings is not None else []
        self.siblings.append(self)
        self.info = EngineInfo(config=engine.config, model_config=engine.model_config, device=str(engine.device),
                               model_path=str(engine.model_path), capacity=engine.capacity(),
                               accelerator=engine.accelerator)
        self._conn = conn
        self._outbox: queue.SimpleQueue = queue.SimpleQueue()  # messages to send, in order; None stops the sender
        self._step: list[p.GenerateOutput] = []  # this step's outputs so far (scheduler thread)
        self._step_tokens: list[tuple] = []  # this step's token rows so far (scheduler thread only: no lock)
        self._step_lock = threading.Lock()
        # rids of this front end's requests not finished yet, with how many run under each (a rid re-sent after a cancel
        # may arrive before the old request's abort has ended it)
        self._live: Counter[str] = Counter()
        self.closed = threading.Event()
        self._reader = threading.Thread(target=self._read, name="hotswap-service-in", daemon=True)
        self._sender = threading.Thread(target=self._send, name="hotswap-service-out", daemon=True)

    def start(self) -> EngineService:
        self._reader.start()
        self._sender.start()
        return self

    def close(self, timeout: float = 10.0) -> None:
        """Stop serving (the front end sees the pipe close) and wait for both threads, bounded."""
        self._outbox.put(None)
        close_pipe(self._conn, (self._reader, self._sender), timeout)

    # ---- scheduler thread: one message per step ----

    def _sink(self, out: p.GenerateOutput) -> None:
        with self._step_lock:
            self._step.append(out)
            if out.finished:
                self._live[out.rid] -= 1
                if self._live[out.rid] <= 0:
                    del self._live[out.rid]

    def _flush(self) -> None:
        with self._step_lock:
            outs, self._step = self._step, []
        tokens = self._step_tokens.copy()  # cleared in place: requests hold its bound append as their sink_token
        self._step_tokens.clear()
        if outs or tokens:
            self._outbox.put(("outputs", outs, tokens))

    def _reply(self, call_id: int, request, fut: Future) -> None:
        exc = fut.exception()
        out = None if exc is not None else fut.result()
        if isinstance(request, p.UpdateWeightsFromDiskRequest) and getattr(out, "success", False):
            self.engine.model_path = request.model_path  # what the engine's own API reports, as Engine.submit keeps it
            for sibling in self.siblings:
                if sibling is not self:
                    sibling._outbox.put(("model_path", request.model_path))
        self._outbox.put(("reply", call_id, out, exc))

    # ---- the pipe ----

    def _read(self) -> None:
        try:
            while True:
                try:
                    call_id, request = self._conn.recv()
                except (EOFError, OSError):
                    return
                except Exception:  # noqa: BLE001 - a message that does not unpickle: the front end must not wait on us forever
                    log.exception("a message from the front end could not be read: closing its pipe")
                    shut_down(self._conn)  # it sees the pipe close: its calls fail, naming it, and it exits
                    return
                if isinstance(request, p.GenerateBatch):
                    if taken := self._admit(request):
                        self._refuse(call_id, request, taken)
                        continue
                    for req in request.requests:
                        req.sink, req.flush, req.sink_token = self._sink, self._flush, self._step_tokens.append
                self.engine.scheduler.submit(request).add_done_callback(functools.partial(self._reply, call_id, request))
        finally:
            self.closed.set()
            self._outbox.put(None)
            with self._step_lock:
                orphans, self._live = set(self._live), Counter()
            for rid in orphans:
                self.engine.scheduler.submit(p.AbortRequest(rid=rid, message="the front end closed"))

    def _admit(self, batch: p.GenerateBatch) -> list[str]:
        """Take the batch's rids as this front end's, unless one runs already for a sibling: the rids that do (the
        front end checked its own: engine/api.py). SGLang refuses a rid that is running; one app serving the engine
        knows every running rid, several front ends know theirs only."""
        rids = [req.rid for req in batch.requests]
        with _ADMISSION:
            taken: set[str] = set()
            for sibling in self.siblings:
                if sibling is not self:
                    with sibling._step_lock:
                        taken.update(rid for rid in rids if sibling._live.get(rid, 0) > 0)
            if not taken:
                with self._step_lock:
                    self._live.update(rids)
        return sorted(taken)

    def _refuse(self, call_id: int, batch: p.GenerateBatch, taken: list[str]) -> None:
        """The whole batch refused, as the engine's own check refuses it (400, naming the rids): each request's one
        and last output says so, and nothing of it reaches the scheduler."""
        message = duplicate_rid_message(taken)
        outs = [p.aborted_output(req.rid, message, 400, prompt_tokens=len(req.input_ids)) for req in batch.requests]
        self._outbox.put(("outputs", outs, []))
        self._outbox.put(("reply", call_id, None, None))

    def _send(self) -> None:
        while (msg := self._outbox.get()) is not None:
            if msg[0] == "outputs":
                msg = ("outputs", output_rows(msg[1]), msg[2])
            try:
                blob = ForkingPickler.dumps(msg)
                if msg[0] == "reply" and msg[3] is not None:
                    # pickle rebuilds an exception by calling its class with its args: one whose __init__ wants other
                    # arguments pickles here and fails there, where it would stop the front end's reader for good
                    ForkingPickler.loads(blob)
            except Exception as exc:  # noqa: BLE001 - something in it does not pickle: the rest goes, what does not fails by name
                blob = ForkingPickler.dumps(self._sendable(msg, f"{type(exc).__name__}: {exc}"))
            try:
                self._conn.send_bytes(blob)
            except (OSError, ValueError):  # the front end is gone (the reader sees it too)
                return

    def _sendable(self, msg: tuple, why: str) -> tuple:
        """`msg` (a reply or a step's outputs; nothing else can fail to pickle) with what does not pickle replaced: a
        reply by an error saying so, naming the one it stands for; an output by its request's last output, aborted
        with why (500), the request aborted on the engine too (its KV freed). Every other output of the step goes."""
        if msg[0] == "reply":
            error = f" ({type(msg[3]).__name__}: {msg[3]})" if msg[3] is not None else ""
            return ("reply", msg[1], None, HotswapError(f"the engine's reply{error} could not be sent: {why}"))
        log.error("an output could not be sent to the front end (%s): its request ends aborted", why)
        return ("outputs", [row if _pickles(row) else self._unsendable(row, why) for row in msg[1]], msg[2])

    def _unsendable(self, row: tuple, why: str) -> tuple:
        """The row of an output that does not pickle replaced by its request's aborted end; the request aborted."""
        out = p.GenerateOutput(**dict(zip(_OUTPUT_FIELDS, row)))
        message = f"an output of this request could not be sent to the front end: {why}"
        if not out.finished:
            self.engine.scheduler.submit(p.AbortRequest(rid=out.rid, message=message))
        return _output_row(p.aborted_output(out.rid, message, 500, prompt_tokens=out.prompt_tokens, cached_tokens=out.cached_tokens,
                                            weight_version=out.weight_version))


def _pickles(value: object) -> bool:
    try:
        ForkingPickler.dumps(value)
    except Exception:  # noqa: BLE001
        return False
    return True
