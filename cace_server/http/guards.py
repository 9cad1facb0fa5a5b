"""ASGI guards against ambiguous message framing and requests a web browser could send.

- :class:`Framing`: a request with both ``Content-Length`` and ``Transfer-Encoding``,
  with a transfer coding other than one ``chunked``, with several ``Content-Length``
  headers, or with ``Transfer-Encoding`` in HTTP/1.0 is refused with 400 and the
  connection closed (RFC 9112 6.1, 6.3). Two hops that read such a body's length
  differently (a proxy by ``Content-Length``, this server by the chunks) disagree on
  where the next request starts: what one sees as body, the other answers as a
  request ("request smuggling"). h11 itself lets ``Transfer-Encoding`` win silently.
- :class:`BrowserGuard`: a web page the user opens can make the browser send requests
  to this server (on loopback, by default without a token). It can send a "simple"
  cross-origin POST without a CORS preflight (no ``Content-Type``, or ``text/plain``,
  ``application/x-www-form-urlencoded``, ``multipart/form-data``): those get 415. It
  can rebind its own DNS name to 127.0.0.1, so its requests carry a foreign ``Host``:
  400 unless the name is allowed (``--allowed-hosts``). And a state-changing request
  whose ``Origin`` names a host not allowed gets 403.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from starlette.types import ASGIApp, Receive, Scope, Send

from cace_server.http.codec import media_type
from cace_server.http.errors import ApiError
from cace_server.http.middleware import _send_error
from cace_server.http.settings import host_name

#: the media types a browser sends cross-origin without a preflight (CORS "simple")
SIMPLE_TYPES = frozenset({"text/plain", "application/x-www-form-urlencoded", "multipart/form-data"})
#: methods that only read
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


class Framing:
    """Refuse (400, connection closed) a request whose body length is ambiguous."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            problem = self.problem(scope)
            if problem is not None:
                error = ApiError(400, "bad_framing", problem, headers={"Connection": "close"})
                await _send_error(scope, send, error)
                return
        await self.app(scope, receive, send)

    @staticmethod
    def problem(scope: Scope) -> str | None:
        lengths = 0
        codings: list[bytes] = []
        for name, value in scope["headers"]:
            name = name.lower()
            if name == b"content-length":
                lengths += 1
            elif name == b"transfer-encoding":
                codings += [c.strip().lower() for c in value.split(b",")]
        if codings and lengths:
            return "the request carries both Content-Length and Transfer-Encoding"
        if lengths > 1:
            return "the request carries several Content-Length headers"
        if codings and codings != [b"chunked"]:
            return "the only transfer coding accepted is one 'chunked'"
        if codings and scope.get("http_version") == "1.0":
            return "Transfer-Encoding in an HTTP/1.0 request"
        return None


class BrowserGuard:
    """Refuse what a web page could make a browser send: a foreign ``Host`` (400) or
    ``Origin`` (403) and a POST body of no or a "simple" ``Content-Type`` (415).

    ``hosts``: the allowed host names (:attr:`HttpSettings.host_names`); None allows
    any ``Host`` and ``Origin``.
    """

    def __init__(self, app: ASGIApp, hosts: frozenset[str] | None) -> None:
        self.app = app
        self.hosts = hosts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            error = self.check(scope)
            if error is not None:
                await _send_error(scope, send, error)
                return
        await self.app(scope, receive, send)

    def check(self, scope: Scope) -> ApiError | None:
        headers: dict[bytes, bytes] = {}
        has_body = False
        for name, value in scope["headers"]:
            name = name.lower()
            headers.setdefault(name, value)
            if name == b"transfer-encoding" or (name == b"content-length" and value.strip(b"0")):
                has_body = True
        method = scope["method"]
        if self.hosts is not None:
            host = headers.get(b"host")
            if host is not None and host_name(host.decode("latin-1")) not in self.hosts:
                return ApiError(
                    400,
                    "host_not_allowed",
                    f"Host {host.decode('latin-1')!r} is not one of this server's names; "
                    "add it to --allowed-hosts (CACE_SERVER_ALLOWED_HOSTS)",
                    field="Host",
                )
            origin = headers.get(b"origin")
            if origin is not None and method not in SAFE_METHODS:
                try:
                    origin_host = urlsplit(origin.decode("latin-1")).hostname
                except ValueError:
                    origin_host = None
                if origin_host is None or host_name(origin_host) not in self.hosts:
                    return ApiError(
                        403,
                        "origin_not_allowed",
                        f"requests from the web origin {origin.decode('latin-1')!r} are not "
                        "allowed; add its host to --allowed-hosts (CACE_SERVER_ALLOWED_HOSTS)",
                        field="Origin",
                    )
        if method == "POST" and has_body:
            kind = media_type(headers.get(b"content-type", b"").decode("latin-1"))
            if not kind or kind in SIMPLE_TYPES:
                shown = f"Content-Type {kind!r}" if kind else "no Content-Type"
                return ApiError(
                    415,
                    "unsupported_media_type",
                    f"a request body with {shown} is refused (a web page could send it "
                    "cross-site); send Content-Type: application/json or application/msgpack",
                    field="Content-Type",
                )
        return None
