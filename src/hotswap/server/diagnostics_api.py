"""SGLang's diagnostics routes: `/start_profile`, `/stop_profile` (a torch.profiler trace of the engine's steps,
scheduler/profiler.py) and `/freeze_gc`. GET or POST as SGLang serves them; they reply in SGLang's plain text
when they succeed and with `{success, message}` and 400 when refused. They write to the host (traces) or
change the process (the collector), so a GET from a browser page is refused as on /flush_cache, and the
trace folder is confined: under the default profile folder or one of the server's `--save-root` folders."""

from __future__ import annotations

import gc
from typing import TYPE_CHECKING

from fastapi import FastAPI, Request
from fastapi.responses import PlainTextResponse

from hotswap import protocol as p
from hotswap.server.http_utils import APIError, JSONResponse, parse_body

if TYPE_CHECKING:
    from hotswap.server.app import ServerState


def refuse_browser_get(request: Request) -> None:
    """A GET that changes state is refused when a browser sent it (Origin or Sec-Fetch-Site): a link or an <img>
    on any page cannot trigger it. Frameworks' clients send neither."""
    if request.method == "GET" and (request.headers.get("origin") is not None
                                    or request.headers.get("sec-fetch-site", "").lower() in ("cross-site", "same-site")):
        raise APIError(403, f"GET {request.url.path} from a browser page is refused; POST it", type_="PermissionDeniedError")


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
        out = await engine.asubmit(p.FreezeGCRequest())
        gc.freeze()  # this process too, when the front end runs apart from the engine
        return _reply(out, "Garbage collection frozen.\n")
