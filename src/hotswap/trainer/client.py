"""Engine handles: what a trainer holds to talk to an engine, in process or over HTTP.

Both an in-process `hotswap.Engine` and `HttpEngineClient` satisfy `EngineHandle` (the Engine's method
names and fields). Replies differ (output dataclasses, JSON dicts, SGLang tuples); `EngineResult.of`
turns any of them into one type.
"""

from __future__ import annotations

import dataclasses
import http.client
import json
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable
from urllib.parse import urlsplit


@dataclass(frozen=True, slots=True)
class EngineResult:
    """One engine reply: `success`, `message`, and every other field of the reply in `data`; the fields after
    `data` are what the caller saw itself when no reply came (the engine never sends them)."""

    success: bool
    message: str = ""
    data: dict = field(default_factory=dict)
    exception: BaseException | None = None  # the call raised this instead of answering (unreachable engine, bad input)
    # the call may have reached the engine and run there, but no reply came (a read timeout, a connection dropped
    # after the request was sent): the engine's state must be asked, not assumed
    outcome_unknown: bool = False
    timed_out: bool = False  # no reply within the caller's time limit (the engine may still act on the call)

    def __bool__(self) -> bool:
        return self.success

    def get(self, key: str, default: Any = None) -> Any:
        return self.data.get(key, default)

    @property
    def received(self) -> bool | None:
        """For update_weights_from_distributed: whether the engine took part in the bucket's broadcasts
        (None when the engine does not say, e.g. SGLang)."""
        extra = self.data.get("extra")
        return extra.get("received") if isinstance(extra, Mapping) else None

    @classmethod
    def of(cls, reply: Any) -> EngineResult:
        """Normalise any engine reply: an Engine output (a dict with `to_dict`), a JSON dict, another
        dataclass (SGLang's `*ReqOutput`s), SGLang's `(success, message)` tuple or the disk update's
        `(success, message, num_paused_requests)`, or an EngineResult."""
        if isinstance(reply, EngineResult):
            return reply
        if hasattr(reply, "to_dict"):
            reply = reply.to_dict()
        elif dataclasses.is_dataclass(reply) and not isinstance(reply, type):
            reply = {f.name: getattr(reply, f.name) for f in dataclasses.fields(reply)}
        if isinstance(reply, Mapping):
            data = dict(reply)
            success = data.pop("success", None)
            message = data.pop("message", "")
            if success is None:  # some routes answer with data only
                success = not data.get("error")
                message = message or str(data.get("error") or "")
            return cls(bool(success), str(message or ""), data)
        if isinstance(reply, (tuple, list)) and len(reply) in (2, 3) and isinstance(reply[0], bool):
            data = {"num_paused_requests": reply[2]} if len(reply) == 3 else {}
            return cls(reply[0], str(reply[1]), data)
        if hasattr(reply, "success"):
            return cls(bool(reply.success), str(getattr(reply, "message", "")))
        return cls(False, f"unexpected engine reply {reply!r}")


@runtime_checkable
class EngineHandle(Protocol):
    """The weight-update surface of an engine. `hotswap.Engine` and `HttpEngineClient` both have it; each
    method returns something `EngineResult.of` understands. `session_id` is passed only to engines whose
    begin_weight_update answered one: a handle for engines without session ids may leave it out."""

    def init_weights_update_group(self, master_address: str, master_port: int, rank_offset: int, world_size: int,
                                  group_name: str = ..., backend: str | None = None, timeout_s: float = ...) -> Any: ...

    def update_weights_from_distributed(self, names: list[str], dtypes: list, shapes: list, group_name: str = ...,
                                        flush_cache: bool = True, load_format: str | None = None,
                                        weight_version: str | None = None, session_id: str | None = None) -> Any: ...

    def destroy_weights_update_group(self, group_name: str = ...) -> Any: ...

    def update_weights_from_tensor(self, named_tensors: list, load_format: str | None = None, flush_cache: bool = True,
                                   weight_version: str | None = None, session_id: str | None = None) -> Any: ...

    def update_weights_from_disk(self, model_path: str, load_format: str | None = None, weight_version: str | None = None,
                                 flush_cache: bool = True, session_id: str | None = None) -> Any: ...

    def begin_weight_update(self) -> Any: ...

    def end_weight_update(self, weight_version: str | None = None, abort: bool = False, session_id: str | None = None) -> Any: ...

    def check_weights(self, action: str, expected: dict[str, str] | None = None) -> Any: ...

    def get_weights_by_name(self, name: str, truncate_size: int = 100) -> Any: ...

    def get_model_info(self) -> Any: ...

    def get_ipc_token(self) -> str: ...


class EngineConnectionError(RuntimeError):
    """The engine could not be reached, or gave no reply. `outcome_unknown` is True when the request may have
    reached it (a read timeout, a connection dropped after sending): the engine may have acted on it."""

    def __init__(self, message: str, *, outcome_unknown: bool = False):
        super().__init__(message)
        self.outcome_unknown = outcome_unknown


def with_session(body: dict, session_id: str | None) -> dict:
    """A route's body, with `session_id` only when there is one (a server without sessions never sees the key)."""
    return body if session_id is None else {**body, "session_id": session_id}


def validate_base_url(base_url: str) -> str:
    """`http(s)://host[:port][/prefix]`, without credentials, query or fragment (a key belongs in `api_key`,
    never in a URL that ends up in logs and error messages)."""
    if not isinstance(base_url, str):
        raise TypeError(f"base_url must be a str, got {type(base_url).__name__}")
    parts = urlsplit(base_url.strip())
    if parts.username is not None or parts.password is not None:
        host = parts.hostname or "?"
        raise ValueError(f"base_url for host {host!r} carries credentials; pass the key as api_key=... instead")
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"base_url {base_url!r} must start with http:// or https://")
    if not parts.hostname:
        raise ValueError(f"base_url {base_url!r} names no host")
    if parts.query or parts.fragment:
        raise ValueError(f"base_url {parts.scheme}://{parts.netloc}{parts.path} must not carry a query or fragment")
    try:
        parts.port  # noqa: B018 (raises on a bad port)
    except ValueError as exc:
        raise ValueError(f"base_url {base_url!r}: {exc}") from None
    return f"{parts.scheme}://{parts.netloc}{parts.path.rstrip('/')}"


class HttpEngineClient:
    """An engine behind hotswap's (SGLang-compatible) HTTP server: POSTs JSON with the Engine's field names
    and returns `EngineResult`s. Standard library only, so trainer processes need nothing extra.

    Every call is bounded: `connect_timeout_s` for the TCP (and TLS) connection, `timeout_s` for each read
    of the reply (None: wait forever). A distributed update's call returns only after the engine has
    received its bucket, so keep `timeout_s` above the group's timeout. `api_key` goes as
    `Authorization: Bearer` on every call; `admin_api_key` (a server started with SGLang's `--admin-api-key`,
    which then refuses the API key on its admin routes and the admin key on the others) takes its place on
    every call but `get_model_info` and `post(..., admin=False)`; redirects are not followed (the key never goes to another
    host) and no proxy from the environment is used."""

    ROUTES = {
        "init_weights_update_group": "/init_weights_update_group",
        "update_weights_from_distributed": "/update_weights_from_distributed",
        "destroy_weights_update_group": "/destroy_weights_update_group",
        "update_weights_from_tensor": "/update_weights_from_tensor",
        "update_weights_from_disk": "/update_weights_from_disk",
        "begin_weight_update": "/begin_weight_update",
        "end_weight_update": "/end_weight_update",
        "check_weights": "/weights_checker",
        "get_weights_by_name": "/get_weights_by_name",
    }

    def __init__(self, base_url: str, api_key: str | None = None, timeout_s: float | None = 3600.0, connect_timeout_s: float = 10.0,
                 admin_api_key: str | None = None):
        self.base_url = validate_base_url(base_url)
        for name, key in (("api_key", api_key), ("admin_api_key", admin_api_key)):
            if key is not None and (not isinstance(key, str) or not key.strip() or any(c in key for c in "\r\n")):
                raise ValueError(f"{name} must be a non-empty single-line string (or None)")
        self.api_key = api_key
        self.admin_api_key = admin_api_key
        self.timeout_s = timeout_s
        self.connect_timeout_s = connect_timeout_s
        parts = urlsplit(self.base_url)
        self._https = parts.scheme == "https"
        self._host, self._port, self._prefix = parts.hostname, parts.port, parts.path

    def __repr__(self) -> str:
        return f"HttpEngineClient({self.base_url!r})"

    def _connection(self) -> http.client.HTTPConnection:
        cls = http.client.HTTPSConnection if self._https else http.client.HTTPConnection
        return cls(self._host, self._port, timeout=self.connect_timeout_s)

    def _exchange(self, url: str, method: str, path: str, data: bytes | None, headers: dict) -> tuple[int, bytes]:
        """One request on a fresh connection: (status, body). Raises EngineConnectionError saying whether
        the request may have reached the engine."""
        conn = self._connection()
        try:
            try:
                conn.connect()
            except (TimeoutError, socket.timeout):
                raise EngineConnectionError(f"cannot reach the engine at {url}: no connection within {self.connect_timeout_s:g} s") from None
            except OSError as exc:
                raise EngineConnectionError(f"cannot reach the engine at {url}: {exc.strerror or exc}") from exc
            conn.sock.settimeout(self.timeout_s)
            try:
                conn.request(method, path, body=data, headers=headers)
                resp = conn.getresponse()
                return resp.status, resp.read()
            except (TimeoutError, socket.timeout):
                raise EngineConnectionError(f"no reply from the engine at {url} within {self.timeout_s:g} s (it may still act on "
                                            "the request)", outcome_unknown=True) from None
            except (OSError, http.client.HTTPException) as exc:
                raise EngineConnectionError(f"the engine at {url} dropped the connection before replying ({type(exc).__name__}: "
                                            f"{exc}); it may have acted on the request", outcome_unknown=True) from exc
        finally:
            conn.close()

    def post(self, route: str, body: dict | None, method: str = "POST", admin: bool = True) -> EngineResult:
        """POST a JSON body to a route (or GET one with `body=None, method="GET"`); HTTP error statuses still
        yield the engine's reply when it sent one. `admin=False` for generation and status routes: they take
        the API key, never the admin key."""
        url = self.base_url + route
        headers = {"Accept": "application/json"}
        key = (self.admin_api_key or self.api_key) if admin else self.api_key
        if key:
            headers["Authorization"] = f"Bearer {key}"
        data = None
        if body is not None:
            headers["Content-Type"] = "application/json"
            try:
                data = json.dumps(body).encode()
            except TypeError as exc:
                raise TypeError(f"{route}: body is not JSON-serialisable ({exc}); over HTTP, pass tensors as IPC descriptors") from exc
        status, raw = self._exchange(url, method, self._prefix + route, data, headers)
        text = raw.decode(errors="replace")
        try:
            reply = json.loads(text) if text.strip() else {}
        except json.JSONDecodeError:
            reply = None
        if 300 <= status < 400:
            return EngineResult(False, f"HTTP {status} from {url}: redirects are not followed (give the engine's own URL)")
        if isinstance(reply, Mapping):
            if "success" not in reply and 200 <= status < 300:
                reply = {"success": True, **reply}
            elif "success" not in reply:
                detail = reply.get("message") or reply.get("detail") or reply.get("error") or text
                reply = {"success": False, "message": f"HTTP {status}: {detail}", **{k: v for k, v in reply.items() if k != "message"}}
            return EngineResult.of(reply)
        if 200 <= status < 300:
            return EngineResult(True, text)
        return EngineResult(False, f"HTTP {status} from {url}: {text[:500]}")

    # ---- the EngineHandle methods (the Engine's names and fields) ------------------------------------

    def init_weights_update_group(self, master_address: str, master_port: int, rank_offset: int, world_size: int,
                                  group_name: str = "weight_update_group", backend: str | None = None,
                                  timeout_s: float = 600.0) -> EngineResult:
        return self.post(self.ROUTES["init_weights_update_group"], {
            "master_address": master_address, "master_port": int(master_port), "rank_offset": int(rank_offset),
            "world_size": int(world_size), "group_name": group_name, "backend": backend, "timeout_s": timeout_s})

    def update_weights_from_distributed(self, names: list[str], dtypes: list, shapes: list, group_name: str = "weight_update_group",
                                        flush_cache: bool = True, load_format: str | None = None,
                                        weight_version: str | None = None, session_id: str | None = None) -> EngineResult:
        return self.post(self.ROUTES["update_weights_from_distributed"], with_session({
            "names": list(names), "dtypes": [str(d).removeprefix("torch.") for d in dtypes], "shapes": [list(s) for s in shapes],
            "group_name": group_name, "flush_cache": flush_cache, "weight_version": weight_version, "load_format": load_format}, session_id))

    def destroy_weights_update_group(self, group_name: str = "weight_update_group") -> EngineResult:
        return self.post(self.ROUTES["destroy_weights_update_group"], {"group_name": group_name})

    def update_weights_from_tensor(self, named_tensors: list, load_format: str | None = None, flush_cache: bool = True,
                                   weight_version: str | None = None, session_id: str | None = None) -> EngineResult:
        return self.post(self.ROUTES["update_weights_from_tensor"], with_session({
            "named_tensors": list(named_tensors), "load_format": load_format, "flush_cache": flush_cache, "weight_version": weight_version},
            session_id))

    def update_weights_from_disk(self, model_path: str, load_format: str | None = None, weight_version: str | None = None,
                                 flush_cache: bool = True, session_id: str | None = None) -> EngineResult:
        return self.post(self.ROUTES["update_weights_from_disk"], with_session({
            "model_path": str(model_path), "load_format": load_format, "weight_version": weight_version, "flush_cache": flush_cache},
            session_id))

    def begin_weight_update(self) -> EngineResult:
        """The reply's data holds the engine's `session_id` (hotswap; SGLang's has none)."""
        return self.post(self.ROUTES["begin_weight_update"], {})

    def end_weight_update(self, weight_version: str | None = None, abort: bool = False, session_id: str | None = None) -> EngineResult:
        return self.post(self.ROUTES["end_weight_update"], with_session({"weight_version": weight_version, "abort": abort}, session_id))

    def check_weights(self, action: str, expected: dict[str, str] | None = None) -> EngineResult:
        return self.post(self.ROUTES["check_weights"], {"action": action, "expected": expected})

    def get_weights_by_name(self, name: str, truncate_size: int = 100) -> EngineResult:
        return self.post(self.ROUTES["get_weights_by_name"], {"name": name, "truncate_size": truncate_size})

    def get_model_info(self) -> EngineResult:
        return self.post("/get_model_info", None, method="GET", admin=False)

    def get_ipc_token(self) -> str:
        """The engine's IPC token (shared-memory blocks for it are named with its prefix)."""
        reply = self.post("/get_ipc_token", None, method="GET")
        token = reply.get("ipc_token")
        if not reply or not isinstance(token, str) or not token:
            raise EngineConnectionError(f"{self.base_url} gave no IPC token: {reply.message or reply.data}")
        return token
