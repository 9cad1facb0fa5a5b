"""What a local attacker or a hostile client tries against the HTTP API.

- ``POST /v1/ipi/connections`` with a path whose symlink (or a directory on the way)
  is swapped, in another process, between an allowed socket and a private one while
  the server checks and connects: no connection may ever reach the private socket.
- Every 429 and 503 reply says when to retry (``Retry-After``).
- A request that repeats a security header (two ``Authorization``) is refused.

Real uvicorn on 127.0.0.1, UNIX sockets in the tests' own temporary directories;
every server, listener and process a test starts, it stops.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from cace_server.engine import Engine, EngineSettings
from cace_server.engine import errors as engine_errors
from cace_server.engine.faults import ENV_VAR
from cace_server.http import BackgroundServer, HttpSettings, create_app
from cace_server.http.errors import ApiError, from_engine_error
from cace_server.model import random_model, save_model
from tests.ipi_support import CountingListener

WATER = {
    "symbols": ["O", "H", "H"],
    "positions": [[0.0, 0.0, 0.0], [0.96, 0.0, 0.0], [-0.24, 0.93, 0.0]],
}


@pytest.fixture(scope="module")
def model_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("http-security") / "tiny.safetensors"
    return save_model(random_model((1, 8), seed=3), path)


@pytest.fixture(scope="module")
def engine(model_file: Path) -> Iterator[Engine]:
    with Engine(model_file) as e:
        yield e


@pytest.fixture
def dirs() -> Iterator[tuple[str, str]]:
    """An allowed socket directory and a private one beside it (sun_path is short)."""
    allowed = tempfile.mkdtemp(prefix="ipi-allowed-", dir="/tmp")
    private = tempfile.mkdtemp(prefix="private-", dir="/tmp")
    try:
        yield allowed, private
    finally:
        shutil.rmtree(allowed, ignore_errors=True)
        shutil.rmtree(private, ignore_errors=True)


# Runs in its own process (no GIL shared with the server): flips the path between the
# allowed and the private target as fast as rename allows, for at most ``seconds``.
_SWAPPER = r"""
import os, sys, time
mode, allowed, private, seconds = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
end = time.monotonic() + seconds
if mode == "leaf":  # allowed/link -> allowed/s or private/s, replaced atomically
    os.symlink(allowed + "/s", allowed + "/link")
    while time.monotonic() < end:
        os.symlink(private + "/s", allowed + "/tmp")
        os.rename(allowed + "/tmp", allowed + "/link")
        os.symlink(allowed + "/s", allowed + "/tmp")
        os.rename(allowed + "/tmp", allowed + "/link")
else:  # allowed/d is the real directory of allowed/d/s, or a symlink to private/
    while time.monotonic() < end:
        os.rename(allowed + "/d", allowed + "/d_real")
        os.symlink(private, allowed + "/d")
        os.unlink(allowed + "/d")
        os.rename(allowed + "/d_real", allowed + "/d")
"""


@pytest.mark.parametrize("mode", ["leaf", "directory"])
def test_a_swapped_symlink_never_reaches_a_private_socket(
    engine: Engine, dirs: tuple[str, str], mode: str
) -> None:
    allowed, private = dirs
    if mode == "leaf":
        ok = CountingListener.unix(f"{allowed}/s")
        address = f"unix:{allowed}/link"
    else:
        os.mkdir(f"{allowed}/d")
        ok = CountingListener.unix(f"{allowed}/d/s")
        address = f"unix:{allowed}/d/s"
    secret = CountingListener.unix(f"{private}/s")
    settings = HttpSettings(
        allow_ipi_control=True,
        ipi_socket_prefix=allowed + "/",
        ipi_connects_per_s=1000.0,
        max_ipi_groups=64,
    )
    seconds = 6.0
    swapper = subprocess.Popen(
        [sys.executable, "-c", _SWAPPER, mode, allowed, private, str(seconds)]
    )
    outcomes: dict[str, int] = {}
    try:
        with (
            BackgroundServer(create_app(engine, settings=settings)) as srv,
            httpx.Client(base_url=srv.url, timeout=30) as c,
        ):
            body = {
                "address": address,
                "numbers": [8, 1, 1],
                "clients": 4,
                "reconnect": False,
                "connect_timeout": 0.3,
            }
            time.sleep(0.2)  # the swapper has made its links
            end = time.monotonic() + seconds - 1.0
            while time.monotonic() < end:
                r = c.post("/v1/ipi/connections", json=body)
                assert r.status_code in (201, 403), r.text
                if r.status_code == 403:
                    outcomes["refused at attach"] = outcomes.get("refused at attach", 0) + 1
                    continue
                group = r.json()["id"]
                deadline = time.monotonic() + 10
                while (g := c.get(f"/v1/ipi/connections/{group}").json())["state"] != "closed":
                    assert time.monotonic() < deadline, g
                    time.sleep(0.005)
                for conn in g["connections"]:
                    error = conn["last_error"] or ""
                    kind = "not allowed" if "not allowed" in error else "served or gone"
                    outcomes[kind] = outcomes.get(kind, 0) + 1
                assert c.delete(f"/v1/ipi/connections/{group}").status_code == 200
            assert c.get("/healthz").status_code == 200
    finally:
        swapper.kill()
        swapper.wait(10)
        ok.close()
        secret.close()
    assert secret.accepted == 0, (secret.accepted, ok.accepted, outcomes)
    # the race was run: connections reached the allowed socket, and swaps were refused
    assert ok.accepted > 0, outcomes
    assert outcomes.get("not allowed", 0) + outcomes.get("refused at attach", 0) > 0, outcomes


def test_a_hard_link_into_the_allowed_prefix_is_refused(
    engine: Engine, dirs: tuple[str, str]
) -> None:
    allowed, private = dirs
    secret = CountingListener.unix(f"{private}/s")
    os.link(f"{private}/s", f"{allowed}/alias")  # /tmp is one file system
    settings = HttpSettings(allow_ipi_control=True, ipi_socket_prefix=allowed + "/")
    try:
        with (
            BackgroundServer(create_app(engine, settings=settings)) as srv,
            httpx.Client(base_url=srv.url, timeout=30) as c,
        ):
            body = {"address": f"unix:{allowed}/alias", "numbers": [8, 1, 1]}
            r = c.post("/v1/ipi/connections", json=body)
            assert r.status_code == 403, r.text
            assert "2 hard links" in r.json()["message"]
    finally:
        secret.close()
    assert secret.accepted == 0


# ------------------------------------------------------------------------ Retry-After


def assert_retry_after(r: httpx.Response, status: int, kind: str, seconds: str = "1") -> None:
    assert r.status_code == status and r.json()["error"] == kind, r.text
    assert r.headers.get("retry-after") == seconds, dict(r.headers)


@pytest.mark.parametrize("status", [429, 503])
def test_every_429_and_503_error_says_when_to_retry(status: int) -> None:
    assert ApiError(status, "x", "m").response().headers["retry-after"] == "1"
    given = ApiError(status, "x", "m", headers={"retry-after": "7"}).response()
    assert given.headers.getlist("retry-after") == ["7"]
    assert "retry-after" not in ApiError(500, "x", "m").response().headers
    for cls in (
        engine_errors.Overloaded,
        engine_errors.NotReady,
        engine_errors.EngineClosed,
        engine_errors.DeviceFailed,
    ):
        error = from_engine_error(cls("m"), batch=False)
        assert error.status == 503 and error.response().headers["retry-after"], cls


def test_retry_after_while_not_ready(model_file: Path) -> None:
    not_started = Engine(model_file)
    settings = HttpSettings(allow_ipi_control=True)
    try:
        with (
            BackgroundServer(create_app(not_started, settings=settings)) as srv,
            httpx.Client(base_url=srv.url, timeout=30) as c,
        ):
            assert_retry_after(c.get("/readyz"), 503, "not_ready")
            assert_retry_after(c.get("/v1/models"), 503, "not_ready")
            assert_retry_after(c.post("/v1/calculate", json=WATER), 503, "not_ready")
            batch = {"structures": [WATER]}
            assert_retry_after(c.post("/v1/calculate/batch", json=batch), 503, "not_ready")
            attach = {"address": "unix:nobody", "numbers": [8, 1, 1]}
            assert_retry_after(c.post("/v1/ipi/connections", json=attach), 503, "not_ready")
    finally:
        not_started.close()


def test_retry_after_when_overloaded_busy_or_out_of_groups(
    model_file: Path, dirs: tuple[str, str]
) -> None:
    settings = HttpSettings(
        allow_ipi_control=True,
        ipi_socket_prefix=dirs[0] + "/",
        max_ipi_groups=1,
        max_request_bytes=1500,
        max_pending_bytes=2000,
    )
    with (
        Engine(model_file, settings=EngineSettings(max_queue=1)) as small,
        BackgroundServer(app := create_app(small, settings=settings)) as srv,
        httpx.Client(base_url=srv.url, timeout=30) as c,
    ):
        # the engine's queue: two structures where one fits
        two = {"structures": [WATER, WATER]}
        assert_retry_after(c.post("/v1/calculate/batch", json=two), 503, "overloaded")
        # bodies held at once: one client holds 1500 bytes, the next does not fit beside
        held = socket.create_connection(("127.0.0.1", srv.port))
        try:
            held.sendall(
                b"POST /v1/calculate HTTP/1.1\r\nHost: 127.0.0.1\r\ncontent-type: application/json"
                b"\r\nContent-Length: 1500\r\n\r\n{"
            )
            deadline = time.monotonic() + 10
            while app.state.in_flight.bytes < 1500:  # the server has read the head
                assert time.monotonic() < deadline
                time.sleep(0.01)
            padded = json.dumps(WATER).encode() + b" " * 1000
            r = c.post(
                "/v1/calculate", content=padded, headers={"content-type": "application/json"}
            )
            assert_retry_after(r, 503, "busy")
        finally:
            held.close()
        # i-PI groups: one attached (waiting for its i-PI), the next is one too many
        attach = {"address": f"unix:{dirs[0]}/nobody", "numbers": [8, 1, 1]}
        first = c.post("/v1/ipi/connections", json={**attach, "connect_timeout": 600})
        assert first.status_code == 201, first.text
        assert_retry_after(c.post("/v1/ipi/connections", json=attach), 429, "too_many_groups", "5")
        assert c.delete(f"/v1/ipi/connections/{first.json()['id']}").status_code == 200
        assert c.get("/healthz").status_code == 200


def test_retry_after_when_the_device_failed(
    model_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(ENV_VAR, "0")  # the first model call after warm-up kills the device
    with (
        Engine(model_file) as failing,
        BackgroundServer(create_app(failing)) as srv,
        httpx.Client(base_url=srv.url, timeout=30) as c,
    ):
        assert_retry_after(c.post("/v1/calculate", json=WATER), 503, "device_failed", "5")
        assert_retry_after(c.get("/healthz"), 503, "device_failed", "5")
        assert_retry_after(c.get("/readyz"), 503, "device_failed", "5")
        assert_retry_after(c.post("/v1/calculate", json=WATER), 503, "not_ready")


# ------------------------------------------------------------------------ repeated headers


@pytest.mark.parametrize(
    ("name", "values"),
    [
        ("Authorization", ["Bearer s3cret", "Bearer wrong"]),
        ("Authorization", ["Bearer wrong", "Bearer s3cret"]),
        ("Authorization", ["Bearer s3cret", "Bearer s3cret"]),
        ("Content-Type", ["application/json", "application/msgpack"]),
        ("X-CACE-Session", ["md-1", "md-2"]),
    ],
)
def test_a_repeated_security_header_is_refused(
    engine: Engine, name: str, values: list[str]
) -> None:
    app = create_app(engine, settings=HttpSettings(token="s3cret"))
    ok = [("Authorization", "Bearer s3cret")]
    with BackgroundServer(app) as srv, httpx.Client(base_url=srv.url, timeout=30) as c:
        headers = [h for h in ok if h[0] != name] + [(name, v) for v in values]
        for method in ("GET", "POST"):
            path = "/v1/models" if method == "GET" else "/v1/calculate"
            body = json.dumps(WATER).encode() if method == "POST" else None
            r = c.request(method, path, content=body, headers=headers)
            assert r.status_code == 400, r.text
            assert r.json() == {
                "error": "duplicate_header",
                "message": f"the request carries 2 {name} headers; send it once",
                "field": name,
            }
        # the server stays up, and one of each is fine
        good = [*ok, ("Content-Type", "application/json"), ("X-CACE-Session", "md-1")]
        assert c.post("/v1/calculate", content=json.dumps(WATER), headers=good).status_code == 200
