"""ASGI middleware: access log + metrics (outermost), single headers, bearer token, body limit.

Plain ASGI rather than Starlette's BaseHTTPMiddleware: no extra task per request,
and the body limit can refuse a request before a byte of it is parsed.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cace_server.http.errors import ApiError
from cace_server.http.metrics import HttpMetrics

access_logger = logging.getLogger("cace_server.http.access")
logger = logging.getLogger("cace_server.http")

#: answered without a token: the probes of an orchestrator, which cannot send one from
#: a secret (``/readyz`` then leaves out the model names and error details)
OPEN_PATHS = frozenset({"/healthz", "/readyz"})


async def _send_error(scope: Scope, send: Send, error: ApiError) -> None:
    scope.setdefault("state", {})["error_kind"] = error.kind
    response = error.response()
    await response({"type": "http"}, _no_receive, send)


async def _no_receive() -> Message:  # pragma: no cover - responses never read
    return {"type": "http.disconnect"}


class InFlight:
    """What the POST routes hold: requests whose body has arrived and that are not
    answered yet (shutdown waits for them), and body bytes being received or
    processed (bounded by ``max_bytes``: parsing a body costs a multiple of its size)."""

    def __init__(self, max_bytes: int | None = None) -> None:
        self.count = 0
        self.bytes = 0
        self.max_bytes = max_bytes
        self._idle = asyncio.Event()
        self._idle.set()

    def enter(self) -> None:
        self.count += 1
        self._idle.clear()

    def leave(self) -> None:
        self.count -= 1
        if self.count == 0:
            self._idle.set()

    def reserve(self, n: int) -> bool:
        """Count ``n`` more body bytes in, unless that exceeds the budget (one request
        alone always fits: ``max_request_bytes`` bounds it)."""
        if self.max_bytes is not None and self.bytes and self.bytes + n > self.max_bytes:
            return False
        self.bytes += n
        return True

    def release(self, n: int) -> None:
        self.bytes -= n

    async def wait_idle(self, timeout: float) -> bool:
        """True once nothing is in flight; False if ``timeout`` came first."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except asyncio.TimeoutError:
            return False
        return True


class BodyLimit:
    """Refuse bodies over ``max_bytes`` (413) from Content-Length, or while streaming.

    The body is read here, bounded, and replayed to the app: whatever follows never
    sees more than the limit. Requests past this point are counted in ``in_flight``.
    """

    def __init__(self, app: ASGIApp, max_bytes: int, in_flight: InFlight) -> None:
        # ``in_flight.max_bytes`` bounds the bytes of all bodies together (503 above).
        self.app = app
        self.max_bytes = max_bytes
        self.in_flight = in_flight

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        too_large = ApiError(
            413,
            "body_too_large",
            f"request body larger than this server's limit of {self.max_bytes} bytes",
        )
        declared = 0
        for name, value in scope["headers"]:
            if name == b"content-length":
                if not value.isdigit():
                    await _send_error(
                        scope, send, ApiError(400, "bad_request", "bad Content-Length")
                    )
                    return
                if int(value) > self.max_bytes:
                    await _send_error(scope, send, too_large)
                    return
                declared = int(value)
        reserved = 0
        try:
            if not self.in_flight.reserve(declared):
                await _send_error(scope, send, self._busy())
                return
            reserved = declared
            chunks: list[bytes] = []
            size = 0
            while True:
                message = await receive()
                if message["type"] != "http.request":  # client went away (or timed out)
                    scope.setdefault("state", {})["error_kind"] = "client_disconnected"
                    return
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > self.max_bytes:
                    await _send_error(scope, send, too_large)
                    return
                if size > reserved:  # no (or a wrong) Content-Length: count as it comes
                    if not self.in_flight.reserve(size - reserved):
                        await _send_error(scope, send, self._busy())
                        return
                    reserved = size
                chunks.append(chunk)
                if not message.get("more_body", False):
                    break
            await self._forward(scope, b"".join(chunks), receive, send)
        finally:
            self.in_flight.release(reserved)

    def _busy(self) -> ApiError:
        return ApiError(
            503,
            "busy",
            f"the server holds {self.in_flight.bytes} bytes of request bodies (limit "
            f"{self.in_flight.max_bytes}); retry later",
            headers={"Retry-After": "1"},
        )

    async def _forward(self, scope: Scope, body: bytes, receive: Receive, send: Send) -> None:
        size = len(body)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        scope.setdefault("state", {})["body_bytes"] = size
        self.in_flight.enter()
        try:
            await self.app(scope, replay, send)
        finally:
            self.in_flight.leave()


#: Headers a request may carry once. Two values leave it to each hop which one counts
#: (a proxy may check the first, this server the last): the credentials, how the body
#: is parsed, and whose neighbour-list state the request touches. h11 already refuses
#: conflicting Content-Length.
SINGLE_HEADERS = {
    b"authorization": "Authorization",
    b"content-type": "Content-Type",
    b"x-cace-session": "X-CACE-Session",
}


class SingleHeaders:
    """Refuse (400) a request that repeats a header of :data:`SINGLE_HEADERS`."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            names = [name.lower() for name, _ in scope["headers"]]
            for header, shown in SINGLE_HEADERS.items():
                if names.count(header) > 1:
                    error = ApiError(
                        400,
                        "duplicate_header",
                        f"the request carries {names.count(header)} {shown} headers; send it once",
                        field=shown,
                    )
                    await _send_error(scope, send, error)
                    return
        await self.app(scope, receive, send)


class BearerAuth:
    """Require ``Authorization: Bearer <token>`` on every path but the open ones."""

    def __init__(self, app: ASGIApp, token: str) -> None:
        self.app = app
        self.token = token.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = b""
        for name, value in scope["headers"]:
            if name == b"authorization":
                scheme, _, credentials = value.partition(b" ")
                if scheme.lower() == b"bearer":
                    given = credentials.strip()
        authorized = bool(given) and hmac.compare_digest(given, self.token)
        if scope["path"] in OPEN_PATHS:
            scope.setdefault("state", {})["authorized"] = authorized
            await self.app(scope, receive, send)
            return
        if not authorized:
            error = ApiError(
                401,
                "unauthorized",
                "missing or wrong bearer token" if given else "this server requires a bearer token",
                headers={"WWW-Authenticate": 'Bearer realm="cace-server"'},
            )
            await _send_error(scope, send, error)
            return
        await self.app(scope, receive, send)


class Observe:
    """Counts every request by route and status, times it, logs one JSON line.

    Also the last line of defence: an exception that escapes the app is a bug; it is
    logged with its traceback and answered with a 500 in the API's error shape.
    """

    def __init__(self, app: ASGIApp, metrics: HttpMetrics, access_log: bool) -> None:
        self.app = app
        self.metrics = metrics
        self.access_log = access_log

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        request_id = uuid.uuid4().hex[:16]
        scope.setdefault("state", {})["request_id"] = request_id
        status = 500
        started = False
        error_kind: list[str] = []

        async def send_observed(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                started = True
                status = message["status"]
                headers = list(message.get("headers", []))
                headers.append((b"x-request-id", request_id.encode()))
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, receive, send_observed)
        except Exception as exc:
            logger.exception("unhandled error in %s %s", scope["method"], scope["path"])
            error_kind.append("internal_error")
            if not started:
                await _send_error(
                    scope,
                    send_observed,
                    ApiError(500, "internal_error", f"internal error: {type(exc).__name__}"),
                )
        finally:
            if not started and not error_kind:
                status = 499  # nginx's "client closed request": nothing was answered
            elapsed = time.perf_counter() - start
            route = scope.get("route")
            # unmatched paths share one label: label values must stay a bounded set
            label = getattr(route, "path", None) or "unmatched"
            method = scope["method"]
            self.metrics.requests.labels(label, method, str(status)).inc()
            self.metrics.latency.labels(label, method).observe(elapsed)
            kind = scope.get("state", {}).get("error_kind")
            if kind is None and error_kind:
                kind = error_kind[0]
            if kind is not None:
                self.metrics.errors.labels(kind).inc()
            if self.access_log and access_logger.isEnabledFor(logging.INFO):
                access_logger.info(json.dumps(self._record(scope, status, elapsed, request_id)))

    @staticmethod
    def _record(scope: Scope, status: int, elapsed: float, request_id: str) -> dict[str, Any]:
        client = scope.get("client")
        state = scope.get("state", {})
        return {
            "ts": round(time.time(), 3),
            "id": request_id,
            "method": scope["method"],
            "path": scope["path"],
            "status": status,
            "ms": round(elapsed * 1000, 3),
            "bytes_in": state.get("body_bytes", 0),
            "client": f"{client[0]}:{client[1]}" if client else None,
            "error": state.get("error_kind"),
            "structures": state.get("structures"),
            "atoms": state.get("atoms"),
        }
