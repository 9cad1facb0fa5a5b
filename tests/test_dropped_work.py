"""Queued work of clients that left is dropped, not computed.

Bulk requests wait behind one on the (blocked) model; their clients hang up at once
(raw sockets closed). The server drops their structures from the queue before the
model is free again (``cace_engine_dropped_total{reason="disconnected"}``), and the
model then computes only the one it held and a small request sent meanwhile.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from cace_server.engine import Engine, EngineSettings
from cace_server.http import BackgroundServer, create_app
from cace_server.model import random_model
from cace_server.structures import Structure
from tests.test_engine import Faulty, make_structure

HUNG_UP = 6


def body_of(s: Structure) -> dict[str, Any]:
    return {"numbers": s.numbers.tolist(), "positions": s.positions.tolist()}


def raw_post(port: int, body: dict[str, Any]) -> socket.socket:
    """A POST /v1/calculate sent whole; the socket is left open, its answer unread."""
    payload = json.dumps(body).encode()
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    head = (
        f"POST /v1/calculate HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
    )
    sock.sendall(head.encode() + payload)
    return sock


def dropped(client: httpx.Client) -> dict[str, float]:
    out = {}
    for family in text_string_to_metric_families(client.get("/metrics").text):
        if family.name == "cace_engine_dropped":
            for sample in family.samples:
                if sample.name == "cace_engine_dropped_total":
                    out[sample.labels["reason"]] = sample.value
    return out


def wait_for(condition: Any, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.01)


@pytest.fixture(scope="module")
def model() -> Any:
    return random_model((1, 8), seed=0)


def test_requests_whose_clients_hung_up_are_dropped_not_computed(model: Any) -> None:
    faulty = Faulty(model)
    # each 40-atom request is a batch of its own, in the bulk lane
    cfg = EngineSettings(batch_wait_ms=0, max_batch_atoms=32, small_request_atoms=10)
    with (
        Engine(faulty, settings=cfg) as engine,
        BackgroundServer(create_app(engine)) as server,
        httpx.Client(base_url=server.url, timeout=60) as client,
    ):
        warm_calls = len(faulty.calls)
        faulty.block()
        held: dict[str, Any] = {}

        def first() -> None:
            held["reply"] = client.post(
                "/v1/calculate", json=body_of(make_structure(40, seed=1, periodic=False))
            )

        on_device = threading.Thread(target=first)
        on_device.start()
        assert faulty.entered.wait(30)
        sockets = [
            raw_post(server.port, body_of(make_structure(40, seed=10 + k, periodic=False)))
            for k in range(HUNG_UP)
        ]
        wait_for(lambda: len(engine._queue) == HUNG_UP, "the bulk requests are queued")
        for sock in sockets:  # all hang up at once
            sock.close()
        wait_for(lambda: len(engine._queue) == 0, "the queue is emptied while the model is busy")
        assert engine.snapshot().dropped == {"disconnected": HUNG_UP}
        # a small request sent now is answered as soon as the model is free
        small: dict[str, Any] = {}

        def ask_small() -> None:
            start = time.monotonic()
            small["reply"] = client.post(
                "/v1/calculate", json=body_of(make_structure(3, seed=2, periodic=False))
            )
            small["seconds"] = time.monotonic() - start

        asker = threading.Thread(target=ask_small)
        asker.start()
        wait_for(lambda: len(engine._queue) == 1, "the small request is queued")
        faulty.gate.set()
        asker.join(60)
        on_device.join(60)
        assert held["reply"].status_code == 200 and small["reply"].status_code == 200
        assert small["seconds"] < 10, small
        # the model computed the request it held and the small one, nothing else
        assert faulty.calls[warm_calls:] == [1, 1], faulty.calls
        assert dropped(client) == {"disconnected": HUNG_UP}
        assert engine.snapshot().queue_depth == 0 and engine.snapshot().pending_atoms == 0
        assert client.get("/healthz").status_code == 200


def test_abandoned_futures_leave_the_queue_at_once(model: Any) -> None:
    """``Engine.abandon``: what is queued is removed and counted by reason; what is
    computing (or done) is not touched."""
    faulty = Faulty(model)
    cfg = EngineSettings(batch_wait_ms=0, max_batch_atoms=32, small_request_atoms=10)
    with Engine(faulty, settings=cfg) as engine:
        faulty.block()
        busy = engine.submit(make_structure(40, seed=3, periodic=False))
        assert faulty.entered.wait(30)
        queued = engine.submit([make_structure(40, seed=4 + k, periodic=False) for k in range(3)])
        wait_for(lambda: len(engine._queue) == 3, "queued")
        assert engine.abandon(busy + queued, "ipi_closed") == 3
        assert len(engine._queue) == 0 and all(f.cancelled() for f in queued)
        faulty.gate.set()
        assert busy[0].result(30).energy is not None
        snap = engine.snapshot()
        assert snap.dropped == {"ipi_closed": 3}
        assert snap.queue_depth == 0 and snap.pending_atoms == 0


def test_an_ipi_connection_closed_mid_step_has_its_step_dropped(
    model: Any, socket_dir: str
) -> None:
    """A raw-socket 'i-PI' sends a step and closes the connection while it waits
    behind a busy model: the step leaves the queue uncomputed (``ipi_closed``)."""
    import ase

    from cace_server.ipi import DriverPool
    from cace_server.ipi import protocol as p
    from cace_server.ipi.engine_evaluator import ipi_evaluator
    from cace_server.units import BOHR_PER_ANGSTROM
    from tests.ipi_support import options

    faulty = Faulty(model)
    cfg = EngineSettings(batch_wait_ms=0, max_batch_atoms=32, small_request_atoms=10)
    s = make_structure(40, seed=5)
    path = f"{socket_dir}/gone"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)
    listener.settimeout(30)
    with Engine(faulty, settings=cfg) as engine:
        warm_calls = len(faulty.calls)
        faulty.block()
        busy = engine.submit(make_structure(40, seed=6))
        assert faulty.entered.wait(30)
        atoms = ase.Atoms(numbers=s.numbers, positions=s.positions, cell=s.cell, pbc=True)
        pool = DriverPool(ipi_evaluator(engine, None), options(atoms))
        (connection,) = pool.add(f"unix:{path}", clients=1)

        async def serve() -> None:
            async with pool:
                await pool.wait(60)

        driver = threading.Thread(target=lambda: asyncio.run(serve()))
        driver.start()
        try:
            conn, _ = listener.accept()
            with conn:
                conn.sendall(p.encode_status())
                assert conn.recv(12) == b"NEEDINIT    "
                conn.sendall(p.encode_init(0, ""))
                to_bohr = BOHR_PER_ANGSTROM
                conn.sendall(p.encode_posdata(s.cell.T * to_bohr, s.positions * to_bohr))
                wait_for(lambda: len(engine._queue) == 1, "the step is queued")
            wait_for(lambda: len(engine._queue) == 0, "the step is dropped while the model is busy")
            assert engine.snapshot().dropped == {"ipi_closed": 1}
            faulty.gate.set()
            assert busy[0].result(30).energy is not None
        finally:
            faulty.gate.set()
            driver.join(60)
            listener.close()
        assert faulty.calls[warm_calls:] == [1], faulty.calls
        assert connection.steps == 0
