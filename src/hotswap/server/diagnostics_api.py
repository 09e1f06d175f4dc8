"""SGLang's diagnostics routes: `/start_profile`, `/stop_profile` (a torch.profiler trace of the engine's steps,
scheduler/profiler.py) and `/freeze_gc`. GET or POST as SGLang serves them; they reply in SGLang's plain text
when they succeed and with `{success, message}` and 400 when refused. They write to the host (traces) or
change the process (the collector), so a GET from a browser page is refused as on /flush_cache, and the
trace folder is confined: under the default profile folder or one of the server's `--save-root` folders."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from fastapi import FastAPI, Request
from fastapi.responses import PlainTextResponse

from hotswap import protocol as p
from hotswap.server.access import refuse_browser_get
from hotswap.server.http_utils import JSONResponse, parse_body

if TYPE_CHECKING:
    from hotswap.server.app import ServerState


def _reply(out: p.ControlOutput, text: str):
    if out.success:
        return PlainTextResponse(text)
    return JSONResponse(out.to_dict(), status_code=400)


def register(app: FastAPI, state: ServerState) -> None:
    engine = state.engine

    @app.api_route("/start_profile", methods=["GET", "POST"])
    async def start_profile(request: Request):
        refuse_browser_get(request)
        req = await parse_body(request, p.StartProfileRequest)
        if req.output_dir is not None:
            state.policy.check_profile_dir(req.output_dir)
        return _reply(await engine.asubmit(req), "Start profiling.\n")

    @app.api_route("/stop_profile", methods=["GET", "POST"])
    async def stop_profile(request: Request):
        refuse_browser_get(request)
        return _reply(await engine.asubmit(p.StopProfileRequest()), "Stop profiling. This will take some time.\n")

    @app.api_route("/freeze_gc", methods=["GET", "POST"])
    async def freeze_gc(request: Request):
        refuse_browser_get(request)
        return _reply(await asyncio.to_thread(engine.freeze_gc), "Garbage collection frozen.\n")  # both processes
