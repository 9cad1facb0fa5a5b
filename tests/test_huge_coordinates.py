"""Positions far from the origin: wrapped exactly (periodic) or refused (non-periodic).

A real server (uvicorn on 127.0.0.1, the bundled water model in float32 and
float64) attaches to a fake i-PI on a UNIX socket (``POST /v1/ipi/connections``)
that sends the same water box twice: wrapped into its cell, and moved by whole cell
vectors to about 1e12 Bohr from the origin. The two must give the same energy,
forces and virial, and the same as the wrapped box sent over HTTP. The box is built
so that the far positions are exact in float64 (a power-of-two cell, positions on
a 2^-11 grid): wrapping them gives the wrapped box bit for bit, so any difference is
the server's. Non-periodic far positions are refused on both paths.
"""

from __future__ import annotations

import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import numpy.typing as npt
import pytest

from cace_server.engine import Engine, EngineSettings
from cace_server.http import BackgroundServer, HttpSettings, create_app
from cace_server.ipi import protocol as p
from cace_server.server import default_model_path
from cace_server.units import ANGSTROM_PER_BOHR, FORCE_AU_PER_EV_ANGSTROM, HARTREE_PER_EV

L_BOHR = 16.0  # cubic cell (Bohr), a power of two: n * L is exact
GRID = 2.0**-11  # positions on this grid (Bohr): W + n * L exact up to 2^41 Bohr
FAR = 2**35  # cell vectors moved: up to 2^35 * 16 Bohr = 5.5e11 Bohr (1e12 spread)


def water_box() -> tuple[npt.NDArray[np.float64], list[str]]:
    """8 water molecules in the 16 Bohr (8.5 Å) cell, positions in Bohr on the grid."""
    rng = np.random.default_rng(29)
    oh = 1.81  # Bohr
    angle = np.radians(104.5)
    molecule = np.array([[0, 0, 0], [oh, 0, 0], [oh * np.cos(angle), oh * np.sin(angle), 0]])
    positions = []
    for corner in np.ndindex(2, 2, 2):
        centre = (np.array(corner) + 0.25) * L_BOHR / 2
        rotation, _ = np.linalg.qr(rng.normal(size=(3, 3)))
        positions.append(centre + molecule @ rotation.T)
    pos = (np.round(np.concatenate(positions) / GRID) * GRID) % L_BOHR
    return pos, ["O", "H", "H"] * 8


def far_copy(wrapped: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    n = np.random.default_rng(1).integers(-FAR, FAR, wrapped.shape).astype(np.float64)
    far = wrapped + n * L_BOHR
    assert np.array_equal(far - n * L_BOHR, wrapped)  # exact in float64
    assert np.abs(far).max() > 1e11
    return far


@dataclass
class FakeIpi:
    """Plays i-PI on a UNIX socket: sends each (h, positions) in Bohr, collects the
    FORCEREADY replies (None once the driver closed the connection instead)."""

    path: str
    frames: list[tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]]
    results: list[p.ForceReady | None] = field(default_factory=list)
    ready: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None

    def __post_init__(self) -> None:
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()
        assert self.ready.wait(10)

    def join(self, timeout: float = 120) -> None:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "the fake i-PI did not finish"
        if self.error is not None:
            raise self.error

    def _serve(self) -> None:
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
                server.bind(self.path)
                server.listen(1)
                server.settimeout(60)
                self.ready.set()
                conn, _ = server.accept()
                with conn:
                    conn.settimeout(60)
                    self._drive(conn)
        except BaseException as exc:  # handed to the test by join()
            self.error = exc
        finally:
            self.ready.set()

    def _drive(self, conn: socket.socket) -> None:
        decoder = p.ServerDecoder()
        pending: list[object] = []

        def receive() -> object | None:
            while not pending:
                data = conn.recv(1 << 16)
                if not data:
                    return None
                pending.extend(decoder.feed(data))
            return pending.pop(0)

        def status() -> str | None:
            conn.sendall(p.encode_status())
            reply = receive()
            return None if reply is None else reply.state  # type: ignore[attr-defined]

        for h, positions in self.frames:
            state = status()
            if state == "NEEDINIT":
                conn.sendall(p.encode_init(0, ""))
                state = status()
            assert state == "READY", state
            conn.sendall(p.encode_posdata(h, positions))
            try:
                state = status()
            except (ConnectionResetError, BrokenPipeError):
                state = None
            if state is None:
                self.results.append(None)
                return
            assert state == "HAVEDATA", state
            conn.sendall(p.encode_getforce())
            reply = receive()
            assert isinstance(reply, p.ForceReady), reply
            self.results.append(reply)
        conn.sendall(p.encode_exit())


#: relative tolerance of an energy computed twice from the same positions: float32
#: sums the same pairs in another order when the neighbour lists differ (HTTP, i-PI)
TOLERANCE = {"float64": 1e-12, "float32": 1e-6}


@pytest.fixture(scope="module", params=list(TOLERANCE))
def dtype(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="module")
def server(dtype: str) -> Iterator[BackgroundServer]:
    settings = HttpSettings(max_ipi_groups=4, allow_ipi_control=True, ipi_socket_prefix="/tmp/ipi")
    engine_settings = EngineSettings(dtype=dtype)
    with (
        Engine({"water": default_model_path()}, settings=engine_settings) as engine,
        BackgroundServer(create_app(engine, settings=settings)) as srv,
    ):
        yield srv


@pytest.fixture
def client(server: BackgroundServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=120) as c:
        yield c


@pytest.fixture
def socket_dir() -> Iterator[str]:
    path = tempfile.mkdtemp(prefix="ipi", dir="/tmp")  # sun_path holds only 108 bytes
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def attach(client: httpx.Client, path: str, symbols: list[str]) -> str:
    r = client.post(
        "/v1/ipi/connections",
        json={"address": f"unix:{path}", "clients": 1, "symbols": symbols},
    )
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


def closed_group(client: httpx.Client, group: str, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        reply = client.get(f"/v1/ipi/connections/{group}").json()
        if reply["state"] == "closed":
            return reply  # type: ignore[no-any-return]
        assert time.monotonic() < deadline, reply
        time.sleep(0.05)


def test_far_periodic_positions_from_ipi_give_the_wrapped_energy(
    client: httpx.Client, socket_dir: str, dtype: str
) -> None:
    tol = TOLERANCE[dtype]
    wrapped, symbols = water_box()
    far = far_copy(wrapped)
    h = np.eye(3) * L_BOHR
    fake = FakeIpi(str(Path(socket_dir) / "far"), [(h, far), (h, wrapped)])
    group = attach(client, fake.path, symbols)
    fake.join()
    closed_group(client, group)
    far_reply, wrapped_reply = fake.results
    assert far_reply is not None and wrapped_reply is not None
    # the same structure once wrapped: the same numbers, to float64 round-off
    np.testing.assert_allclose(far_reply.energies, wrapped_reply.energies, rtol=tol, atol=0)
    scale = np.abs(wrapped_reply.forces).max()
    np.testing.assert_allclose(far_reply.forces, wrapped_reply.forces, rtol=0, atol=tol * scale)
    scale = np.abs(wrapped_reply.virials).max()
    np.testing.assert_allclose(far_reply.virials, wrapped_reply.virials, rtol=0, atol=tol * scale)
    # ... and what HTTP gives for the wrapped box, converted as the driver converts
    r = client.post(
        "/v1/calculate",
        json={
            "symbols": symbols,
            "positions": (wrapped * ANGSTROM_PER_BOHR).tolist(),
            "cell": (h.T * ANGSTROM_PER_BOHR).tolist(),
            "pbc": True,
            "properties": ["energy", "forces"],
        },
    )
    assert r.status_code == 200, r.text
    energy = float(far_reply.energies[0]) / HARTREE_PER_EV
    assert energy == pytest.approx(r.json()["energy"], rel=tol, abs=0)
    forces = far_reply.forces[0] / FORCE_AU_PER_EV_ANGSTROM
    scale = np.abs(forces).max()
    np.testing.assert_allclose(forces, r.json()["forces"], rtol=0, atol=10 * tol * scale)


def test_far_non_periodic_positions_are_refused(client: httpx.Client, socket_dir: str) -> None:
    wrapped, symbols = water_box()
    far = far_copy(wrapped)
    # i-PI with a zero cell (not periodic): the connection closes with the reason
    fake = FakeIpi(str(Path(socket_dir) / "gas"), [(np.zeros((3, 3)), far)])
    group = attach(client, fake.path, symbols)
    fake.join()
    assert fake.results == [None]
    errors = [c["last_error"] or "" for c in closed_group(client, group)["connections"]]
    assert any("refusing the structure" in e and "at most 1e+06 Å" in e for e in errors), errors
    # HTTP: the atom is named, periodic or not; the server keeps serving
    for pbc in (False, True):
        body = {"symbols": symbols, "positions": (far * ANGSTROM_PER_BOHR).tolist()}
        if pbc:
            body.update(cell=(np.eye(3) * L_BOHR * ANGSTROM_PER_BOHR).tolist(), pbc=True)
        r = client.post("/v1/calculate", json=body)
        assert r.status_code == 422, r.text
        assert "coordinates beyond" in r.json()["message"]
        assert r.json()["field"].startswith("positions.")
    r = client.post(
        "/v1/calculate",
        json={"symbols": symbols, "positions": (wrapped * ANGSTROM_PER_BOHR).tolist()},
    )
    assert r.status_code == 200, r.text
