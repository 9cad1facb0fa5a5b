"""The client behind a proxy: a bare 500 (the proxy's, for a backend that died mid-request)
is retried like a dropped connection; the server's own 500 (its error body) is not.

Ray Serve's proxy answers a request whose replica died with ``500 Internal Server
Error`` in plain text (tests/test_ray_serve.py shows it against Ray itself); here a
small ASGI proxy in front of a real server on 127.0.0.1 answers the same, once.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from starlette.responses import PlainTextResponse

from cace_server.engine import Engine
from cace_server.http import BackgroundServer, create_app
from cace_server.model import random_model
from scripts.water_clusters import water_boxes

CLIENTS = Path(__file__).resolve().parents[1] / "clients"
try:
    import cace_client
except ImportError:  # not installed: use the source tree
    sys.path.insert(0, str(CLIENTS))
    import cace_client  # noqa: F401

from cace_client import AsyncCACEClient, CACEClient, CACEServerError  # noqa: E402
from cace_client.client import retryable  # noqa: E402


class DiesOnce:
    """An ASGI app in front of another that answers the first ``failures`` calculations
    as a proxy does whose backend died: a bare 500."""

    def __init__(self, app: Any, failures: int) -> None:
        self.app = app
        self.failures = failures
        self.answered = 0

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        calculation = scope["type"] == "http" and scope["path"].startswith("/v1/calculate")
        if calculation and self.failures > 0:
            self.failures -= 1
            self.answered += 1
            response = PlainTextResponse("Internal Server Error", status_code=500)
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)


@pytest.fixture(scope="module")
def engine() -> Iterator[Engine]:
    with Engine(random_model(seed=0)) as running:
        yield running


def test_a_proxys_500_is_retried(engine: Engine) -> None:
    proxy = DiesOnce(create_app(engine), failures=2)
    atoms = water_boxes(1, molecules=4, seed=0)[0]
    with BackgroundServer(proxy) as server:
        with CACEClient(server.url, retries=3, backoff=0.01) as client:
            assert np.isfinite(client.calculate(atoms)["energy"])
        assert proxy.answered == 2
        proxy.failures = 1

        async def batch() -> list[dict[str, Any]]:
            async with AsyncCACEClient(server.url, retries=3, backoff=0.01) as client:
                return await client.calculate_batch([atoms, atoms])

        assert len(asyncio.run(batch())) == 2
        assert proxy.answered == 3
        proxy.failures = 1
        with CACEClient(server.url, retries=0) as client, pytest.raises(CACEServerError) as info:
            client.calculate(atoms)
        assert info.value.status == 500 and info.value.kind == "http_error"


def test_only_replies_that_are_not_the_servers_own_are_retryable() -> None:
    def reply(status: int, **kwargs: Any) -> httpx.Response:
        return httpx.Response(status, **kwargs)

    assert retryable(reply(503, json={"error": "overloaded", "message": "busy"}))
    assert retryable(reply(502, text="Bad Gateway"))
    assert retryable(reply(500, text="Internal Server Error"))
    assert retryable(reply(500, json=["not", "ours"]))
    assert not retryable(reply(500, json={"error": "internal_error", "message": "a bug"}))
    assert not retryable(reply(422, json={"error": "invalid_input", "message": "no"}))
    assert not retryable(reply(400, text="Bad Request"))
