"""Caps on request bodies (pure ASGI, so streaming replies pass through untouched): a body over the size
limit is refused with 413 before it is read into memory, whether it declares its length or streams it; a
body that has not fully arrived within the time limit (a client that trickles it, or stalls) is refused
with 408, so a slow sender cannot hold a connection and its handler forever."""

from __future__ import annotations

import asyncio

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from hotswap.server.http_utils import APIError, dumps, error_body

DEFAULT_MAX_BODY_BYTES = 32 << 20
DEFAULT_BODY_TIMEOUT_S = 60.0


def too_large(limit: int) -> APIError:
    return APIError(413, f"request body larger than {limit} bytes (the server's --max-body-bytes)", type_="RequestTooLargeError")


def too_slow(limit: float) -> APIError:
    return APIError(408, f"request body not received within {limit:g} s (the server's --body-timeout-s)", type_="RequestTimeoutError")


class BodyLimits:
    """`max_bytes`: the largest body (0: no limit); `timeout_s`: the whole body must arrive within this many
    seconds of the request's headers (0: no limit)."""

    def __init__(self, app: ASGIApp, max_bytes: int, timeout_s: float):
        self.app = app
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or (self.max_bytes <= 0 and self.timeout_s <= 0):
            await self.app(scope, receive, send)
            return
        limit = self.max_bytes
        for name, value in scope.get("headers", ()):
            if name == b"content-length" and limit > 0:
                try:
                    declared = int(value)
                except ValueError:
                    declared = 0
                if declared > limit:
                    body = dumps(error_body(too_large(limit)))
                    await send({"type": "http.response.start", "status": 413,
                                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                            (b"connection", b"close")]})
                    await send({"type": "http.response.body", "body": body})
                    return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout_s if self.timeout_s > 0 else None
        received = 0
        complete = False  # the body is in: later receives (a disconnect watcher) wait as long as they like

        async def limited() -> Message:
            nonlocal received, complete
            if complete or deadline is None:
                message = await receive()
            else:
                try:
                    message = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
                except asyncio.TimeoutError:
                    raise too_slow(self.timeout_s) from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if 0 < limit < received:  # a chunked body past the limit: the route's body read fails with 413
                    raise too_large(limit)
                complete = not message.get("more_body", False)
            else:
                complete = True
            return message

        await self.app(scope, limited, send)
