"""uvicorn's h11 protocol with read timeouts: a slow or stalled client is dropped.

uvicorn times out idle keep-alive connections only. A client that opens a
connection and sends nothing, or half a request head, or half a body, holds the
connection (and, at shutdown, the whole process) for as long as it likes. This
protocol adds two deadlines per request:

- the request head (request line and headers) must be complete within
  ``header_timeout_s`` of its first byte, or of the connection opening (a
  deadline, not an idle timer: dripping one header byte at a time does not reset it);
- while a body is being received, at most ``body_timeout_s`` may pass without a
  byte of it, and the whole body must be in within ``body_timeout_s`` of the head
  plus one second per ``min_body_bytes_per_s`` bytes received: a large body over a
  slow link is fine as long as it keeps coming at that average rate, and a client
  that declares a large body and sends a byte now and then (holding its share of
  ``--max-pending-bytes`` from every other client) is dropped after
  ``body_timeout_s``. Time during which the server itself stopped reading (flow
  control, the application not consuming) does not count.

A client that misses a deadline gets ``408 Request Timeout`` when nothing was
answered yet, and the connection is closed.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

logger = logging.getLogger("cace_server.http")

_REQUEST_TIMEOUT = (
    b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain; charset=utf-8\r\n"
    b"content-length: 16\r\nconnection: close\r\n\r\nrequest timeout\n"
)


class TimedH11Protocol(H11Protocol):
    """uvicorn's ``H11Protocol`` plus the head and body read deadlines above.

    Subclass with the two class attributes set (:func:`timed_protocol`): uvicorn
    builds one protocol object per connection from the class it is given.
    """

    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    min_body_bytes_per_s: float = 1024.0 * 1024.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._read_timer: asyncio.TimerHandle | None = None
        self._body_deadline = 0.0  # loop time by which the body being received must be in
        self._timer_kind: str | None = None  # "head" or "body"
        self._answered = False  # a response was completed on this connection

    # -- uvicorn's hooks --------------------------------------------------------------------
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm("head", self.header_timeout_s)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._update_timer(got_data=True, size=len(data))

    def on_response_complete(self) -> None:
        self._answered = True
        super().on_response_complete()
        self._update_timer(got_data=False)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    # -- the deadlines ----------------------------------------------------------------------
    def _update_timer(self, got_data: bool, size: int = 0) -> None:
        if self.transport.is_closing():
            self._disarm()
            return
        state = self.conn.their_state
        if state is h11.SEND_BODY:  # the client is sending a body (answered or not)
            now = self.loop.time()
            if self._timer_kind != "body":  # the body starts
                self._body_deadline = now + self.body_timeout_s
            elif got_data:
                self._body_deadline += size / self.min_body_bytes_per_s
            if got_data or self._timer_kind != "body":
                idle = now + self.body_timeout_s
                self._arm("body", min(idle, self._body_deadline) - now)
        elif state is h11.IDLE and self.conn.trailing_data[0]:
            # Part of a next request head is buffered: it has a deadline (not reset).
            if self._timer_kind != "head":
                self._arm("head", self.header_timeout_s)
        elif state is h11.IDLE and not self._answered and self._timer_kind == "head":
            pass  # nothing parsed yet on a new connection: its first deadline runs
        else:
            # Idle between requests (uvicorn's keep-alive timer), or the request is
            # in and the application is working on it: not the client's time.
            self._disarm()

    def _arm(self, kind: str, seconds: float) -> None:
        self._disarm()
        self._timer_kind = kind
        self._read_timer = self.loop.call_later(seconds, self._expired)

    def _disarm(self) -> None:
        if self._read_timer is not None:
            self._read_timer.cancel()
        self._read_timer = None
        self._timer_kind = None

    def _expired(self) -> None:
        kind = self._timer_kind
        self._read_timer = None
        self._timer_kind = None
        if self.transport.is_closing():
            return
        if kind == "body" and self.flow.read_paused:
            # We stopped reading, not the client: look again later.
            self._body_deadline = self.loop.time() + self.body_timeout_s
            self._arm("body", self.body_timeout_s)
            return
        client = f"{self.client[0]}:{self.client[1]}" if self.client else "a client"
        if kind == "head":
            what = f"request head not complete after {self.header_timeout_s:g} s"
            answer = bool(self.conn.trailing_data[0]) and self.conn.our_state is h11.IDLE
        else:
            if self.loop.time() + 1e-3 < self._body_deadline:
                what = f"no request body data for {self.body_timeout_s:g} s"
            else:
                what = (
                    f"request body slower than {self.min_body_bytes_per_s:g} bytes/s "
                    f"after {self.body_timeout_s:g} s"
                )
            answer = self.cycle is not None and not self.cycle.response_started
        logger.info("closing the connection of %s: %s", client, what)
        if answer:
            self.transport.write(_REQUEST_TIMEOUT)
        if self.cycle is not None and not self.cycle.response_complete:
            # The application (waiting for the rest of the body) sees a disconnect.
            self.cycle.disconnected = True
            self.cycle.message_event.set()
        self.transport.close()


def timed_protocol(
    header_timeout_s: float,
    body_timeout_s: float,
    min_body_bytes_per_s: float = TimedH11Protocol.min_body_bytes_per_s,
) -> type[TimedH11Protocol]:
    """A protocol class for ``uvicorn.Config(http=...)`` with these read timeouts."""
    limits = {
        "header_timeout_s": float(header_timeout_s),
        "body_timeout_s": float(body_timeout_s),
        "min_body_bytes_per_s": float(min_body_bytes_per_s),
    }
    for name, value in limits.items():
        if not value > 0:
            raise ValueError(f"{name} must be positive, got {value}")
    return type("TimedH11Protocol", (TimedH11Protocol,), limits)
