"""The OpenAPI document tells the truth about the server that serves it.

- With a token configured, every route but the open probes documents 401 and the
  bearer scheme (and answers 401 without the token); without one, none documents it.
- ``OPTIONS`` on a path answers 204 with ``Allow`` listing exactly its methods; an
  unsupported method gets 405 with the same ``Allow`` (RFC 9110).
- What the server refuses for a reason one field shows (an unknown model name, an
  element the model lacks, two pbc flags, a coordinate beyond the bound, an i-PI run
  without atoms, ...) is outside the document's schema, so a generated client cannot
  send it.
- schemathesis (slow suite): its default checks, response-schema and status-code
  conformance among them, over every operation, with and without a token, schema-valid
  and schema-breaking data, fixed seed: no failure.

Real uvicorn servers on 127.0.0.1; every server a test starts, it stops.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest

from cace_server.engine import Engine, EngineSettings
from cace_server.http import BackgroundServer, HttpSettings, create_app
from cace_server.jobs import JobSettings
from cace_server.model import random_model, save_model

TOKEN = "conformance-token"
WATER = {
    "symbols": ["O", "H", "H"],
    "positions": [[0.0, 0.0, 0.0], [0.96, 0.0, 0.0], [-0.24, 0.93, 0.0]],
}
OPEN_PATHS = {"/healthz", "/readyz"}
HTTP_METHODS = {"get", "put", "post", "delete", "patch", "head", "options", "trace"}


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    path: Path = save_model(random_model((1, 8), seed=4), tmp_path_factory.mktemp("oa") / "m.st")
    with Engine(path, settings=EngineSettings(dtype="float64", batch_wait_ms=0.5)) as e:
        yield e


#: jobs a fuzzer starts stay short (and the document says so); relaxations default to
#: 1000 steps
JOBS = JobSettings(max_job_steps=1000, max_job_structures=64, max_running_jobs=1)


def _settings(token: str | None, **extra: Any) -> HttpSettings:
    return HttpSettings(token=token, max_atoms=200, max_structures=4, request_timeout_s=20, **extra)


@pytest.fixture(scope="module", params=[None, TOKEN], ids=["no-token", "token"])
def server(request: pytest.FixtureRequest, engine: Engine) -> Iterator[tuple[str, str | None]]:
    token = request.param
    with BackgroundServer(create_app(engine, settings=_settings(token), jobs=JOBS)) as srv:
        yield srv.url, token


def _headers(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


def _document(url: str, token: str | None) -> dict[str, Any]:
    reply = httpx.get(f"{url}/openapi.json", headers=_headers(token))
    assert reply.status_code == 200
    return reply.json()


def _operations(doc: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path, item in doc["paths"].items():
        for method, operation in item.items():
            if method in HTTP_METHODS:
                yield path, method, operation


def _concrete(path: str) -> str:
    return path.replace("{name}", "m").replace("{job_id}", "x").replace("{group_id}", "x")


# ------------------------------------------------------------------------------ 401


def test_401_is_documented_exactly_where_the_token_is_required(
    server: tuple[str, str | None],
) -> None:
    url, token = server
    doc = _document(url, token)
    schemes = doc.get("components", {}).get("securitySchemes", {})
    assert (schemes == {"bearer": {"type": "http", "scheme": "bearer"}}) == bool(token)
    checked = 0
    for path, method, operation in _operations(doc):
        protected = token is not None and path not in OPEN_PATHS
        assert ("401" in operation["responses"]) == protected, (method, path)
        assert ("security" in operation) == protected, (method, path)
        if protected and method == "get" and "{" not in path:
            # documented, and true: without the token the route answers 401
            reply = httpx.get(f"{url}{path}")
            assert reply.status_code == 401, path
            assert reply.json()["error"] == "unauthorized"
            checked += 1
    assert checked >= 3 or token is None


# --------------------------------------------------------------------------- OPTIONS


def test_options_and_405_list_exactly_the_methods_of_the_path(
    server: tuple[str, str | None],
) -> None:
    url, token = server
    doc = _document(url, token)
    with httpx.Client(base_url=url, headers=_headers(token)) as client:
        for path, item in doc["paths"].items():
            documented = {m.upper() for m in item if m in HTTP_METHODS}
            expected = documented | {"OPTIONS"} | ({"HEAD"} if path == "/healthz" else set())
            reply = client.options(_concrete(path))
            assert reply.status_code == 204, (path, reply.status_code, reply.text)
            assert reply.content == b""
            allow = {m.strip() for m in reply.headers["allow"].split(",")}
            assert allow == expected, path
            for method in ("PATCH", "TRACE"):
                reply = client.request(method, _concrete(path))
                assert reply.status_code == 405, (method, path)
                assert {m.strip() for m in reply.headers["allow"].split(",")} == expected
                assert reply.json()["error"] == "method_not_allowed"
        # a path that does not exist has no methods to list
        assert client.options("/v1/nothing-here").status_code == 404
        assert client.get("/readyz").status_code == 200


# ------------------------------------------------------- refused values are schema-invalid


def _schema_errors(doc: dict[str, Any], component: str, body: Any) -> list[str]:
    schema = {"$ref": f"#/components/schemas/{component}", "components": doc["components"]}
    validator = jsonschema.Draft202012Validator(schema)
    return [error.message for error in validator.iter_errors(body)]


def _water(**change: Any) -> dict[str, Any]:
    return {**WATER, **change}


# (route, request component, body, expected status, expected error field)
REFUSED = [
    ("/v1/calculate", "CalculateRequest", _water(model="m" * 200), 422, "model"),
    ("/v1/calculate", "CalculateRequest", _water(model="other"), 422, "model"),
    ("/v1/calculate", "CalculateRequest", _water(symbols=["O", "H", "C"]), 422, "symbols.2"),
    (
        "/v1/calculate",
        "CalculateRequest",
        {"numbers": [8, 1, 6], "positions": WATER["positions"]},
        422,
        "numbers.2",
    ),
    ("/v1/calculate", "CalculateRequest", _water(symbols=[]), 422, "symbols"),
    ("/v1/calculate", "CalculateRequest", _water(numbers=[8, 1, 1]), 422, "numbers"),
    ("/v1/calculate", "CalculateRequest", {"positions": WATER["positions"]}, 422, "numbers"),
    ("/v1/calculate", "CalculateRequest", _water(cell=[9.0, 9.0], pbc=True), 422, "cell"),
    ("/v1/calculate", "CalculateRequest", _water(cell=[9.0] * 3, pbc=[True, True]), 422, "pbc"),
    (
        "/v1/calculate",
        "CalculateRequest",
        _water(positions=[[0.0, 0.0, 0.0], [0.96, 0.0, 0.0], [2.0e4, 0.0, 0.0]]),
        422,
        "positions.2",
    ),
    ("/v1/calculate", "CalculateRequest", _water(properties=["dipole"]), 422, "properties.0"),
    (
        "/v1/calculate",
        "CalculateRequest",
        _water(arrays={"charge_states": [0, 0, 0]}),
        422,
        "arrays.charge_states",
    ),
    ("/v1/calculate/batch", "BatchRequest", {"structures": [WATER] * 5}, 413, "structures"),
    (
        "/v1/jobs",
        "JobIn",
        {"kind": "relax", "structures": [_water(masses=[16.0, 0.0, 1.0])]},
        422,
        "structures.0.masses",
    ),
    (
        "/v1/jobs",
        "JobIn",
        {"kind": "relax", "structures": [_water(fixed=[-1])]},
        422,
        "structures.0.fixed",
    ),
    (
        "/v1/jobs",
        "JobIn",
        {"kind": "relax", "structures": [WATER], "relax": {"optimizer": "newton"}},
        422,
        "relax.optimizer",
    ),
    (
        "/v1/jobs",
        "JobIn",
        {"kind": "md", "structures": [WATER], "md": {"steps": 1001}},
        413,
        "md.steps",
    ),
]


def test_what_the_server_refuses_for_one_field_is_outside_the_schema(engine: Engine) -> None:
    with BackgroundServer(create_app(engine, settings=_settings(None), jobs=JOBS)) as srv:
        doc = _document(srv.url, None)
        with httpx.Client(base_url=srv.url, timeout=30) as client:
            # the validator is not refusing everything: the plain request is valid and served
            assert _schema_errors(doc, "CalculateRequest", WATER) == []
            assert client.post("/v1/calculate", json=WATER).status_code == 200
            for route, component, body, status, field in REFUSED:
                reply = client.post(route, json=body)
                assert (reply.status_code, reply.json()["field"]) == (status, field), body
                assert _schema_errors(doc, component, body), (route, body)


def test_an_ipi_attach_without_atoms_is_outside_the_schema(engine: Engine) -> None:
    """The issue's case: attach with empty symbols was schema-valid and refused (422)."""
    settings = _settings(None, allow_ipi_control=True)
    with BackgroundServer(create_app(engine, settings=settings)) as srv:
        doc = _document(srv.url, None)
        cases = [
            ({"address": "unix:oa-none", "symbols": []}, "symbols"),
            ({"address": "unix:oa-none", "numbers": []}, "numbers"),
            ({"address": "unix:oa-none", "symbols": ["O"], "clients": 65}, "clients"),
            ({"address": "localhost", "symbols": ["O"]}, "address"),
            ({"address": "localhost:99999", "symbols": ["O"]}, "address"),
            (
                {"address": "unix:oa-none", "symbols": ["O"], "sockets_prefix": "ipi_"},
                "sockets_prefix",
            ),
        ]
        with httpx.Client(base_url=srv.url) as client:
            for body, field in cases:
                reply = client.post("/v1/ipi/connections", json=body)
                assert reply.status_code == 422, (body, reply.text)
                assert reply.json()["field"] == field
                assert _schema_errors(doc, "IpiConnectRequest", body), body
            assert client.get("/v1/ipi/connections").json() == {"groups": []}


def test_the_document_follows_a_served_model_set(engine: Engine) -> None:
    """Model names, elements and outputs in the document are the served ones."""
    with BackgroundServer(create_app(engine, settings=_settings(None), jobs=JOBS)) as srv:
        doc = _document(srv.url, None)
    props = doc["components"]["schemas"]["CalculateRequest"]["properties"]
    model = next(b for b in props["model"]["anyOf"] if b.get("type") == "string")
    assert model["enum"] == list(engine.model_names)
    numbers = next(b for b in props["numbers"]["anyOf"] if b.get("type") == "array")
    assert numbers["items"]["enum"] == [1, 8]
    offered = next(b for b in props["properties"]["anyOf"] if b.get("type") == "array")
    info = engine.models[engine.default_model]
    assert set(offered["items"]["enum"]) == set(info.outputs)
    assert "HTTPValidationError" not in json.dumps(doc)


# ------------------------------------------------------------------------ schemathesis


schemathesis = pytest.importorskip("schemathesis")

EXAMPLES = 30
#: Schema-valid bodies may still break a rule between fields that no JSON schema can
#: state (positions rows match the species, atoms do not overlap, a stress request
#: needs a periodic cell, an optimiser's own arguments, a thermostat's temperature):
#: those few answer 422 naming the field, and positive_data_acceptance takes 422 for
#: them. ``one_field_refusals_are_in_the_schema`` keeps that honest.
CROSS_FIELD_ERRORS = ("optimizer_args", "temperature_K", "relax", "md")
#: 413 is how this server refuses too many atoms or structures (a schema maxItems).
REJECTED = ["400", "401", "403", "404", "405", "406", "409", "413", "415", "422", "428", "429"]


def one_field_refusals_are_in_the_schema(ctx: Any, response: Any, case: Any) -> bool | None:
    """A schema-valid request refused with 422 broke a rule between fields, never one
    a field's schema states: not the model name, not an element, not a pydantic field
    constraint (those reply with the list ``errors``), but a cross-field validator."""
    meta = case.meta
    if meta is None or meta.generation.mode != schemathesis.GenerationMode.POSITIVE:
        return None
    if response.status_code != 422:
        return None
    body = json.loads(response.content)
    assert body["field"] != "model", body
    assert body["error"] != "unknown_element", body
    for problem in body.get("errors") or []:
        assert problem["field"].split(".")[-1] in CROSS_FIELD_ERRORS, body
    return True


def _config() -> Any:
    from schemathesis.config import SchemathesisConfig

    return SchemathesisConfig.from_dict(
        {
            "seed": 29,
            "checks": {
                "positive_data_acceptance": {
                    "expected-statuses": [
                        *("2xx", "3xx", "401", "403", "404", "409", "422", "429", "5xx")
                    ]
                },
                "negative_data_rejection": {"expected-statuses": REJECTED},
            },
        }
    )


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_schemathesis_default_checks_pass(server: tuple[str, str | None], mode: str) -> None:
    from hypothesis import HealthCheck, given, settings
    from hypothesis.errors import Unsatisfiable

    url, token = server
    api = schemathesis.openapi.from_url(
        f"{url}/openapi.json", config=_config(), headers=_headers(token)
    )
    operations = [result.ok() for result in api.get_all_operations()]
    assert len(operations) >= 15
    failures: list[str] = []
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
            case.call_and_validate(
                base_url=url,
                headers=_headers(token),
                additional_checks=[one_field_refusals_are_in_the_schema],
                timeout=30,
            )

        try:
            check()
        except Unsatisfiable:  # no schema-breaking input exists (no parameters, no body)
            assert mode == "negative", operation.label
        except Exception as exc:  # every operation is tried; all failures are reported
            failures.append(f"{operation.label}: {exc}")
    assert not failures, "\n\n".join(failures)
    assert httpx.get(f"{url}/readyz", headers=_headers(token)).status_code == 200


@pytest.mark.slow
def test_schemathesis_cli_coverage_phase_passes(
    server: tuple[str, str | None], tmp_path: Path
) -> None:
    """The CLI's coverage phase adds what the strategies above do not send: boundary
    values of every constraint, methods the path lacks (405 with Allow) and OPTIONS."""
    import shutil
    import subprocess
    import sys

    url, token = server
    positive = ["2xx", "3xx", "401", "403", "404", "409", "422", "429", "5xx"]
    config = tmp_path / "schemathesis.toml"
    config.write_text(
        "[checks.positive_data_acceptance]\n"
        f"expected-statuses = {json.dumps(positive)}\n"
        "[checks.negative_data_rejection]\n"
        f"expected-statuses = {json.dumps(REJECTED)}\n"
    )
    cli = shutil.which("schemathesis", path=str(Path(sys.executable).parent))
    assert cli is not None
    command = [
        cli,
        "--no-color",
        "--config-file",
        str(config),
        "run",
        f"{url}/openapi.json",
        "--phases",
        "examples,coverage",
        "--checks",
        "all",
        "--seed",
        "29",
        "--max-examples",
        str(EXAMPLES),
        "--workers",
        "1",
    ]
    if token:
        command += ["--header", f"Authorization: Bearer {token}"]
    proc = subprocess.run(
        command, cwd=tmp_path, capture_output=True, text=True, timeout=420, check=False
    )
    report = proc.stdout
    start = min(
        (i for i in (report.find("= ERRORS ="), report.find("= FAILURES =")) if i >= 0), default=0
    )
    assert proc.returncode == 0, report[max(start - 200, 0) : start + 8000] + proc.stderr[-2000:]
