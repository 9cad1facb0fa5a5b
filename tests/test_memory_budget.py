"""Kept neighbour lists are budgeted by bytes, least recently used first, over a real server.

Each HTTP session (``X-CACE-Session``) keeps a Verlet list; many session ids with a
small ``neighbor_list_bytes`` stay under it (``cace_engine_neighbor_list_bytes`` on
/metrics), the least recently used go first, and one session whose structure moves
keeps one list, rebuilt in place.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from cace_server.engine import Engine, EngineSettings
from cace_server.http import BackgroundServer, create_app
from cace_server.model import random_model
from cace_server.structures import Structure

SKIN = 0.5

glibc = pytest.mark.skipif(
    not sys.platform.startswith("linux") or os.confstr("CS_GNU_LIBC_VERSION") is None,
    reason="malloc_trim is glibc's",
)


def lattice(seed: int) -> Structure:
    rng = np.random.default_rng(seed)
    grid = np.array([(i, j, k) for i in range(3) for j in range(3) for k in range(3)])
    positions = grid * 1.6 + rng.uniform(-0.2, 0.2, grid.shape)
    return Structure.create(np.tile([8, 1, 1], 9), positions, np.eye(3) * 4.8, True)


def body_of(s: Structure) -> dict:
    return {"numbers": s.numbers.tolist(), "positions": s.positions.tolist(),
            "cell": s.cell.tolist(), "pbc": [True] * 3}  # fmt: skip


def list_bytes(client: httpx.Client) -> float:
    for family in text_string_to_metric_families(client.get("/metrics").text):
        if family.name == "cace_engine_neighbor_list_bytes":
            return family.samples[0].value
    raise AssertionError("no cace_engine_neighbor_list_bytes on /metrics")


def sessions(engine: Engine) -> list[str]:
    """The sessions whose lists are kept, least recently used first."""
    return [t for t, _ in engine._trajectories.lru_order()]


@pytest.fixture(scope="module")
def model():
    return random_model((1, 8), seed=4, dtype="float64", cutoff=3.5)


def one_list_bytes(model, s: Structure) -> int:
    verlet = model.verlet_list(SKIN)
    verlet.prepare(s)
    return verlet.nbytes


def test_many_sessions_stay_under_the_byte_budget_least_recently_used_first(model) -> None:
    s = lattice(0)
    one = one_list_bytes(model, s)
    assert one > 0
    # room for three lists; the count bound (1,024) is far away
    settings = EngineSettings(dtype="float64", neighbor_skin=SKIN, neighbor_list_bytes=3 * one + 1)
    with (
        Engine(model, settings=settings) as engine,
        BackgroundServer(create_app(engine)) as server,
        httpx.Client(base_url=server.url, timeout=60) as client,
    ):

        def post(session: str) -> None:
            r = client.post("/v1/calculate", json=body_of(s), headers={"X-CACE-Session": session})
            assert r.status_code == 200, r.text

        for k in range(12):
            post(f"s{k}")
            held = list_bytes(client)
            assert 0 < held <= 3 * one + 1, (k, held, one)
        assert sessions(engine) == ["http:s9", "http:s10", "http:s11"]
        assert list_bytes(client) == 3 * one
        # s9 comes back (reused: it was kept) and so becomes the most recently used; a
        # new session then evicts s10, the least recently used
        before = engine.snapshot()
        post("s9")
        after = engine.snapshot()
        assert after.neighbor_lists_reused - before.neighbor_lists_reused == 1
        post("s12")
        assert sessions(engine) == ["http:s11", "http:s9", "http:s12"]
        # an evicted session is built anew
        before = engine.snapshot()
        post("s0")
        after = engine.snapshot()
        assert after.neighbor_lists_built - before.neighbor_lists_built == 1
        assert list_bytes(client) <= 3 * one + 1


def test_a_moving_session_keeps_one_list(model) -> None:
    """Each step moves an atom beyond half the skin: the session's list is rebuilt in
    place, never a second list kept beside it (that one was never read again)."""
    s = lattice(1)
    one = one_list_bytes(model, s)
    settings = EngineSettings(dtype="float64", neighbor_skin=SKIN)
    with (
        Engine(model, settings=settings) as engine,
        BackgroundServer(create_app(engine)) as server,
        httpx.Client(base_url=server.url, timeout=60) as client,
    ):
        positions = s.positions.copy()
        for step in range(8):
            positions[step % len(positions), 0] += 0.4  # beyond half the skin
            body = {**body_of(s), "positions": positions.tolist()}
            r = client.post("/v1/calculate", json=body, headers={"X-CACE-Session": "md"})
            assert r.status_code == 200, r.text
        snap = engine.snapshot()
        assert snap.neighbor_lists_built == 8 and snap.neighbor_lists_reused == 0
        held = list_bytes(client)
        # one list (its pair count varies a little with the positions), not eight
        assert 0.5 * one < held < 1.5 * one, (held, one)


def test_a_list_larger_than_the_budget_is_not_kept(model) -> None:
    s = lattice(2)
    settings = EngineSettings(
        dtype="float64", neighbor_skin=SKIN, neighbor_list_bytes=one_list_bytes(model, s) // 2
    )
    with (
        Engine(model, settings=settings) as engine,
        BackgroundServer(create_app(engine)) as server,
        httpx.Client(base_url=server.url, timeout=60) as client,
    ):
        for _ in range(2):
            r = client.post("/v1/calculate", json=body_of(s), headers={"X-CACE-Session": "big"})
            assert r.status_code == 200, r.text
        assert list_bytes(client) == 0 and len(engine._trajectories) == 0
        assert engine.snapshot().neighbor_lists_built == 2


def test_the_budget_must_be_positive() -> None:
    with pytest.raises(ValueError, match="neighbor_list_bytes"):
        EngineSettings(neighbor_list_bytes=0)


# One large structure with no neighbours through the engine, in a fresh process: the
# resident memory it leaves behind (over the idle engine's), with KEEP_BYTES as given.
_KEPT = textwrap.dedent(
    """
    import sys, time
    import numpy as np
    from cace_server import host_memory
    host_memory.KEEP_BYTES = int(sys.argv[1])
    from cace_server.engine import Engine, EngineSettings
    from cace_server.model import random_model
    from cace_server.structures import Structure

    n = 30000
    side = int(np.ceil(n ** (1 / 3)))
    grid = np.array([(i, j, k) for i in range(side) for j in range(side) for k in range(side)])
    s = Structure.create(np.tile([8, 1, 1], n // 3), grid[:n] * 8.0)
    model = random_model((1, 8), seed=0, dtype="float32")
    with Engine(model, settings=EngineSettings(dtype="float32", max_queue_atoms=10**6)) as e:
        e.evaluate_sync(Structure.create([8, 1, 1], np.eye(3)), timeout=60)
        base = host_memory.rss_bytes()
        e.evaluate_sync(s, timeout=300)
        e.evaluate_sync(Structure.create([8, 1, 1], np.eye(3)), timeout=60)
        time.sleep(0.2)
        print(host_memory.rss_bytes() - base)
    """
)


def _kept(keep: int) -> int:
    out = subprocess.run(
        [sys.executable, "-c", _KEPT, str(keep)], capture_output=True, text=True, check=True
    )
    return int(out.stdout.split()[-1])


@glibc
def test_memory_of_a_call_that_grew_the_process_is_handed_back() -> None:
    """A call that grew the process by more than KEEP_BYTES (here 64 MiB) leaves at most
    about that much behind; with the bound out of reach (as before) it left more."""
    keep = 64 << 20
    bounded = _kept(keep)
    unbounded = _kept(1 << 50)
    assert bounded < keep + (32 << 20), (bounded, unbounded)
    assert unbounded > bounded + (64 << 20), (bounded, unbounded)
