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


def fuzz_settings(examples: int) -> Any:
    """Reproducible hypothesis settings for tests that talk to a server."""
    return settings(
        max_examples=examples,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        derandomize=True,
        database=None,
    )


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
    @fuzz_settings(examples)
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


# ------------------------------------------------------------------- packed arrays, big ints

WATER = {"numbers": [8, 1, 1], "positions": [[0, 0, 0], [0.96, 0, 0], [-0.24, 0.93, 0]]}
DTYPES = st.one_of(
    st.sampled_from(
        [
            "<f8",
            "<i8",
            "<i4",
            "|u1",
            "<u1",
            ">f8",
            "<f4",
            "<f2",
            "|b1",
            "O",
            "V8",
            "<U3",
            "<c16",
            "<M8[s]",
            "f8",
            "float64",
            "",
            "<i16",
        ]
    ),
    VALUES,
)
SHAPES = st.one_of(
    st.lists(
        st.one_of(
            st.integers(min_value=-4, max_value=12),
            st.integers(min_value=0, max_value=2**64 - 1),
            st.sampled_from([2**31, 2**32 + 3, 2**61, 2**62, 2**63 - 1, 2**63, 2**64 - 1]),
            st.booleans(),
            st.floats(min_value=0, max_value=10),
        ),
        max_size=4,
    ),
    VALUES,
)


@st.composite
def packed_array(draw: st.DrawFn) -> dict[str, Any]:
    """Arbitrary shape, dtype and data: consistent sometimes, absurd often."""
    shape = draw(SHAPES)
    dtype = draw(DTYPES)
    size = draw(st.integers(min_value=0, max_value=96))
    return {"shape": shape, "dtype": dtype, "data": draw(st.binary(min_size=size, max_size=size))}


@st.composite
def packed_body(draw: st.DrawFn) -> dict[str, Any]:
    body: dict[str, Any] = dict(WATER)
    for field in draw(st.sets(st.sampled_from(["numbers", "positions", "cell"]), min_size=1)):
        body[field] = draw(packed_array())
    if "cell" in body:
        body["pbc"] = True
    return body


def test_packed_arrays_of_any_shape_and_dtype_get_4xx(server: BackgroundServer) -> None:
    @fuzz_settings(EXAMPLES * 3)
    @given(body=packed_body(), batch=st.booleans())
    def run(body: dict[str, Any], batch: bool) -> None:
        post_fuzzed_body(server, body, batch, binary=True)

    run()


def test_shape_overflowing_int64_is_a_422_naming_the_field(server: BackgroundServer) -> None:
    """[2**61, 8] floats is 2**67 bytes: in int64 that wraps to 0, which empty data matched."""
    body = dict(WATER, positions={"shape": [2**61, 8], "dtype": "<f8", "data": b""})
    with httpx.Client(base_url=server.url, timeout=30) as client:
        r = client.post(
            "/v1/calculate",
            content=msgpack.packb(body, use_bin_type=True),
            headers={"content-type": "application/msgpack"},
        )
    assert r.status_code == 422, r.text
    assert r.json()["field"] == "positions"


@pytest.mark.parametrize(
    ("template", "field"),
    [
        ('{"numbers": [8, 1, %s], "positions": [[0,0,0],[0.96,0,0],[-0.24,0.93,0]]}', "numbers"),
        ('{"numbers": [8, 1, 1], "positions": [[0,0,0],[0.96,0,0],[-0.24,0.93,%s]]}', "positions"),
        (
            '{"numbers": [8,1,1], "positions": [[0,0,0],[0.96,0,0],[-0.24,0.93,0]], "model": %s}',
            "model",
        ),
        ('{"structures": [{"numbers": [8,1,1], "positions": %s}]}', "structures.0.positions"),
    ],
)
@pytest.mark.parametrize("digits", [4301, 20_000])
def test_json_integers_beyond_pythons_digit_limit_get_a_422_naming_the_field(
    server: BackgroundServer, template: str, field: str, digits: int
) -> None:
    content = (template % ("9" * digits)).encode()
    path = "/v1/calculate/batch" if content.startswith(b'{"structures"') else "/v1/calculate"
    with httpx.Client(base_url=server.url, timeout=30) as client:
        r = client.post(path, content=content, headers={"content-type": "application/json"})
    assert r.status_code == 422, r.text
    assert r.json()["field"].startswith(field), r.json()


@st.composite
def json_with_long_integers(draw: st.DrawFn) -> bytes:
    """A valid request body as JSON text with integer literals of any length spliced in."""
    text = encode(draw(st.one_of(near_valid(), st.just(WATER))), False)[0].decode()
    literal = "-" * draw(st.booleans()) + "1" * draw(st.integers(min_value=1, max_value=9000))
    at = [i for i, c in enumerate(text) if c in "0123456789"]
    if not at:
        return text.encode()
    i = draw(st.sampled_from(at))
    j = i
    while j < len(text) and text[j] in "0123456789.e-+":
        j += 1
    return (text[:i] + literal + text[j:]).encode()


def test_json_numbers_of_any_length_get_4xx_or_200(server: BackgroundServer) -> None:
    @fuzz_settings(EXAMPLES)
    @given(content=json_with_long_integers())
    def run(content: bytes) -> None:
        with httpx.Client(base_url=server.url, timeout=30) as client:
            r = client.post(
                "/v1/calculate", content=content, headers={"content-type": "application/json"}
            )
            assert r.status_code < 500, (r.status_code, r.text)

    run()
