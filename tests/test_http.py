"""The HTTP API against a real uvicorn server on 127.0.0.1, the engine and a real model.

Every server is started and stopped by the fixtures here; results are compared
with the same model evaluated in this process (float64).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import msgpack
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from cace_server.engine import Engine, EngineSettings
from cace_server.engine.info import info_dict
from cace_server.http import BackgroundServer, HttpSettings, create_app
from cace_server.http.schemas import ModelOut
from cace_server.model import load_model, random_model, save_model
from cace_server.model.io import file_digest
from cace_server.structures import Structure

LIMITS = dict(max_atoms=3000, max_structures=16, max_request_bytes=1_000_000)


def water_cluster(n_molecules: int, seed: int, box: float | None = None) -> Structure:
    """Water molecules on a jittered grid (no overlaps); periodic when ``box`` is given."""
    rng = np.random.default_rng(seed)
    side = int(np.ceil(n_molecules ** (1 / 3)))
    spacing = 3.1 if box is None else box / side
    grid = np.array([(i, j, k) for i in range(side) for j in range(side) for k in range(side)])
    centres = grid[:n_molecules] * spacing + rng.uniform(-0.2, 0.2, (n_molecules, 3)) + 0.5
    local = np.array([[0.0, 0.0, 0.0], [0.96, 0.0, 0.0], [-0.24, 0.93, 0.0]])
    positions = centres[:, None, :] + local[None] + rng.normal(0, 0.03, (n_molecules, 3, 3))
    numbers = np.tile([8, 1, 1], n_molecules)
    if box is None:
        return Structure.create(numbers, positions.reshape(-1, 3))
    return Structure.create(numbers, positions.reshape(-1, 3), np.eye(3) * box, True)


def body_of(s: Structure, **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"numbers": s.numbers.tolist(), "positions": s.positions.tolist()}
    if s.pbc.any():
        body["cell"] = s.cell.tolist()
        body["pbc"] = s.pbc.tolist()
    body.update(extra)
    return body


@pytest.fixture(scope="module")
def model_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("http") / "tiny.safetensors"
    return save_model(random_model((1, 8), seed=7), path)


@pytest.fixture(scope="module")
def model(model_file: Path) -> Any:
    return load_model(model_file, dtype="float64")


@pytest.fixture(scope="module")
def engine(model_file: Path) -> Iterator[Engine]:
    with Engine(model_file, settings=EngineSettings(dtype="float64", batch_wait_ms=2.0)) as eng:
        yield eng


@pytest.fixture(scope="module")
def server(engine: Engine) -> Iterator[BackgroundServer]:
    with BackgroundServer(create_app(engine, settings=HttpSettings(**LIMITS))) as srv:
        yield srv


@pytest.fixture
def client(server: BackgroundServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


def assert_matches(got: dict[str, Any], want: Any, tol: float = 1e-10) -> None:
    assert got["energy"] == pytest.approx(want.energy, rel=tol, abs=tol)
    np.testing.assert_allclose(np.asarray(got["forces"]), want.forces, rtol=tol, atol=tol)
    if want.stress is not None and "stress" in got:
        s = want.stress
        voigt = [s[0, 0], s[1, 1], s[2, 2], s[1, 2], s[0, 2], s[0, 1]]
        np.testing.assert_allclose(got["stress"], voigt, rtol=tol, atol=tol)
        np.testing.assert_allclose(got["stress_tensor"], s, rtol=tol, atol=tol)
        np.testing.assert_allclose(got["virial"], want.virial, rtol=tol, atol=tol)


def unpack(value: Any) -> np.ndarray:
    return np.frombuffer(value["data"], dtype=value["dtype"]).reshape(value["shape"])


def good_request_works(client: httpx.Client) -> None:
    """The server still answers a correct request."""
    s = water_cluster(2, seed=99)
    r = client.post("/v1/calculate", json=body_of(s))
    assert r.status_code == 200, r.text
    assert np.isfinite(r.json()["energy"])


# ------------------------------------------------------------------------ basics


def test_health_ready_models_docs(client: httpx.Client, model_file: Path) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    head = client.head("/healthz")
    assert head.status_code == 200 and head.content == b""
    assert client.get("/readyz").status_code == 200
    models = client.get("/v1/models").json()
    assert models["default"] == "tiny"
    (info,) = models["models"]
    assert info["name"] == "tiny" and info["default"] is True
    assert info["elements"] == [1, 8] and info["symbols"] == ["H", "O"]
    assert info["dtype"] == "float64" and info["device"] == "cpu"
    assert info["sha256"] == file_digest(model_file)
    assert info["n_parameters"] > 0 and info["cutoff"] == pytest.approx(4.0)
    assert info["outputs"] == ["energy", "forces", "stress", "energies"]
    assert info["family"] == ["cace"] and info["long_range"] is False
    assert info["required_inputs"] == [] and info["per_atom_energies"] is True
    assert client.get("/docs").status_code == 200
    spec = client.get("/openapi.json").json()
    assert {"/v1/calculate", "/v1/calculate/batch", "/v1/models", "/v1/ipi/connections"} <= set(
        spec["paths"]
    )
    assert "CalculateRequest" in spec["components"]["schemas"]


def test_model_wire_dict_is_the_schema(engine: Engine) -> None:
    """/v1/models' schema (ModelOut) has exactly the entries of info_dict, unchanged."""
    info = engine.model_info()
    wire = info_dict(info, sha256="0" * 64)
    assert list(wire) == list(ModelOut.model_fields)
    assert ModelOut.model_validate(wire).model_dump() == wire


@pytest.mark.parametrize("periodic", [False, True])
def test_calculate_matches_model(client: httpx.Client, model: Any, periodic: bool) -> None:
    s = water_cluster(5, seed=1, box=7.0 if periodic else None)
    want = model.predict([s])[0]
    props = ["energy", "forces", "energies"] + (["stress"] if periodic else [])
    r = client.post("/v1/calculate", json=body_of(s, properties=props))
    assert r.status_code == 200, r.text
    got = r.json()
    assert got["model"] == "tiny" and got["n_atoms"] == len(s)
    assert got["free_energy"] == got["energy"]
    assert_matches(got, want)
    np.testing.assert_allclose(got["energies"], want.energies, rtol=1e-10, atol=1e-10)
    assert sum(got["energies"]) == pytest.approx(got["energy"], rel=1e-10)
    if not periodic:
        assert "stress" not in got


def test_symbols_and_lengths_cell(client: httpx.Client, model: Any) -> None:
    s = water_cluster(4, seed=2, box=6.5)
    body = {
        "symbols": ["O", "H", "H"] * 4,
        "positions": s.positions.tolist(),
        "cell": [6.5, 6.5, 6.5],
        "pbc": True,
    }
    r = client.post("/v1/calculate", json=body)
    assert r.status_code == 200, r.text
    assert_matches(r.json(), model.predict([s])[0])


def test_msgpack_both_ways(client: httpx.Client, model: Any) -> None:
    s = water_cluster(8, seed=3, box=8.0)
    want = model.predict([s])[0]
    pos = np.ascontiguousarray(s.positions, dtype="<f8")
    body = {
        "numbers": {"shape": [len(s)], "dtype": "<i8", "data": s.numbers.astype("<i8").tobytes()},
        "positions": {"shape": [len(s), 3], "dtype": "<f8", "data": pos.tobytes()},
        "cell": s.cell.tolist(),
        "pbc": True,
    }
    headers = {"content-type": "application/msgpack"}
    r = client.post("/v1/calculate", content=msgpack.packb(body), headers=headers)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/msgpack"
    got = msgpack.unpackb(r.content)
    got["forces"] = unpack(got["forces"])
    assert_matches(got, want, tol=1e-12)
    # msgpack in, JSON out, when asked for
    r = client.post(
        "/v1/calculate",
        content=msgpack.packb(body),
        headers={**headers, "accept": "application/json"},
    )
    assert r.headers["content-type"] == "application/json"
    assert_matches(r.json(), want, tol=1e-12)
    # JSON in, msgpack out
    r = client.post("/v1/calculate", json=body_of(s), headers={"accept": "application/msgpack"})
    assert np.array_equal(unpack(msgpack.unpackb(r.content)["forces"]), got["forces"])


def test_batch_equals_single(client: httpx.Client, model: Any) -> None:
    structures = [
        water_cluster(2, seed=10),
        water_cluster(4, seed=11, box=6.0),
        water_cluster(1, seed=12),
        water_cluster(6, seed=13, box=7.5),
    ]
    r = client.post(
        "/v1/calculate/batch",
        json={"structures": [body_of(s) for s in structures], "properties": ["energy", "forces"]},
    )
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert len(results) == len(structures)
    for s, got in zip(structures, results, strict=True):
        single = client.post(
            "/v1/calculate", json=body_of(s, properties=["energy", "forces"])
        ).json()
        assert got["energy"] == pytest.approx(single["energy"], rel=1e-12, abs=1e-12)
        np.testing.assert_allclose(got["forces"], single["forces"], rtol=1e-12, atol=1e-12)
        assert_matches(got, model.predict([s])[0])


def test_structure_without_neighbours(client: httpx.Client) -> None:
    """An isolated atom is a valid structure: energy of the atom, zero force."""
    r = client.post("/v1/calculate", json={"symbols": ["O"], "positions": [[0, 0, 0]]})
    assert r.status_code == 200, r.text
    assert r.json()["forces"] == [[0.0, 0.0, 0.0]]


# ------------------------------------------------------------------------ bad input

OK3 = [[0.0, 0.0, 0.0], [0.96, 0.0, 0.0], [-0.24, 0.93, 0.0]]
GOOD = {"symbols": ["O", "H", "H"], "positions": OK3}

# (name, body: dict -> JSON | bytes -> raw, extra headers, status, kind, field)
BAD_INPUTS: list[tuple[str, Any, dict[str, str], int, str, str | None]] = [
    ("bad json", b'{"symbols": [', {}, 400, "bad_json", None),
    ("not utf8", b"\xff\xfe{}", {}, 400, "bad_json", None),
    ("not an object", [1, 2], {}, 422, "invalid_input", None),
    ("empty body", b"", {}, 400, "empty_body", None),
    ("deep nesting", b"[" * 100_000 + b"]" * 100_000, {}, 400, "bad_json", None),
    ("bad msgpack", b"\xc1\xc1", {"content-type": "application/msgpack"}, 400, "bad_msgpack",
     None),
    ("media type", b"<xml/>", {"content-type": "text/xml"}, 415, "unsupported_media_type", None),
    ("no positions", {"symbols": ["O"]}, {}, 422, "invalid_input", "positions"),
    ("typo field", {**GOOD, "posiitons": OK3}, {}, 422, "invalid_input", "posiitons"),
    ("both species", {**GOOD, "numbers": [8, 1, 1]}, {}, 422, "invalid_input", "numbers"),
    ("no species", {"positions": OK3}, {}, 422, "invalid_input", "numbers"),
    ("wrong shape", {"symbols": ["O", "H", "H"], "positions": [[0, 0], [1, 0], [0, 1]]}, {}, 422,
     "invalid_input", "positions"),
    ("ragged", {"symbols": ["O", "H"], "positions": [[0, 0, 0], [1, 0]]}, {}, 422,
     "invalid_input", "positions"),
    ("count mismatch", {"symbols": ["O", "H"], "positions": OK3}, {}, 422, "invalid_input",
     "positions"),
    ("strings", {"symbols": ["O"], "positions": [["a", 0, 0]]}, {}, 422, "invalid_input",
     "positions"),
    ("nan", {"symbols": ["O", "H", "H"], "positions": [[0, 0, 0], [float("nan"), 0, 0],
     [2, 0, 0]]}, {}, 422, "invalid_input", "positions.1"),
    ("inf", {"symbols": ["O", "H", "H"], "positions": [[0, 0, 0], [1, 0, 0], [0, float("inf"),
     0]]}, {}, 422, "invalid_input", "positions.2"),
    ("huge", {"symbols": ["O"], "positions": [[1e30, 0, 0]]}, {}, 422, "invalid_input",
     "positions.0"),
    ("unknown symbol", {"symbols": ["O", "Xx", "H"], "positions": OK3}, {}, 422, "invalid_input",
     "symbols.1"),
    ("unknown element", {"numbers": [8, 1, 6], "positions": OK3}, {}, 422, "unknown_element",
     "numbers.2"),
    ("Z out of range", {"numbers": [8, 1, 0], "positions": OK3}, {}, 422, "invalid_input",
     "numbers.2"),
    ("Z bool", {"numbers": [8, True, 1], "positions": OK3}, {}, 422, "invalid_input", "numbers"),
    ("overlap", {"symbols": ["O", "H", "H"], "positions": [[0, 0, 0], [0.05, 0, 0], [1, 0, 0]]},
     {}, 422, "overlapping_atoms", "positions.0"),
    ("overlap image", {**GOOD, "positions": [[0, 0, 0], [0.96, 0, 0], [4.99, 0, 0]],
     "cell": [5, 5, 5], "pbc": True}, {}, 422, "overlapping_atoms", "positions.0"),
    ("thin cell", {**GOOD, "cell": [5, 5, 0.05], "pbc": True}, {}, 422, "overlapping_atoms",
     "cell"),
    ("empty", {"symbols": [], "positions": []}, {}, 422, "empty_structure", "symbols"),
    ("singular cell", {**GOOD, "cell": [[1, 0, 0], [2, 0, 0], [0, 0, 1]], "pbc": True}, {}, 422,
     "invalid_input", "cell"),
    ("zero cell periodic", {**GOOD, "pbc": True}, {}, 422, "invalid_input", "cell"),
    ("cell shape", {**GOOD, "cell": [[1, 0], [0, 1]], "pbc": True}, {}, 422, "invalid_input",
     "cell"),
    ("cell nan", {**GOOD, "cell": [[5, 0, 0], [0, float("nan"), 0], [0, 0, 5]], "pbc": True}, {},
     422, "invalid_input", "cell.1"),
    ("pbc length", {**GOOD, "pbc": [True, False]}, {}, 422, "invalid_input", "pbc"),
    ("too dense", {"symbols": ["H"], "positions": [[0, 0, 0]], "cell": [0.3, 0.3, 0.3],
     "pbc": True}, {}, 422, "too_dense", "positions"),
    ("too many atoms", {"numbers": [1] * 3001, "positions": [[i * 1.0, 0, 0] for i in
     range(3001)]}, {}, 413, "too_many_atoms", "numbers"),
    ("unknown model", {**GOOD, "model": "nope"}, {}, 422, "unknown_model", "model"),
    ("unknown property", {**GOOD, "properties": ["polarizability"]}, {}, 422, "invalid_input",
     "properties.0"),
    ("charges", {**GOOD, "properties": ["energy", "charges"]}, {}, 422, "unsupported_property",
     "properties.1"),
    ("dipole", {**GOOD, "properties": ["dipole"]}, {}, 422, "unsupported_property",
     "properties.0"),
    ("bec", {**GOOD, "properties": ["bec"]}, {}, 422, "unsupported_property", "properties.0"),
    ("input the model does not read", {**GOOD, "arrays": {"charge_states": [0, 0, 0]}}, {}, 422,
     "invalid_input", "arrays.charge_states"),
    ("arrays not a map", {**GOOD, "arrays": [0, 0, 0]}, {}, 422, "invalid_input", "arrays"),
    ("stress non-periodic", {**GOOD, "properties": ["stress"]}, {}, 422, "invalid_input",
     "properties"),
    ("packed size", {"symbols": ["O"], "positions": {"shape": [1, 3], "dtype": "<f8",
     "data": "abc"}}, {}, 422, "invalid_input", "positions"),
]  # fmt: skip


@pytest.mark.parametrize("case", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_is_a_clear_4xx(client: httpx.Client, case: tuple) -> None:
    _name, body, headers, status, kind, field = case
    headers = {"content-type": "application/json", **headers}
    if isinstance(body, bytes):
        r = client.post("/v1/calculate", content=body, headers=headers)
    else:
        r = client.post("/v1/calculate", content=json.dumps(body), headers=headers)
    assert r.status_code == status, r.text
    reply = r.json()
    assert reply["error"] == kind, reply
    assert reply["field"] == field, reply
    assert reply["message"]
    good_request_works(client)


def test_bad_batches(client: httpx.Client) -> None:
    s = body_of(water_cluster(1, seed=5))
    bad = {"symbols": ["O", "H", "H"], "positions": [[0, 0, 0], [0, 0, 0.01], [1, 0, 0]]}
    r = client.post("/v1/calculate/batch", json={"structures": [s, s, bad]})
    assert r.status_code == 422 and r.json()["field"] == "structures.2.positions.0"
    r = client.post("/v1/calculate/batch", json={"structures": []})
    assert r.status_code == 422 and r.json()["field"] == "structures"
    r = client.post("/v1/calculate/batch", json={"structures": [s] * 17})
    assert r.status_code == 413 and r.json()["error"] == "too_many_structures"
    r = client.post("/v1/calculate/batch", json={"structures": [s, {"symbols": ["O"]}]})
    assert r.status_code == 422 and r.json()["field"] == "structures.1.positions"
    good_request_works(client)


def test_body_limit_with_and_without_content_length(client: httpx.Client) -> None:
    big = b'{"symbols": [' + b'"H",' * 400_000 + b'"H"]}'
    r = client.post("/v1/calculate", content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"] == "body_too_large"

    def chunks() -> Iterator[bytes]:  # no Content-Length: chunked transfer
        for _ in range(40):
            yield b" " * 50_000

    r = client.post("/v1/calculate", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"] == "body_too_large"
    good_request_works(client)


def test_unknown_route_and_method(client: httpx.Client) -> None:
    r = client.get("/v1/nothing")
    assert r.status_code == 404 and r.json()["error"] == "not_found"
    r = client.get("/v1/calculate")
    assert r.status_code == 405 and r.json()["error"] == "method_not_allowed"


# ------------------------------------------------------------------------ auth, limits


def test_auth_on(engine: Engine) -> None:
    app = create_app(engine, settings=HttpSettings(token="s3cret"))
    with BackgroundServer(app) as srv, httpx.Client(base_url=srv.url, timeout=30) as c:
        assert c.get("/healthz").status_code == 200
        assert c.head("/healthz").status_code == 200
        body = body_of(water_cluster(1, seed=4))
        for path in ("/v1/models", "/metrics", "/v1/ipi/connections", "/docs"):
            r = c.get(path)
            assert r.status_code == 401, path
            assert r.headers["www-authenticate"].startswith("Bearer")
        # readiness is open to probes (which cannot send a token), without details
        assert c.get("/readyz").json() == {"status": "ready"}
        ok = {"authorization": "Bearer s3cret"}
        assert c.get("/readyz", headers=ok).json()["models"] == list(engine.model_names)
        r = c.post("/v1/calculate", json=body)
        assert r.status_code == 401 and r.json()["error"] == "unauthorized"
        bad = {"authorization": "Bearer wrong"}
        assert c.post("/v1/calculate", json=body, headers=bad).status_code == 401
        ok = {"authorization": "Bearer s3cret"}
        assert c.post("/v1/calculate", json=body, headers=ok).status_code == 200
        assert c.get("/v1/models", headers=ok).status_code == 200


def test_auth_off_needs_no_header(client: httpx.Client) -> None:
    assert client.get("/v1/models").status_code == 200


def test_timeout_is_504(engine: Engine) -> None:
    app = create_app(engine, settings=HttpSettings(request_timeout_s=1e-4))
    s = water_cluster(64, seed=6, box=12.5)
    with BackgroundServer(app) as srv, httpx.Client(base_url=srv.url, timeout=30) as c:
        r = c.post("/v1/calculate", json=body_of(s))
        assert r.status_code == 504 and r.json()["error"] == "timeout"
        assert c.get("/healthz").status_code == 200


def test_not_ready_is_503(model_file: Path) -> None:
    engine = Engine(model_file)  # never started
    try:
        with BackgroundServer(create_app(engine)) as srv, httpx.Client(base_url=srv.url) as c:
            assert c.get("/healthz").status_code == 200
            r = c.get("/readyz")
            assert r.status_code == 503 and r.headers["retry-after"]
            r = c.post("/v1/calculate", json=GOOD)
            assert r.status_code == 503 and r.json()["error"] == "not_ready"
    finally:
        engine.close()


# ------------------------------------------------------------------------ concurrency


def test_64_concurrent_clients(server: BackgroundServer, model: Any) -> None:
    structures = [water_cluster(1 + i % 5, seed=100 + i, box=None) for i in range(64)]
    expected = [model.predict([s])[0] for s in structures]

    async def main() -> list[dict[str, Any]]:
        limits = httpx.Limits(max_connections=64)
        async with httpx.AsyncClient(base_url=server.url, timeout=60, limits=limits) as c:

            async def one(i: int) -> dict[str, Any]:
                binary = i % 2 == 1
                headers = {"accept": "application/msgpack"} if binary else {}
                r = await c.post("/v1/calculate", json=body_of(structures[i]), headers=headers)
                assert r.status_code == 200, r.text
                if binary:
                    out = msgpack.unpackb(r.content)
                    out["forces"] = unpack(out["forces"])
                    return out  # type: ignore[no-any-return]
                return r.json()  # type: ignore[no-any-return]

            return await asyncio.gather(*(one(i) for i in range(64)))

    results = asyncio.run(main())
    for got, want in zip(results, expected, strict=True):
        assert_matches(got, want)


# ------------------------------------------------------------------------ metrics


def scrape(client: httpx.Client) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(client.get("/metrics").text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def test_metrics_count_what_happened(client: httpx.Client) -> None:
    before = scrape(client)
    s = water_cluster(3, seed=20)
    for _ in range(3):
        assert client.post("/v1/calculate", json=body_of(s)).status_code == 200
    batch = {"structures": [body_of(s), body_of(s)]}
    assert client.post("/v1/calculate/batch", json=batch).status_code == 200
    assert client.post("/v1/calculate", json={**GOOD, "model": "nope"}).status_code == 422
    bad_json = client.post("/v1/calculate", content=b"{", headers={"content-type": "text/json"})
    assert bad_json.status_code == 415
    r = client.post("/v1/calculate", content=b"{", headers={"content-type": "application/json"})
    assert r.status_code == 400
    after = scrape(client)

    def delta(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    route = "/v1/calculate"
    assert delta("cace_http_requests_total", route=route, method="POST", status="200") == 3
    assert delta("cace_http_requests_total", route=route, method="POST", status="422") == 1
    assert delta("cace_http_requests_total", route=route, method="POST", status="400") == 1
    assert delta("cace_http_requests_total", route=route, method="POST", status="415") == 1
    assert (
        delta("cace_http_requests_total", route="/v1/calculate/batch", method="POST", status="200")
        == 1
    )
    assert delta("cace_http_request_duration_seconds_count", route=route, method="POST") == 6
    assert delta("cace_http_errors_total", kind="unknown_model") == 1
    assert delta("cace_http_errors_total", kind="bad_json") == 1
    assert delta("cace_http_structures_total", format="json") == 5
    assert delta("cace_http_atoms_total", format="json") == 5 * 9
    assert delta("cace_engine_requests_total") == 4
    assert delta("cace_engine_structures_total") == 5
    assert delta("cace_engine_atoms_total") == 45
    assert delta("cace_engine_latency_seconds_count") == 4
    assert after[("cace_engine_ready", ())] == 1
    assert ("cace_engine_queue_depth", ()) in after
    assert any(k[0] == "cace_engine_batch_structures_bucket" for k in after)


# ------------------------------------------------------------------------ scheduling, admission


def test_a_small_request_overtakes_queued_bulk_requests(model: Any) -> None:
    """Through uvicorn: a 3-atom request sent after three bulk requests are queued (and
    one is on the device) is answered right after the one on the device."""
    import threading

    from tests.test_engine import Faulty, make_structure

    faulty = Faulty(model)
    cfg = EngineSettings(batch_wait_ms=0, max_batch_atoms=32, small_request_atoms=10)
    order: list[str] = []

    def post(url: str, name: str, s: Structure) -> None:
        r = httpx.post(url + "/v1/calculate", json=body_of(s), timeout=60)
        assert r.status_code == 200, r.text
        order.append(name)

    with Engine(faulty, settings=cfg) as engine, BackgroundServer(create_app(engine)) as srv:
        faulty.block()
        threads = []
        for i in range(4):
            big = make_structure(40, seed=930 + i, periodic=False)
            threads.append(threading.Thread(target=post, args=(srv.url, f"big{i}", big)))
            threads[-1].start()
            if i == 0:
                assert faulty.entered.wait(30)
            deadline = time.monotonic() + 30
            while len(engine._queue) < i:  # queued in this order
                assert time.monotonic() < deadline
                time.sleep(0.005)
        small = make_structure(3, seed=939, periodic=False)
        threads.append(threading.Thread(target=post, args=(srv.url, "small", small)))
        threads[-1].start()
        while len(engine._queue) < 4:
            time.sleep(0.005)
        faulty.gate.set()
        for t in threads:
            t.join(60)
    assert sorted(order) == ["big0", "big1", "big2", "big3", "small"], order
    # The device's order is what the lanes decide (the order in which the clients
    # receive their answers races between threads): one model call per request, the
    # 3-atom request's right after the bulk request that was on the device.
    # (the calls before these five are the engine's warm-up)
    calls, pairs = faulty.calls[-5:], faulty.pairs[-5:]
    assert calls == [1] * 5, faulty.calls
    assert pairs.index(min(pairs)) == 1 and pairs.count(min(pairs)) == 1, pairs


JSON_TYPE = {"content-type": "application/json"}


def test_admission_by_body_bytes(engine: Engine) -> None:
    """A client holding a large body counts against every other client's budget."""
    import socket

    app = create_app(engine, settings=HttpSettings(max_request_bytes=1500, max_pending_bytes=2000))
    body = json.dumps(body_of(water_cluster(1, seed=5))).encode()
    with BackgroundServer(app) as srv, httpx.Client(base_url=srv.url, timeout=30) as c:
        held = socket.create_connection(("127.0.0.1", srv.port))
        held.sendall(
            b"POST /v1/calculate HTTP/1.1\r\nHost: 127.0.0.1\r\ncontent-type: application/json\r\n"
            b"Content-Length: 1500\r\n\r\n{"
        )
        deadline = time.monotonic() + 10
        while True:  # until the server has read the head and reserved the 1500 bytes
            r = c.post("/v1/calculate", content=body + b" " * 600, headers=JSON_TYPE)
            if r.status_code == 503 or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert r.status_code == 503 and r.json()["error"] == "busy", r.text
        assert r.headers["retry-after"] == "1"
        assert c.post("/v1/calculate", content=body, headers=JSON_TYPE).status_code == 200
        held.close()
        deadline = time.monotonic() + 10
        while (
            c.post("/v1/calculate", content=body + b" " * 600, headers=JSON_TYPE).status_code != 200
        ):
            assert time.monotonic() < deadline
            time.sleep(0.05)


# ------------------------------------------------------------------------ large JSON bodies


@pytest.fixture(scope="module")
def process_parsing_server(engine: Engine) -> Iterator[BackgroundServer]:
    """Every JSON body parsed in the worker process (as large ones are by default)."""
    settings = HttpSettings(**LIMITS, process_body_bytes=1)
    with BackgroundServer(create_app(engine, settings=settings)) as srv:
        yield srv


@pytest.mark.parametrize(
    "body",
    [
        body_of(water_cluster(30, seed=21, box=10.0)),  # arrays packed in the worker
        body_of(water_cluster(2, seed=22)),  # small arrays stay lists
        {"numbers": [8, 1, 1], "positions": [[0, 0, 0], [0.96, 0, 0], [-0.24, 0.93, True]]},
        {"numbers": [8, 1, True], "positions": [[0, 0, 0], [0.96, 0, 0], [-0.24, 0.93, 0]]},
        {"numbers": [8, 1, 2**70], "positions": [[0, 0, 0], [0.96, 0, 0], [-0.24, 0.93, 0]]},
        {"numbers": [8, 1, 1], "positions": [[0.5] * 3] * 299 + [[0.5, 0.5]]},
        {"numbers": [8] * 300, "positions": [[float("nan")] * 3] * 300},
        {"structures": [body_of(water_cluster(30, seed=23))] * 2},
        [1, 2, 3],
    ],
    ids=["packed", "small", "bool", "bool-number", "big-int", "ragged", "nan", "batch", "array"],
)
def test_json_parsed_in_a_process_answers_as_on_a_thread(
    server: BackgroundServer, process_parsing_server: BackgroundServer, body: Any
) -> None:
    path = "/v1/calculate/batch" if isinstance(body, dict) and "structures" in body else None
    content = json.dumps(body).encode()
    replies = []
    for srv in (server, process_parsing_server):
        r = httpx.post(
            srv.url + (path or "/v1/calculate"),
            content=content,
            headers={"content-type": "application/json"},
            timeout=60,
        )
        replies.append((r.status_code, r.json()))
    (status, want), (got_status, got) = replies
    assert got_status == status, (want, got)
    if status == 200:
        assert got == want
    else:
        assert (got["error"], got["field"]) == (want["error"], want["field"])


@pytest.mark.parametrize(
    "content", [b'{"numbers": [8', b"\xff\xfe", b"[" * 100_000, b'{"model": ' + b"9" * 5000 + b"}"]
)
def test_unreadable_json_parsed_in_a_process_is_a_4xx(
    process_parsing_server: BackgroundServer, content: bytes
) -> None:
    r = httpx.post(
        process_parsing_server.url + "/v1/calculate",
        content=content,
        headers={"content-type": "application/json"},
        timeout=60,
    )
    assert 400 <= r.status_code < 500, r.text
