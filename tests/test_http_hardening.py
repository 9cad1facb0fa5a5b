"""Hardening of the HTTP front against smuggling, web pages and slow bodies (issue 29).

- A request whose body length two hops could read differently (``Content-Length``
  and ``Transfer-Encoding``, in either order and any case) gets 400 and its
  connection is closed: the request smuggled behind it is never answered.
- What a web page could make a browser send is refused: a POST body without (or with
  a "simple") ``Content-Type`` (415), a foreign ``Host`` (400, DNS rebinding) and a
  state-changing request from a foreign ``Origin`` (403); a token-less server does
  not show the model file's path.
- Two connections that declare large bodies and trickle them are dropped within the
  body timeout, and a normal client is served, not turned away as ``busy``.

Real uvicorn on 127.0.0.1 (the h11 protocol ``cace-server serve`` uses), raw sockets
where a well-behaved client could not send the request; every server is stopped.
"""

from __future__ import annotations

import contextlib
import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from cace_server.engine import Engine
from cace_server.http import BackgroundServer, HttpSettings, create_app
from cace_server.http.timeouts import timed_protocol
from cace_server.model import random_model, save_model

WATER = {
    "symbols": ["O", "H", "H"],
    "positions": [[0.0, 0.0, 0.0], [0.96, 0.0, 0.0], [-0.24, 0.93, 0.0]],
}
JSON = {"content-type": "application/json"}


@pytest.fixture(scope="module")
def model_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("http-hardening") / "tiny.safetensors"
    return save_model(random_model((1, 8), seed=3), path)


@pytest.fixture(scope="module")
def engine(model_file: Path) -> Iterator[Engine]:
    with Engine(model_file) as e:
        yield e


@pytest.fixture(scope="module", params=["h11", "timed"])
def server(request: pytest.FixtureRequest, engine: Engine) -> Iterator[BackgroundServer]:
    """uvicorn's h11 protocol, and ours with the read deadlines (``cace-server serve``)."""
    options = {} if request.param == "h11" else {"http": timed_protocol(10.0, 30.0)}
    with BackgroundServer(create_app(engine), **options) as srv:
        yield srv


def exchange(port: int, data: bytes, timeout: float = 10.0) -> bytes:
    """Send ``data`` on a new connection; everything the server answers until it closes.

    Fails if the connection is still open after ``timeout``."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        received = b""
        deadline = time.monotonic() + timeout
        while True:
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                return received
            except TimeoutError:
                raise AssertionError(f"the connection stayed open; received {received!r}") from None
            if not chunk:
                return received
            received += chunk


# ------------------------------------------------------------------------ smuggling

SMUGGLED = b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
CHUNKED = b"0\r\n\r\n" + SMUGGLED  # an empty chunked body, then the smuggled request


def post(*headers: bytes, body: bytes = CHUNKED) -> bytes:
    head = [b"POST /v1/calculate HTTP/1.1", b"Host: 127.0.0.1", b"Content-Type: application/json"]
    return b"\r\n".join([*head, *headers]) + b"\r\n\r\n" + body


FRAMINGS = {
    # a proxy that reads Content-Length forwards it all as one body; h11 read the
    # chunks and answered the rest as a second request
    "CL.TE": post(b"Content-Length: %d" % len(CHUNKED), b"Transfer-Encoding: chunked"),
    # a proxy that reads the chunks sees one request; a back end that reads
    # Content-Length (3 bytes) another
    "TE.CL": post(b"Transfer-Encoding: chunked", b"Content-Length: 3"),
    "te.cl case": post(b"transfer-encoding: CHUNKED", b"CONTENT-LENGTH: 3"),
    "conflicting CL": post(b"Content-Length: 3", b"Content-Length: %d" % len(CHUNKED)),
    "TE not chunked": post(b"Transfer-Encoding: gzip, chunked", b"Content-Length: 3"),
    "TE twice": post(b"Transfer-Encoding: chunked", b"Transfer-Encoding: chunked"),
}


@pytest.mark.parametrize("framing", list(FRAMINGS))
def test_ambiguous_framing_is_refused_and_the_connection_closed(
    server: BackgroundServer, framing: str
) -> None:
    received = exchange(server.port, FRAMINGS[framing])
    assert received.startswith(b"HTTP/1.1 400 "), received
    if framing in ("CL.TE", "TE.CL", "te.cl case"):  # ours; h11 refuses the others itself
        assert b'"bad_framing"' in received, received
    # the smuggled request got no answer: one response, then the server closed
    assert received.count(b"HTTP/1.1 ") == 1, received
    assert b'"models"' not in received
    # the server stays up, and a plain chunked body is fine
    body = json.dumps(WATER).encode()
    chunked = post(b"Transfer-Encoding: chunked", body=b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body))
    reply = exchange(server.port, chunked.replace(b"HTTP/1.1", b"HTTP/1.1\r\nConnection: close", 1))
    assert reply.startswith(b"HTTP/1.1 200 "), reply


# ------------------------------------------------------------------------ browser reach


@pytest.mark.parametrize(
    "content_type",
    [None, "text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"],
)
def test_a_post_body_a_browser_sends_cross_site_is_415(
    server: BackgroundServer, content_type: str | None
) -> None:
    headers = {} if content_type is None else {"content-type": content_type}
    r = httpx.post(
        server.url + "/v1/calculate", content=json.dumps(WATER), headers=headers, timeout=30
    )
    assert r.status_code == 415, r.text
    assert (r.json()["error"], r.json()["field"]) == ("unsupported_media_type", "Content-Type")
    r = httpx.post(server.url + "/v1/calculate", content=json.dumps(WATER), headers=JSON)
    assert r.status_code == 200, r.text


def test_a_foreign_host_or_origin_is_refused(server: BackgroundServer) -> None:
    with httpx.Client(base_url=server.url, timeout=30) as c:
        # DNS rebinding: the page's own name, now resolving to 127.0.0.1
        for path in ("/healthz", "/v1/models"):
            r = c.get(path, headers={"Host": "attacker.example"})
            assert r.status_code == 400, r.text
            assert r.json()["error"] == "host_not_allowed"
        r = c.post("/v1/calculate", json=WATER, headers={"Host": "attacker.example:8000"})
        assert r.status_code == 400 and r.json()["field"] == "Host", r.text
        for host in ("localhost", f"localhost:{server.port}", "127.0.0.1", "[::1]:80"):
            assert c.get("/healthz", headers={"Host": host}).status_code == 200, host
        # a state-changing request from a foreign web origin
        for origin in ("http://attacker.example", "null", "http://127.0.0.1.attacker.example"):
            r = c.post("/v1/calculate", json=WATER, headers={"Origin": origin})
            assert r.status_code == 403, (origin, r.text)
            assert r.json()["error"] == "origin_not_allowed"
        r = c.post("/v1/calculate", json=WATER, headers={"Origin": "http://localhost:3000"})
        assert r.status_code == 200, r.text
        # reading is not refused (the browser keeps a cross-origin reply from the page)
        assert c.get("/healthz", headers={"Origin": "http://attacker.example"}).status_code == 200


def test_allowed_hosts_names_the_hosts_and_star_allows_any(engine: Engine) -> None:
    named = HttpSettings(allowed_hosts=("cace-server", "Svc.Example."))
    with (
        BackgroundServer(create_app(engine, settings=named)) as srv,
        httpx.Client(base_url=srv.url, timeout=30) as c,
    ):
        hosts = {"cace-server:8000": 200, "svc.example": 200, "127.0.0.1": 400, "evil.example": 400}
        for host, status in hosts.items():
            assert c.get("/healthz", headers={"Host": host}).status_code == status, host
        r = c.post(
            "/v1/calculate",
            json=WATER,
            headers={"Host": "cace-server", "Origin": "https://cace-server"},
        )
        assert r.status_code == 200, r.text
    bound = HttpSettings(host="127.0.0.1", allowed_hosts=None)
    assert bound.host_names == {"localhost", "127.0.0.1", "::1"}
    assert HttpSettings(host="10.1.2.3").host_names == {"localhost", "127.0.0.1", "::1", "10.1.2.3"}
    anyone = HttpSettings(allowed_hosts=("*",))
    with BackgroundServer(create_app(engine, settings=anyone)) as srv:
        r = httpx.post(
            srv.url + "/v1/calculate",
            json=WATER,
            headers={"Host": "attacker.example", "Origin": "http://attacker.example"},
            timeout=30,
        )
        assert r.status_code == 200, r.text


def test_the_model_path_is_shown_only_behind_a_token(engine: Engine, model_file: Path) -> None:
    with BackgroundServer(create_app(engine)) as srv:
        (model,) = httpx.get(srv.url + "/v1/models", timeout=30).json()["models"]
    assert model["source"] == model_file.name
    assert str(model_file.parent) not in json.dumps(model)
    with BackgroundServer(create_app(engine, settings=HttpSettings(token="s3cret"))) as srv:
        auth = {"Authorization": "Bearer s3cret"}
        (model,) = httpx.get(srv.url + "/v1/models", headers=auth, timeout=30).json()["models"]
    assert model["source"] == str(model_file)


# ------------------------------------------------------------------------ slow bodies


def test_trickled_bodies_are_dropped_in_time_and_others_are_served(engine: Engine) -> None:
    """Two clients declare 1000-byte bodies (the whole --max-pending-bytes) and send a
    byte every 0.3 s, well within the idle limit: dropped after the body timeout."""
    settings = HttpSettings(max_request_bytes=1000, max_pending_bytes=2000)
    app = create_app(engine, settings=settings)
    protocol = timed_protocol(10.0, 2.0)
    with BackgroundServer(app, http=protocol) as srv, httpx.Client(base_url=srv.url) as c:
        tricklers = []
        for _ in range(2):
            sock = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
            sock.sendall(post(b"Content-Length: 1000", body=b"{"))
            tricklers.append(sock)
        started = time.monotonic()
        while app.state.in_flight.bytes < 2000:  # both heads read, 2000 bytes reserved
            assert time.monotonic() - started < 5
            time.sleep(0.01)
        r = c.post("/v1/calculate", json=WATER, timeout=30)
        assert r.status_code == 503 and r.json()["error"] == "busy", r.text
        served_after = None
        while time.monotonic() - started < 8:
            for sock in tricklers:
                with contextlib.suppress(OSError):  # dropped
                    sock.sendall(b" ")
            r = c.post("/v1/calculate", json=WATER, timeout=30)
            if r.status_code == 200:
                served_after = time.monotonic() - started
                break
            assert r.status_code == 503, r.text
            time.sleep(0.3)
        assert served_after is not None, "the trickling clients kept the server busy"
        assert served_after < 2.0 + 2.0, served_after
        for sock in tricklers:
            sock.settimeout(5)
            try:
                answer = sock.recv(65536)
            except ConnectionResetError:
                answer = b""
            assert answer == b"" or answer.startswith(b"HTTP/1.1 408 "), answer
            sock.close()


def test_a_body_that_keeps_its_rate_may_take_longer_than_the_body_timeout(
    engine: Engine,
) -> None:
    """3000 bytes at 1000 bytes/s over a 1 s body timeout and a 500 bytes/s minimum."""
    app = create_app(engine)
    body = json.dumps(WATER).encode().ljust(3000)
    with (
        BackgroundServer(app, http=timed_protocol(10.0, 1.0, 500.0)) as srv,
        socket.create_connection(("127.0.0.1", srv.port), timeout=30) as sock,
    ):
        sock.sendall(post(b"Content-Length: 3000", b"Connection: close", body=b""))
        t0 = time.monotonic()
        for k in range(0, len(body), 100):
            sock.sendall(body[k : k + 100])
            time.sleep(0.1)
        assert time.monotonic() - t0 > 2.5
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    assert received.startswith(b"HTTP/1.1 200 "), received
