"""Weight-lifecycle routes. Each body is validated straight into the protocol request dataclass of the same
name and fields (unknown fields are ignored, as SGLang does; known ones are type-checked), sent to the
engine with `await engine.asubmit(...)`, and answered with the output's fields: 200 when `success`,
400 when refused. A bad body is a 400 of the same shape; the server never dies on one."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from pydantic import BaseModel, ConfigDict

from hotswap import protocol as p
from hotswap.errors import HotswapError, shown
from hotswap.server.http_utils import APIError, JSONResponse, parse_body
from hotswap.weights.saver import check_remote_url

if TYPE_CHECKING:
    from hotswap.server.app import ServerState


class UpdateWeightsFromTensorBody(BaseModel):
    """HTTP form of UpdateWeightsFromTensorRequest: plain-data handle descriptors (hotswap.wire.ipc), or
    SGLang's `serialized_named_tensors` (base64 text, one per TP rank; decoded without running anything)."""

    model_config = ConfigDict(extra="ignore")
    named_tensors: list[dict[str, Any]] | None = None
    serialized_named_tensors: list[str] | None = None
    load_format: str | None = None
    flush_cache: bool = True
    weight_version: str | None = None
    abort_all_requests: bool = False
    session_id: str | None = None

    def to_request(self) -> p.UpdateWeightsFromTensorRequest:
        if (self.named_tensors is None) == (self.serialized_named_tensors is None):
            raise APIError(400, "give exactly one of named_tensors (handle descriptors) or serialized_named_tensors (SGLang's payloads)",
                           param="named_tensors")
        return p.UpdateWeightsFromTensorRequest(named_tensors=self.named_tensors, serialized_named_tensors=self.serialized_named_tensors,
                                                load_format=self.load_format, flush_cache=self.flush_cache,
                                                weight_version=self.weight_version, abort_all_requests=self.abort_all_requests,
                                                session_id=self.session_id)


# ---- path checks (before anything changes) ----------------------------------------------------------


def check_source_dir(path: str, what: str) -> None:
    if not str(path).strip():
        raise APIError(400, f"{what} is empty", param=what)
    try:
        pth = Path(path).expanduser()
        if not pth.exists():
            raise APIError(400, f"{what} {shown(path)} does not exist", param=what)
        if not pth.is_dir():
            raise APIError(400, f"{what} {shown(path)} is not a directory", param=what)
        readable = os.access(pth, os.R_OK | os.X_OK)
    except OSError as exc:  # a name too long, a loop of links: the path is unusable
        raise APIError(400, f"{what} {shown(path)} is not a usable path: {exc.strerror}", param=what) from None
    if not readable:
        raise APIError(400, f"{what} {shown(path)} is not readable", param=what)


def check_dest_dir(path: str, what: str) -> None:
    if not str(path).strip():
        raise APIError(400, f"{what} is empty", param=what)
    try:
        pth = Path(path).expanduser()
        if pth.exists():
            if not pth.is_dir():
                raise APIError(400, f"{what} {shown(path)} exists and is not a directory", param=what)
            if not os.access(pth, os.W_OK | os.X_OK):
                raise APIError(400, f"{what} {shown(path)} is not writable", param=what)
            return
        parent = pth.absolute().parent
        while not parent.exists() and parent != parent.parent:
            parent = parent.parent
        writable = parent.is_dir() and os.access(parent, os.W_OK | os.X_OK)
    except OSError as exc:
        raise APIError(400, f"{what} {shown(path)} is not a usable path: {exc.strerror}", param=what) from None
    if not writable:
        raise APIError(400, f"{what} {shown(path)} cannot be created: {shown(str(parent))} is not a writable directory", param=what)


def _check_disk_update(req: p.UpdateWeightsFromDiskRequest) -> p.UpdateWeightsFromDiskRequest:
    check_source_dir(req.model_path, "model_path")
    return req


def _check_save(req: p.SaveShardedModelRequest) -> p.SaveShardedModelRequest:
    check_dest_dir(req.path, "path")
    return req


def _check_distributed(req: p.UpdateWeightsFromDistributedRequest) -> p.UpdateWeightsFromDistributedRequest:
    if not (len(req.names) == len(req.dtypes) == len(req.shapes)):
        raise APIError(400, f"names, dtypes and shapes differ in length ({len(req.names)}, {len(req.dtypes)}, {len(req.shapes)})")
    req.dtypes = [str(d).removeprefix("torch.") for d in req.dtypes]
    return req


def _check_release(req):
    if req.tags is not None and not all(isinstance(t, str) for t in req.tags):
        raise APIError(400, "tags must be a list of strings", param="tags")
    return req


# route -> (body type, builder from the validated body to the protocol request, HTTP methods, counts as a weight update)
WeightRoute = tuple[Any, Callable[[Any], Any], tuple[str, ...], bool]

ROUTES: dict[str, WeightRoute] = {
    "/update_weights_from_disk": (p.UpdateWeightsFromDiskRequest, _check_disk_update, ("POST",), True),
    "/init_weights_update_group": (p.InitWeightsUpdateGroupRequest, lambda r: r, ("POST",), False),
    "/destroy_weights_update_group": (p.DestroyWeightsUpdateGroupRequest, lambda r: r, ("POST",), False),
    "/update_weights_from_distributed": (p.UpdateWeightsFromDistributedRequest, _check_distributed, ("POST",), True),
    "/update_weights_from_tensor": (UpdateWeightsFromTensorBody, UpdateWeightsFromTensorBody.to_request, ("POST",), True),
    "/update_weights_from_ipc": (p.UpdateWeightsFromIPCRequest, lambda r: r, ("POST",), True),
    "/get_weights_by_name": (p.GetWeightsByNameRequest, lambda r: r, ("GET", "POST"), False),
    "/release_memory_occupation": (p.ReleaseMemoryOccupationRequest, _check_release, ("POST",), False),
    "/resume_memory_occupation": (p.ResumeMemoryOccupationRequest, _check_release, ("POST",), False),
    "/weights_checker": (p.CheckWeightsRequest, lambda r: r, ("POST",), False),
    "/pause_generation": (p.PauseGenerationRequest, lambda r: r, ("POST",), False),
    "/continue_generation": (p.ContinueGenerationRequest, lambda r: r, ("POST",), False),
    "/update_weight_version": (p.UpdateWeightVersionRequest, lambda r: r, ("POST",), False),
    "/post_process_weights": (p.PostProcessWeightsRequest, lambda r: r, ("POST",), False),
    "/save_sharded_model": (p.SaveShardedModelRequest, _check_save, ("POST",), False),
    "/save_remote_model": (p.SaveRemoteModelRequest, lambda r: r, ("POST",), False),
    "/begin_weight_update": (p.BeginWeightUpdateRequest, lambda r: r, ("POST",), False),
    "/end_weight_update": (p.EndWeightUpdateRequest, lambda r: r, ("POST",), True),
}


def _check_save_policy(state: ServerState, req: p.SaveShardedModelRequest) -> None:
    state.policy.check_save_path(req.path)


def _check_remote_policy(state: ServerState, req: p.SaveRemoteModelRequest) -> None:
    try:
        check_remote_url(req.url, state.policy.remote_model_stores)
    except HotswapError as exc:
        raise APIError(403, str(exc), param="url", type_="PermissionDeniedError") from None


# route -> what the server's access policy checks before the request reaches the engine
POLICY_CHECKS: dict[str, Callable[[ServerState, Any], None]] = {
    "/save_sharded_model": _check_save_policy,
    "/save_remote_model": _check_remote_policy,
}


def refusal(message: str, status: int, is_update: bool) -> JSONResponse:
    """A body refused before it reaches the engine, in the shape the engine's own refusal has (a weight
    update's carries SGLang's num_paused_requests, as every reply of its route does)."""
    out = p.WeightUpdateOutput(success=False, message=message) if is_update else p.ControlOutput(success=False, message=message)
    return JSONResponse(out.to_dict(), status_code=status)


def register(app: FastAPI, state: ServerState) -> None:
    for path, (body_type, build, methods, is_update) in ROUTES.items():
        app.add_api_route(path, _make_handler(state, path, body_type, build, is_update), methods=list(methods), name=path.strip("/"))


def _make_handler(state: ServerState, path: str, body_type, build, is_update: bool):
    async def handler(request: Request) -> JSONResponse:
        try:
            body = await parse_body(request, body_type, allow_query=True)
            if path in POLICY_CHECKS:  # before any other check: nothing is said about paths outside the policy
                POLICY_CHECKS[path](state, body)
            req = build(body)
        except APIError as exc:
            if is_update:
                state.metrics.observe_weight_update(path, False, 0.0)
            return refusal(exc.message, exc.status, is_update)
        start = time.perf_counter()
        try:
            out = await state.engine.asubmit(req)
        except ValueError as exc:  # the engine is shut down, or refused outright
            out = p.ControlOutput(success=False, message=str(exc))
        elapsed = time.perf_counter() - start
        if is_update:
            state.metrics.observe_weight_update(path, bool(out.success), elapsed)
        if path == "/get_weights_by_name" and out.success:  # SGLang's reply: the bare (truncated) parameter
            return JSONResponse(out.parameter)
        reply = out.to_dict() if hasattr(out, "to_dict") else {"success": bool(out.success), "message": str(out.message)}
        version = reply.get("weight_version")
        if isinstance(version, str) and version:
            state.last_weight_version = version
        if path in ("/pause_generation", "/continue_generation"):  # SGLang's reply: {"message", "status": "ok"}
            reply["status"] = "ok" if out.success else "error"
        if path == "/update_weight_version" and out.success:
            state.last_weight_version = req.new_version
            reply["new_version"] = req.new_version
        return JSONResponse(reply, status_code=200 if out.success else 400)

    handler.__name__ = "weights_" + path.strip("/")
    return handler
