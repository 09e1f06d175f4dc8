"""An engine handle across a multiprocessing pipe: the trainer process drives the engine that lives in
the main process with `hotswap.trainer`'s pushers, exactly as it would drive an in-process Engine or an
`HttpEngineClient`.

Trainer side: `PipeEngineHandle(conn)` has the `EngineHandle` methods; each call sends
`("call", method, kwargs)` and waits for `("reply", success, message, data)`.
Engine side: `serve_calls(conn, engine, until=...)` answers those calls (one at a time, in order) until
a message of the kind `until` arrives, and returns it.

One call at a time is enough for every transport: a distributed push sends its bucket's
`update_weights_from_distributed` call from a pusher thread and broadcasts from the trainer's main thread
meanwhile, so the engine's call, made here, receives the broadcast and returns.
"""

from __future__ import annotations

import threading
from multiprocessing.connection import Connection

from hotswap.trainer.client import EngineResult

# the weight-update surface a trainer may call (hotswap.trainer.EngineHandle), nothing else
ENGINE_METHODS = frozenset({
    "init_weights_update_group", "update_weights_from_distributed", "destroy_weights_update_group",
    "update_weights_from_tensor", "update_weights_from_disk", "begin_weight_update", "end_weight_update",
    "check_weights", "get_weights_by_name", "get_model_info", "get_ipc_token",
})


class TrainerGone(RuntimeError):
    """The trainer process closed its end of the pipe or reported an error."""


class PipeEngineHandle:
    """The trainer's handle on an engine in another process, reached through a multiprocessing pipe."""

    def __init__(self, conn: Connection):
        self._conn = conn
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return "PipeEngineHandle()"

    def _call(self, method: str, **kwargs) -> EngineResult:
        with self._lock:
            self._conn.send(("call", method, kwargs))
            kind, success, message, data = self._conn.recv()
        assert kind == "reply", kind
        return EngineResult(success, message, data)

    def init_weights_update_group(self, master_address, master_port, rank_offset, world_size, group_name="weight_update_group",
                                  backend=None, timeout_s=600.0):
        return self._call("init_weights_update_group", master_address=master_address, master_port=master_port, rank_offset=rank_offset,
                          world_size=world_size, group_name=group_name, backend=backend, timeout_s=timeout_s)

    def update_weights_from_distributed(self, names, dtypes, shapes, group_name="weight_update_group", flush_cache=True,
                                        weight_version=None, load_format=None, session_id=None):
        return self._call("update_weights_from_distributed", names=list(names), dtypes=[str(d) for d in dtypes],
                          shapes=[list(s) for s in shapes], group_name=group_name, flush_cache=flush_cache,
                          weight_version=weight_version, load_format=load_format, session_id=session_id)

    def destroy_weights_update_group(self, group_name="weight_update_group"):
        return self._call("destroy_weights_update_group", group_name=group_name)

    def update_weights_from_tensor(self, named_tensors, load_format=None, flush_cache=True, weight_version=None, session_id=None):
        if any(not isinstance(x, dict) for x in named_tensors):
            raise TypeError("across processes, update_weights_from_tensor takes handle descriptors (hotswap.wire.ipc), not tensors")
        return self._call("update_weights_from_tensor", named_tensors=list(named_tensors), load_format=load_format,
                          flush_cache=flush_cache, weight_version=weight_version, session_id=session_id)

    def update_weights_from_disk(self, model_path, load_format=None, weight_version=None, flush_cache=True, session_id=None):
        return self._call("update_weights_from_disk", model_path=str(model_path), load_format=load_format,
                          weight_version=weight_version, flush_cache=flush_cache, session_id=session_id)

    def begin_weight_update(self):
        return self._call("begin_weight_update")

    def end_weight_update(self, weight_version=None, abort=False, session_id=None):
        return self._call("end_weight_update", weight_version=weight_version, abort=abort, session_id=session_id)

    def check_weights(self, action, expected=None):
        return self._call("check_weights", action=action, expected=expected)

    def get_weights_by_name(self, name, truncate_size=100):
        return self._call("get_weights_by_name", name=name, truncate_size=truncate_size)

    def get_model_info(self):
        return self._call("get_model_info")

    def get_ipc_token(self) -> str:
        res = self._call("get_ipc_token")
        if not res:
            raise RuntimeError(f"get_ipc_token failed: {res.message}")
        return res.message


def serve_calls(conn: Connection, engine, *, until: str | tuple[str, ...], timeout_s: float | None = None) -> tuple:
    """Answer the trainer's engine calls until a message whose kind is in `until` arrives; return it.

    A trainer `("error", text)` message or a closed pipe raises TrainerGone. `timeout_s` bounds the wait
    for each message (None: no bound)."""
    until = (until,) if isinstance(until, str) else tuple(until)
    while True:
        if timeout_s is not None and not conn.poll(timeout_s):
            raise TrainerGone(f"no message from the trainer within {timeout_s:g} s")
        try:
            msg = conn.recv()
        except (EOFError, OSError) as exc:
            raise TrainerGone(f"the trainer process closed the pipe ({type(exc).__name__})") from exc
        kind = msg[0]
        if kind in until:
            return msg
        if kind == "error":
            raise TrainerGone(f"the trainer failed:\n{msg[1]}")
        if kind != "call":
            raise TrainerGone(f"unexpected message {kind!r} from the trainer")
        _, method, kwargs = msg
        if method not in ENGINE_METHODS:
            r = EngineResult(False, f"{method!r} is not an engine weight method")
        else:
            try:
                out = getattr(engine, method)(**kwargs)
                r = EngineResult(True, out) if isinstance(out, str) else EngineResult.of(out)  # get_ipc_token: the token
            except Exception as exc:  # bad input from the trainer: answer it, keep serving
                r = EngineResult(False, f"{type(exc).__name__}: {exc}")
        conn.send(("reply", r.success, r.message, _plain(r.data)))


def _plain(data: dict) -> dict:
    """Keep only what pickles as plain data (replies may carry tensors or futures in odd cases)."""
    out = {}
    for k, v in data.items():
        if v is None or isinstance(v, (bool, int, float, str, list, tuple, dict)):
            out[k] = v
    return out
