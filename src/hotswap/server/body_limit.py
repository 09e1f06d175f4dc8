"""A cap on request body size (pure ASGI, so streaming replies pass through untouched): a body over the
limit is refused with 413 before it is read into memory, whether it declares its length or streams it."""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from hotswap.server.http_utils import APIError, dumps, error_body

DEFAULT_MAX_BODY_BYTES = 32 << 20


def too_large(limit: int) -> APIError:
    return APIError(413, f"request body larger than {limit} bytes (the server's --max-body-bytes)", type_="RequestTooLargeError")


class BodySizeLimit:
    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self.max_bytes <= 0:
            await self.app(scope, receive, send)
            return
        limit = self.max_bytes
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
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
        received = 0

        async def limited() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:  # a chunked body past the limit: the route's body read fails with 413
                    raise too_large(limit)
            return message

        await self.app(scope, limited, send)
