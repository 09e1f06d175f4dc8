"""uvicorn's HTTP protocol with a bound on request heads: uvicorn times out only a connection idle after a
response (keep-alive), and any byte cancels that. A client that connects and sends nothing, or trickles a
request head a byte at a time (slowloris), otherwise holds its connection, and a file descriptor, forever:
enough of them and the server accepts no one. Here every connection must deliver a complete request head
within `header_timeout_s` of connecting or of its last response; else it is closed (with a 408 when part
of a head had arrived). The body has its own bound (body_limit.py)."""

from __future__ import annotations

import asyncio

from hotswap.server.http_utils import APIError, dumps, error_body

DEFAULT_HEADER_TIMEOUT_S = 30.0


def _timeout_reply(limit: float) -> bytes:
    err = APIError(408, f"request head not received within {limit:g} s (the server's --header-timeout-s)", type_="RequestTimeoutError")
    body = dumps(error_body(err))
    return (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\ncontent-length: " + str(len(body)).encode()
            + b"\r\nconnection: close\r\n\r\n" + body)


def bounded_head_protocol(header_timeout_s: float = DEFAULT_HEADER_TIMEOUT_S) -> type[asyncio.Protocol]:
    """The protocol class for `uvicorn.Config(http=...)`: uvicorn's own choice (httptools when installed, else
    h11) with the head bound (0: none, uvicorn's class as is)."""
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    if header_timeout_s <= 0:
        return AutoHTTPProtocol

    class BoundedHeadProtocol(AutoHTTPProtocol):  # type: ignore[misc, valid-type]
        _head_timer: asyncio.TimerHandle | None = None
        _head_bytes = False  # a byte arrived since the timer was armed

        def _arm_head_timer(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
            self._head_bytes = False
            self._head_timer = self.loop.call_later(header_timeout_s, self._head_timed_out)

        def _head_timed_out(self) -> None:
            self._head_timer = None
            cycle = self.cycle
            if self.transport.is_closing() or (cycle is not None and not cycle.response_complete):
                return  # a request is being served: its body and reply have bounds of their own
            if self._head_bytes:
                self.transport.write(_timeout_reply(header_timeout_s))
            self.transport.close()

        def connection_made(self, transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm_head_timer()

        def data_received(self, data: bytes) -> None:
            self._head_bytes = True
            super().data_received(data)

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm_head_timer()

        def connection_lost(self, exc: Exception | None) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None
            super().connection_lost(exc)

    return BoundedHeadProtocol
