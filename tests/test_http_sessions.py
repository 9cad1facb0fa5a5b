"""HTTP sessions (``X-CACE-Session``): a client's evolving structure reuses its Verlet list."""

from __future__ import annotations

import httpx
import numpy as np

from cace_server.engine import Engine, EngineSettings
from cace_server.http import BackgroundServer, create_app
from cace_server.model import random_model
from cace_server.structures import Structure


def test_a_session_reuses_its_neighbour_list_and_gets_fresh_list_forces() -> None:
    model = random_model((1, 8), seed=4, dtype="float64", cutoff=3.5)
    rng = np.random.default_rng(0)
    grid = np.array([(i, j, k) for i in range(3) for j in range(3) for k in range(3)])
    positions = grid * 1.6 + rng.uniform(-0.2, 0.2, grid.shape)
    numbers, cell = rng.choice([1, 8], len(grid)), np.eye(3) * 4.8
    settings = EngineSettings(dtype="float64", neighbor_skin=0.5)
    with (
        Engine(model, settings=settings) as engine,
        BackgroundServer(create_app(engine)) as server,
        httpx.Client(base_url=server.url, timeout=60) as client,
    ):
        for step in range(6):
            positions = positions + rng.normal(0, 0.01, positions.shape)
            body = {"numbers": numbers.tolist(), "positions": positions.tolist(),
                    "cell": cell.tolist(), "pbc": [True] * 3}  # fmt: skip
            headers = {"X-CACE-Session": "md-run-1"} if step < 5 else {}
            reply = client.post("/v1/calculate", json=body, headers=headers)
            assert reply.status_code == 200, reply.text
            fresh = model.predict([Structure.create(numbers, positions, cell, True)])[0]
            np.testing.assert_allclose(reply.json()["forces"], fresh.forces, rtol=0, atol=1e-10)
        stats = engine.snapshot()
    # five requests of the session: one build, four reuses; the last had no session
    assert stats.neighbor_lists_reused == 4
