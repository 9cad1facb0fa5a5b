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


def test_step_group_headers_batch_members_and_bad_ones_are_refused() -> None:
    """Three sessions of one step group (``X-CACE-Step-Group``, ``-Size: 3``) sent at
    once are one model call; a group without a session, a bad size or several
    structures per member are 400s naming the header."""
    import concurrent.futures

    model = random_model((1, 8), seed=4, dtype="float64", cutoff=3.5)
    rng = np.random.default_rng(1)
    body = {"numbers": [8, 1, 1], "positions": rng.uniform(0, 2, (3, 3)).tolist()}
    with (
        Engine(model, settings=EngineSettings(dtype="float64")) as engine,
        BackgroundServer(create_app(engine)) as server,
        httpx.Client(base_url=server.url, timeout=60) as client,
    ):

        def member(k: int) -> httpx.Response:
            headers = {"X-CACE-Session": f"bead-{k}", "X-CACE-Step-Group": "run-7",
                       "X-CACE-Step-Group-Size": "3"}  # fmt: skip
            return client.post("/v1/calculate", json=body, headers=headers)

        before = engine.snapshot()
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            replies = list(pool.map(member, range(3)))
        assert [r.status_code for r in replies] == [200] * 3, replies[0].text
        after = engine.snapshot()
        assert after.model_calls - before.model_calls == 1
        assert after.step_batches - before.step_batches == 1
        assert after.step_timeouts == before.step_timeouts

        bad = [
            ({"X-CACE-Step-Group": "g", "X-CACE-Step-Group-Size": "2"}, body, "X-CACE-Session"),
            ({"X-CACE-Session": "s", "X-CACE-Step-Group": "g"}, body, "got ''"),
            ({"X-CACE-Session": "s", "X-CACE-Step-Group": "g", "X-CACE-Step-Group-Size": "0"},
             body, "1 to 4096"),
            ({"X-CACE-Session": "s", "X-CACE-Step-Group": "g", "X-CACE-Step-Group-Size": "2"},
             {"structures": [body, body]}, "one structure per step"),
        ]  # fmt: skip
        for headers, payload, message in bad:
            path = "/v1/calculate/batch" if "structures" in payload else "/v1/calculate"
            reply = client.post(path, json=payload, headers=headers)
            assert reply.status_code == 400, reply.text
            assert message.lower() in reply.json()["message"].lower(), reply.text
        assert client.post("/v1/calculate", json=body).status_code == 200  # still serving
