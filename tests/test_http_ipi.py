"""i-PI runs attached to a running server through ``POST /v1/ipi/connections``.

The real ``i-pi`` program on a UNIX socket; the server (real uvicorn on 127.0.0.1)
connects to it on request and what i-PI recorded is compared with the model
evaluated directly.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ase
import httpx
import numpy as np
import pytest

from cace_server.engine import Engine, EngineSettings
from cace_server.http import BackgroundServer, HttpSettings, create_app
from cace_server.ipi.engine_evaluator import ipi_evaluator
from cace_server.model import load_model, random_model, save_model
from tests.ipi_support import (
    IPI_SCRIPT,
    CountingListener,
    IpiRun,
    check_run_against_model,
    start_ipi,
)

pytestmark = [
    pytest.mark.ipi,
    pytest.mark.skipif(not IPI_SCRIPT.exists(), reason="the i-pi program is not installed"),
]


@pytest.fixture(scope="module")
def model_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("http-ipi") / "lr.safetensors"
    return save_model(random_model((1, 8), seed=5, long_range=True), path)


@pytest.fixture(scope="module")
def server(model_file: Path) -> Iterator[BackgroundServer]:
    # The attach route is off by default; these tests use it on their own socket dirs.
    settings = HttpSettings(max_ipi_groups=2, allow_ipi_control=True, ipi_socket_prefix="/tmp/ipi")
    with (
        Engine(model_file, settings=EngineSettings(dtype="float64")) as engine,
        BackgroundServer(create_app(engine, settings=settings)) as srv,
    ):
        yield srv


@pytest.fixture
def client(server: BackgroundServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=30) as c:
        yield c


@pytest.fixture
def socket_dir() -> Iterator[str]:
    path = tempfile.mkdtemp(prefix="ipi", dir="/tmp")  # sun_path holds only 108 bytes
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def ipi_runs() -> Iterator[list[IpiRun]]:
    runs: list[IpiRun] = []
    yield runs
    for run in runs:
        run.stop()


def water_dimer() -> ase.Atoms:
    positions = [
        [0.1, 0.2, 0.3],
        [0.9, 0.1, 0.2],
        [0.0, 0.95, 0.4],
        [2.9, 2.6, 3.2],
        [3.7, 2.4, 3.3],
        [2.8, 3.4, 3.0],
    ]
    return ase.Atoms("OHHOHH", positions=positions, cell=[5.5, 5.2, 5.8], pbc=True)


def wait_for_state(client: httpx.Client, group: str, state: str, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        reply = client.get(f"/v1/ipi/connections/{group}").json()
        if reply["state"] == state:
            return reply  # type: ignore[no-any-return]
        assert time.monotonic() < deadline, reply
        time.sleep(0.05)


def test_attach_ipi_run_through_http(
    client: httpx.Client, model_file: Path, tmp_path: Path, socket_dir: str, ipi_runs: list
) -> None:
    atoms = water_dimer()
    run = start_ipi(ipi_runs, tmp_path / "ipi", socket_dir, atoms, nbeads=4, steps=3)
    run.wait_for_socket()
    r = client.post(
        "/v1/ipi/connections",
        json={
            "address": f"unix:{run.socket_path}",
            "clients": 2,
            "symbols": atoms.get_chemical_symbols(),
        },
    )
    assert r.status_code == 201, r.text
    group = r.json()
    assert group["model"] == "lr" and group["clients"] == 2
    listed = client.get("/v1/ipi/connections").json()["groups"]
    assert group["id"] in [g["id"] for g in listed]
    assert run.wait() == 0, run.log()
    done = wait_for_state(client, group["id"], "closed")
    assert sum(c["steps"] for c in done["connections"]) >= run.steps
    model = load_model(model_file, dtype="float64")
    check_run_against_model(run, model, atoms.numbers)
    # closing a finished group forgets it
    assert client.delete(f"/v1/ipi/connections/{group['id']}").status_code == 200
    assert client.get(f"/v1/ipi/connections/{group['id']}").status_code == 404


def test_close_a_waiting_group(client: httpx.Client, socket_dir: str) -> None:
    body = {
        "address": f"unix:{socket_dir}/nobody-listens",
        "numbers": [8, 1, 1],
        "reconnect": True,
        "connect_timeout": 600,
    }
    r = client.post("/v1/ipi/connections", json=body)
    assert r.status_code == 201, r.text
    group = r.json()["id"]
    assert wait_for_state(client, group, "connecting")["connections"][0]["state"] == "connecting"
    r = client.delete(f"/v1/ipi/connections/{group}")
    assert r.status_code == 200 and r.json()["state"] == "closed"
    assert group not in [g["id"] for g in client.get("/v1/ipi/connections").json()["groups"]]


def test_group_limit(client: httpx.Client, socket_dir: str) -> None:
    body: dict[str, Any] = {"numbers": [8, 1, 1], "connect_timeout": 600}
    ids = []
    for i in range(2):
        r = client.post("/v1/ipi/connections", json={**body, "address": f"unix:{socket_dir}/{i}"})
        assert r.status_code == 201, r.text
        ids.append(r.json()["id"])
    r = client.post("/v1/ipi/connections", json={**body, "address": f"unix:{socket_dir}/x"})
    assert r.status_code == 429 and r.json()["error"] == "too_many_groups"
    for group in ids:
        assert client.delete(f"/v1/ipi/connections/{group}").status_code == 200


@pytest.mark.parametrize(
    ("body", "status", "field"),
    [
        ({"address": "no-port-here", "numbers": [1]}, 422, "address"),
        ({"address": "10.20.30.40:31415", "numbers": [1]}, 403, "address"),
        ({"address": "unix:x", "numbers": [6]}, 422, "numbers.0"),
        ({"address": "unix:x", "symbols": []}, 422, "symbols"),
        ({"address": "unix:x"}, 422, "numbers"),
        ({"address": "unix:x", "numbers": [1], "clients": 0}, 422, "clients"),
        ({"address": "unix:x", "numbers": [1], "clients": 1000}, 422, "clients"),
        ({"address": "unix:x", "numbers": [1], "model": "nope"}, 422, "model"),
        ({"address": "unix:" + "x" * 200, "numbers": [1]}, 422, "address"),
        ({"address": "unix:x", "numbers": [1], "sockets_prefix": "rel/"}, 422, "sockets_prefix"),
    ],
)
def test_bad_connect_requests(client: httpx.Client, body: dict, status: int, field: str) -> None:
    r = client.post("/v1/ipi/connections", json=body)
    assert r.status_code == status, r.text
    assert r.json()["field"] == field


def test_unknown_group(client: httpx.Client) -> None:
    assert client.delete("/v1/ipi/connections/g999").status_code == 404
    assert client.get("/v1/ipi/connections/g999").json()["error"] == "not_found"


def test_the_attach_route_is_off_by_default(model_file: Path) -> None:
    with (
        Engine(model_file) as engine,
        BackgroundServer(create_app(engine, settings=HttpSettings())) as srv,
        httpx.Client(base_url=srv.url) as c,
    ):
        r = c.post("/v1/ipi/connections", json={"address": "unix:x", "numbers": [1]})
        assert r.status_code == 403 and r.json()["error"] == "forbidden"
        assert "--ipi-attach" in r.json()["message"]
        assert c.get("/v1/ipi/connections").json() == {"groups": []}


@pytest.mark.parametrize(
    ("address", "prefix"),
    [
        ("unix:/var/run/docker.sock", "/tmp/ipi_"),
        ("unix:/tmp/ipi/../../run/some.sock", "/tmp/ipi_"),  # .. out of the allowed prefix
        ("unix:x", "/tmp/ipi_/../../run/"),  # the same through sockets_prefix
        ("unix:link", None),  # a symlink inside the prefix to a socket outside it
        ("127.0.0.1:22", "/tmp/ipi_"),  # a port outside the allowed ranges
        ("localhost:31413", "/tmp/ipi_"),
    ],
)
def test_addresses_outside_the_allow_list_are_refused(
    client: httpx.Client, socket_dir: str, address: str, prefix: str | None
) -> None:
    if prefix is None:
        Path(socket_dir, "link").symlink_to("/var/run/docker.sock")
        prefix = socket_dir + "/"
    body = {"address": address, "numbers": [8, 1, 1], "sockets_prefix": prefix}
    r = client.post("/v1/ipi/connections", json=body)
    assert r.status_code == 403, r.text
    assert r.json()["error"] == "address_not_allowed" and r.json()["field"] == "address"


# What a private TCP service would greet a client with; it must never reach a reply.
BANNER = b"SSH-2.0-OpenSSH_9.6 secret-banner-bytes\r\n"


def test_attached_connections_are_rate_limited_and_never_echo_peer_bytes(
    model_file: Path,
) -> None:
    service = CountingListener.tcp(BANNER)
    settings = HttpSettings(
        allow_ipi_control=True,
        ipi_allowed_ports=((service.port, service.port),),
        max_ipi_clients=8,
        ipi_connects_per_s=1.0,
    )
    try:
        with (
            Engine(model_file) as engine,
            BackgroundServer(create_app(engine, settings=settings)) as srv,
            httpx.Client(base_url=srv.url, timeout=30) as c,
        ):
            body = {"address": f"127.0.0.1:{service.port}", "numbers": [8, 1, 1], "clients": 8}
            r = c.post("/v1/ipi/connections", json={**body, "reconnect": True})
            assert r.status_code == 201, r.text
            t0 = time.monotonic()
            time.sleep(4.0)
            listing = c.get("/v1/ipi/connections").text
            accepted, elapsed = service.accepted, time.monotonic() - t0
            assert c.delete(f"/v1/ipi/connections/{r.json()['id']}").status_code == 200
        # one burst of 8 (the group connecting), then 1 a second
        assert 8 <= accepted <= 8 + elapsed * 1.0 + 2, accepted
        assert "SSH" not in listing and "secret" not in listing, listing
        assert "no i-PI message" in listing
    finally:
        service.close()


def test_startup_pool_is_listed(model_file: Path) -> None:
    from cace_server.ipi import DriverOptions, DriverPool

    with Engine(model_file) as engine:
        pool = DriverPool(
            ipi_evaluator(engine, None), DriverOptions(numbers=[8, 1, 1], connect_timeout=600)
        )
        pool.add("unix:/tmp/ipi_cace-http-test-nobody")
        app = create_app(engine, pool)
        with BackgroundServer(app) as srv, httpx.Client(base_url=srv.url) as c:
            groups = c.get("/v1/ipi/connections").json()["groups"]
            assert [g["id"] for g in groups] == ["startup"]
            assert groups[0]["state"] == "connecting" and groups[0]["clients"] == 1
            assert np.all([g["model"] == "lr" for g in groups])
