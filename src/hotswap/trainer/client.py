"""Engine handles: what a trainer holds to talk to an engine, in process or over HTTP.

Both an in-process `hotswap.Engine` and `HttpEngineClient` satisfy `EngineHandle` (the Engine's method
names and fields). Replies differ (output dataclasses, JSON dicts, SGLang tuples); `EngineResult.of`
turns any of them into one type.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable


@dataclass(frozen=True, slots=True)
class EngineResult:
    """One engine reply: `success`, `message`, and every other field of it in `data`."""

    success: bool
    message: str = ""
    data: dict = field(default_factory=dict)

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
        """Normalise an Engine output dataclass, a JSON dict, a `(success, message)` tuple or an EngineResult."""
        if isinstance(reply, EngineResult):
            return reply
        if hasattr(reply, "to_dict"):
            reply = reply.to_dict()
        if isinstance(reply, Mapping):
            data = dict(reply)
            success = data.pop("success", None)
            message = data.pop("message", "")
            if success is None:  # some routes answer with data only
                success = not data.get("error")
                message = message or str(data.get("error") or "")
            return cls(bool(success), str(message or ""), data)
        if isinstance(reply, (tuple, list)) and len(reply) >= 2 and isinstance(reply[0], bool):
            return cls(reply[0], str(reply[1]))
        if hasattr(reply, "success"):
            return cls(bool(reply.success), str(getattr(reply, "message", "")))
        return cls(False, f"unexpected engine reply {reply!r}")


@runtime_checkable
class EngineHandle(Protocol):
    """The weight-update surface of an engine. `hotswap.Engine` and `HttpEngineClient` both have it; each
    method returns something `EngineResult.of` understands."""

    def init_weights_update_group(self, master_address: str, master_port: int, rank_offset: int, world_size: int,
                                  group_name: str = ..., backend: str | None = None, timeout_s: float = ...) -> Any: ...

    def update_weights_from_distributed(self, names: list[str], dtypes: list, shapes: list, group_name: str = ...,
                                        flush_cache: bool = True, weight_version: str | None = None,
                                        load_format: str | None = None) -> Any: ...

    def destroy_weights_update_group(self, group_name: str = ...) -> Any: ...

    def update_weights_from_tensor(self, named_tensors: list, load_format: str | None = None, flush_cache: bool = True,
                                   weight_version: str | None = None) -> Any: ...

    def update_weights_from_disk(self, model_path: str, load_format: str | None = None, weight_version: str | None = None,
                                 flush_cache: bool = True) -> Any: ...

    def begin_weight_update(self) -> Any: ...

    def end_weight_update(self, weight_version: str | None = None, abort: bool = False) -> Any: ...

    def check_weights(self, action: str, expected: dict[str, str] | None = None) -> Any: ...

    def get_weights_by_name(self, name: str, truncate_size: int = 100) -> Any: ...

    def get_model_info(self) -> Any: ...

    def get_ipc_token(self) -> str: ...


class EngineConnectionError(RuntimeError):
    """The engine could not be reached, or answered something that is not a reply."""


class HttpEngineClient:
    """An engine behind hotswap's (SGLang-compatible) HTTP server: POSTs JSON with the Engine's field names
    and returns `EngineResult`s. Standard library only, so trainer processes need nothing extra.

    `timeout_s` bounds each HTTP call (None: wait forever); a distributed update's call returns only after
    the engine has received its bucket, so keep it above the group's timeout."""

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

    def __init__(self, base_url: str, api_key: str | None = None, timeout_s: float | None = 3600.0):
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.timeout_s = timeout_s

    def __repr__(self) -> str:
        return f"HttpEngineClient({self.base_url!r})"

    def post(self, route: str, body: dict | None, method: str = "POST") -> EngineResult:
        """POST a JSON body to a route (or GET one with `body=None, method="GET"`); HTTP error statuses still
        yield the engine's reply when it sent one."""
        url = self.base_url + route
        headers = {"Accept": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        data = None
        if body is not None:
            headers["Content-Type"] = "application/json"
            try:
                data = json.dumps(body).encode()
            except TypeError as exc:
                raise TypeError(f"{route}: body is not JSON-serialisable ({exc}); over HTTP, pass tensors as IPC descriptors") from exc
        request = urllib.request.Request(url, data=data, headers=headers, method=method)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as resp:
                status, raw = resp.status, resp.read()
        except urllib.error.HTTPError as exc:
            status, raw = exc.code, exc.read()
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise EngineConnectionError(f"cannot reach the engine at {url}: {reason}") from exc
        text = raw.decode(errors="replace")
        try:
            reply = json.loads(text) if text.strip() else {}
        except json.JSONDecodeError:
            reply = None
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
                                        flush_cache: bool = True, weight_version: str | None = None,
                                        load_format: str | None = None) -> EngineResult:
        return self.post(self.ROUTES["update_weights_from_distributed"], {
            "names": list(names), "dtypes": [str(d).removeprefix("torch.") for d in dtypes], "shapes": [list(s) for s in shapes],
            "group_name": group_name, "flush_cache": flush_cache, "weight_version": weight_version, "load_format": load_format})

    def destroy_weights_update_group(self, group_name: str = "weight_update_group") -> EngineResult:
        return self.post(self.ROUTES["destroy_weights_update_group"], {"group_name": group_name})

    def update_weights_from_tensor(self, named_tensors: list, load_format: str | None = None, flush_cache: bool = True,
                                   weight_version: str | None = None) -> EngineResult:
        return self.post(self.ROUTES["update_weights_from_tensor"], {
            "named_tensors": list(named_tensors), "load_format": load_format, "flush_cache": flush_cache, "weight_version": weight_version})

    def update_weights_from_disk(self, model_path: str, load_format: str | None = None, weight_version: str | None = None,
                                 flush_cache: bool = True) -> EngineResult:
        return self.post(self.ROUTES["update_weights_from_disk"], {
            "model_path": str(model_path), "load_format": load_format, "weight_version": weight_version, "flush_cache": flush_cache})

    def begin_weight_update(self) -> EngineResult:
        return self.post(self.ROUTES["begin_weight_update"], {})

    def end_weight_update(self, weight_version: str | None = None, abort: bool = False) -> EngineResult:
        return self.post(self.ROUTES["end_weight_update"], {"weight_version": weight_version, "abort": abort})

    def check_weights(self, action: str, expected: dict[str, str] | None = None) -> EngineResult:
        return self.post(self.ROUTES["check_weights"], {"action": action, "expected": expected})

    def get_weights_by_name(self, name: str, truncate_size: int = 100) -> EngineResult:
        return self.post(self.ROUTES["get_weights_by_name"], {"name": name, "truncate_size": truncate_size})

    def get_model_info(self) -> EngineResult:
        return self.post("/get_model_info", None, method="GET")

    def get_ipc_token(self) -> str:
        """The engine's IPC token (shared-memory blocks for it are named with its prefix)."""
        reply = self.post("/get_ipc_token", None, method="GET")
        token = reply.get("ipc_token")
        if not reply or not isinstance(token, str) or not token:
            raise EngineConnectionError(f"{self.base_url} gave no IPC token: {reply.message or reply.data}")
        return token
