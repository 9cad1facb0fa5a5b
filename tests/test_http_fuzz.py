"""Fuzzing the HTTP API: nothing a client sends may produce a 5xx.

Two fuzzers against a real uvicorn server on 127.0.0.1: schemathesis, driven by
the server's own OpenAPI schema (valid and invalid data for every operation), and
a hypothesis strategy of arbitrary JSON/msgpack values put in the fields of a
calculation request, with near-valid structures mixed in. ``-m slow`` runs more
examples.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable

from cace_server.engine import Engine, EngineSettings
from cace_server.http import BackgroundServer, HttpSettings, create_app
from cace_server.model import random_model, save_model

schemathesis = pytest.importorskip("schemathesis")
from schemathesis.checks import not_a_server_error  # noqa: E402

EXAMPLES = int(os.environ.get("CACE_FUZZ_EXAMPLES", "40"))


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BackgroundServer]:
    path: Path = save_model(random_model((1, 8), seed=2), tmp_path_factory.mktemp("fz") / "m.st")
    http = HttpSettings(max_atoms=500, max_structures=8, max_ipi_groups=4, request_timeout_s=20)
    with (
        Engine(path, settings=EngineSettings(dtype="float64", batch_wait_ms=0.5)) as engine,
        BackgroundServer(create_app(engine, settings=http)) as srv,
    ):
        yield srv


def schema_operations(server: BackgroundServer) -> list[Any]:
    api = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
    return [result.ok() for result in api.get_all_operations()]


# schemathesis's own pytest plugin does not run under this pytest (9.x), so its
# strategies are driven by hypothesis directly: one property test per operation and
# generation mode (schema-valid data, and data that breaks the schema).
@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_schemathesis_finds_no_server_error(server: BackgroundServer, mode: str) -> None:
    operations = schema_operations(server)
    assert len(operations) >= 9
    for operation in operations:

        @given(case=operation.as_strategy(schemathesis.GenerationMode(mode)))
        @settings(
            max_examples=EXAMPLES,
            deadline=None,
            suppress_health_check=list(HealthCheck),
            derandomize=True,
            database=None,
        )
        def check(case: Any) -> None:
            case.call_and_validate(base_url=server.url, checks=[not_a_server_error])

        try:
            check()
        except Unsatisfiable:  # no invalid input exists (no parameters, no body)
            assert mode == "negative", operation.label
    with httpx.Client(base_url=server.url) as client:
        assert client.get("/readyz").status_code == 200


# ------------------------------------------------------------------- hand-written fuzz

FLOATS = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(min_value=-6, max_value=6),
    st.integers(min_value=-(2**70), max_value=2**70),
)
LEAVES = st.one_of(st.none(), st.booleans(), FLOATS, st.text(max_size=8), st.binary(max_size=24))
VALUES = st.recursive(
    LEAVES,
    lambda inner: st.one_of(
        st.lists(inner, max_size=5), st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=20,
)
ROW = st.lists(st.floats(min_value=-8, max_value=8), min_size=3, max_size=3)


@st.composite
def near_valid(draw: st.DrawFn) -> dict[str, Any]:
    """A structure that is often valid, with one field sometimes replaced by junk."""
    n = draw(st.integers(min_value=0, max_value=6))
    body: dict[str, Any] = {
        draw(st.sampled_from(["numbers", "symbols"])): None,
        "positions": draw(st.lists(ROW, min_size=n, max_size=n)),
    }
    if "numbers" in body:
        body["numbers"] = draw(st.lists(st.sampled_from([1, 8, 6, 0, 200]), min_size=n,
                                        max_size=n))  # fmt: skip
    else:
        body["symbols"] = draw(st.lists(st.sampled_from(["H", "O", "C", "Q", ""]), min_size=n,
                                        max_size=n))  # fmt: skip
    if draw(st.booleans()):
        body["cell"] = draw(st.one_of(st.lists(ROW, min_size=3, max_size=3), ROW))
        body["pbc"] = draw(st.one_of(st.booleans(), st.lists(st.booleans(), max_size=4)))
    for key in ("properties", "model"):
        if draw(st.booleans()):
            body[key] = draw(
                st.one_of(
                    st.lists(st.sampled_from(["energy", "forces", "stress", "energies", "x"])),
                    st.sampled_from(["m", "nope"]),
                )
            )
    if draw(st.integers(0, 3)) == 0:  # junk in one field
        field = draw(st.sampled_from(["numbers", "positions", "cell", "pbc", "properties",
                                      "model", "symbols", "extra"]))  # fmt: skip
        body[field] = draw(VALUES)
    return body


def encode(body: Any, binary: bool) -> tuple[bytes, dict[str, str]]:
    if binary:
        return msgpack.packb(body, use_bin_type=True), {"content-type": "application/msgpack"}

    def safe(value: Any) -> Any:  # JSON has no bytes and no ints this large
        if isinstance(value, bytes):
            return value.hex()
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) > 2**63:
            return math.copysign(1e300, value)
        if isinstance(value, list):
            return [safe(v) for v in value]
        if isinstance(value, dict):
            return {k: safe(v) for k, v in value.items()}
        return value

    return json.dumps(safe(body)).encode(), {"content-type": "application/json"}


def msgpack_safe(value: Any) -> Any:
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 2**63:
        return float(value)
    if isinstance(value, list):
        return [msgpack_safe(v) for v in value]
    if isinstance(value, dict):
        return {k: msgpack_safe(v) for k, v in value.items()}
    return value


def fuzz_strategies() -> dict[str, Any]:
    return {
        "body": st.one_of(near_valid(), VALUES),
        "batch": st.booleans(),
        "binary": st.booleans(),
    }


def post_fuzzed_body(server: BackgroundServer, body: Any, batch: bool, binary: bool) -> None:
    """Any body gets a 200 or a 4xx with our error shape, and the server stays up."""
    if batch:
        body = {"structures": [body, body] if isinstance(body, dict) else body}
    content, headers = encode(msgpack_safe(body), binary)
    path = "/v1/calculate/batch" if batch else "/v1/calculate"
    with httpx.Client(base_url=server.url, timeout=30) as client:
        r = client.post(path, content=content, headers=headers)
        assert r.status_code < 500, (r.status_code, r.text, body)
        if r.status_code != 200:
            reply = r.json()
            assert reply["error"] and reply["message"]
        assert client.get("/healthz").status_code == 200


def _fuzz(server: BackgroundServer, examples: int) -> None:
    @settings(
        max_examples=examples,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        derandomize=True,
        database=None,
    )
    @given(**fuzz_strategies())
    def run(body: Any, batch: bool, binary: bool) -> None:
        post_fuzzed_body(server, body, batch, binary)

    run()


def test_fuzzed_bodies_get_4xx_or_200(server: BackgroundServer) -> None:
    _fuzz(server, EXAMPLES * 4)


@pytest.mark.slow
def test_more_fuzzing_examples(server: BackgroundServer) -> None:
    """The same fuzzer with many more examples (``-m slow``)."""
    _fuzz(server, 2000)
