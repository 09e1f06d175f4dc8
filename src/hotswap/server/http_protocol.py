"""uvicorn's HTTP protocol with bounds on the two waits uvicorn leaves open, either of which lets a client
hold its connection, a file descriptor and what it was sent, forever (enough of them and the server accepts
no one):
- the request head: uvicorn times out only a connection idle after a response (keep-alive), and any byte
  cancels that, so a client that connects and sends nothing, or trickles a head a byte at a time
  (slowloris), was never dropped. Here a complete head must arrive within `header_timeout_s` of connecting
  or of the last response; else the connection is closed (with a 408 when part of a head had arrived).
- a reader that stops reading: a reply (an SSE stream, a large JSON body) then waits on flow control
  forever. Here a connection whose unsent bytes stay above the transport's high-water mark for
  `send_timeout_s` is aborted; its stream sees the disconnect and aborts its engine requests.
The body has its own bound (body_limit.py)."""

from __future__ import annotations

import asyncio
import logging

from hotswap.server.http_utils import APIError, dumps, error_body

log = logging.getLogger("hotswap.server")

DEFAULT_HEADER_TIMEOUT_S = 30.0
DEFAULT_SEND_TIMEOUT_S = 60.0


def _timeout_reply(limit: float) -> bytes:
    err = APIError(408, f"request head not received within {limit:g} s (the server's --header-timeout-s)", type_="RequestTimeoutError")
    body = dumps(error_body(err))
    return (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\ncontent-length: " + str(len(body)).encode()
            + b"\r\nconnection: close\r\n\r\n" + body)


def bounded_protocol(header_timeout_s: float = DEFAULT_HEADER_TIMEOUT_S, send_timeout_s: float = DEFAULT_SEND_TIMEOUT_S
                     ) -> type[asyncio.Protocol]:
    """The protocol class for `uvicorn.Config(http=...)`: uvicorn's own choice (httptools when installed, else
    h11) with both bounds (0: that bound off)."""
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    class BoundedProtocol(AutoHTTPProtocol):  # type: ignore[misc, valid-type]
        _head_timer: asyncio.TimerHandle | None = None
        _head_bytes = False  # a byte arrived since the timer was armed
        _send_timer: asyncio.TimerHandle | None = None

        def _arm_head_timer(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
            self._head_bytes = False
            if header_timeout_s > 0:
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

        def pause_writing(self) -> None:  # the transport holds more unsent bytes than its high-water mark
            super().pause_writing()
            if send_timeout_s > 0 and self._send_timer is None:
                self._send_timer = self.loop.call_later(send_timeout_s, self._send_timed_out)

        def resume_writing(self) -> None:
            super().resume_writing()
            if self._send_timer is not None:
                self._send_timer.cancel()
                self._send_timer = None

        def _send_timed_out(self) -> None:
            self._send_timer = None
            log.warning("%s took none of its reply for %g s (--send-timeout-s): disconnected", _peer(self.client), send_timeout_s)
            self.transport.abort()  # close() would wait for the unread bytes to drain

        def connection_lost(self, exc: Exception | None) -> None:
            for timer in (self._head_timer, self._send_timer):
                if timer is not None:
                    timer.cancel()
            self._head_timer = self._send_timer = None
            super().connection_lost(exc)

    return BoundedProtocol


def _peer(client: tuple[str, int] | None) -> str:
    return f"client {client[0]}:{client[1]}" if client else "a client"
