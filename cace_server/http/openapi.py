"""The OpenAPI document: error replies and the bodies of routes that read their body themselves.

Routes that accept JSON or msgpack read the raw body (:meth:`HttpState.parse`), so
FastAPI cannot see their request model; :func:`request_body` declares it and
:func:`install_openapi` adds its schema to the document's components.

The document tells what this server accepts, so that a client generated from it
cannot send what is refused for a reason one field can show: the served model
names, their elements, outputs and per-atom inputs, and this server's limits are
written into the request schemas (:func:`served_limits`); 401 and the bearer scheme
are documented on every protected route when a token is configured. Only what no
JSON schema can say (the rows of ``positions`` match the species, atoms do not
overlap, an optimiser's own arguments) is left to a 422 naming the field.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, get_args

from ase.data import chemical_symbols
from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

from cace_server.http.schemas import ErrorResponse, Property

if TYPE_CHECKING:
    from cace_server.http.state import HttpState

# Request models declared through request_body(), by name (filled as routes are defined).
_BODY_MODELS: dict[str, type[BaseModel]] = {}


# Every 429 and 503 reply carries it (errors.ApiError).
_RETRY = {
    "headers": {
        "Retry-After": {
            "description": "seconds to wait before retrying",
            "schema": {"type": "integer"},
        }
    }
}


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """The error replies a route documents, all with the one error body."""
    return {
        code: {"model": ErrorResponse, **(_RETRY if code in (429, 503) else {})} for code in codes
    }


def request_body(model: type[BaseModel], description: str) -> dict[str, Any]:
    """OpenAPI request body for a route that reads its body itself (JSON or msgpack)."""
    _BODY_MODELS[model.__name__] = model
    ref = {"$ref": f"#/components/schemas/{model.__name__}"}
    return {
        "requestBody": {
            "required": True,
            "description": description,
            "content": {"application/json": {"schema": ref}},
        }
    }


_ERROR_REF = {"$ref": "#/components/schemas/ErrorResponse"}
_UNAUTHORIZED = {
    "description": "missing or wrong bearer token",
    "content": {"application/json": {"schema": _ERROR_REF}},
    "headers": {"WWW-Authenticate": {"schema": {"type": "string"}}},
}
# Request components and their fields that the served models and limits constrain.
_MODEL_FIELDS = ("CalculateRequest", "BatchRequest", "JobIn", "IpiConnectRequest")
_STRUCTURES = ("CalculateRequest", "StructureIn", "JobStructureIn")
_SPECIES = (*_STRUCTURES, "IpiConnectRequest")
_PROPERTY_ORDER: tuple[str, ...] = get_args(Property)


def _branch(prop: dict[str, Any], kind: str) -> dict[str, Any] | None:
    """The part of a field's schema of JSON type ``kind`` (a nullable field is an anyOf)."""
    for branch in prop.get("anyOf", [prop]):
        if branch.get("type") == kind:
            return branch
    return None


def _constrain(
    components: dict[str, Any], names: tuple[str, ...], field: str, kind: str, **extra: Any
) -> None:
    for name in names:
        prop = components.get(name, {}).get("properties", {}).get(field)
        branch = None if prop is None else _branch(prop, kind)
        if branch is not None:
            branch.update(extra)


def served_limits(schema: dict[str, Any], state: HttpState) -> None:
    """Write the served models and this server's limits into the request schemas."""
    components = schema["components"]["schemas"]
    engine, settings = state.engine, state.settings
    names = list(engine.model_names)
    _constrain(components, _MODEL_FIELDS, "model", "string", enum=names)
    for path in ("/v1/models/{name}", "/v1/models/{name}/reload"):
        for operation in schema["paths"].get(path, {}).values():
            for parameter in operation.get("parameters", []):
                if parameter.get("name") == "name":
                    parameter["schema"] = {**parameter["schema"], "enum": names}
    atoms = settings.max_atoms
    for field in ("numbers", "symbols", "positions"):
        _constrain(components, _SPECIES, field, "array", maxItems=atoms)
    fixed = components.get("JobStructureIn", {}).get("properties", {}).get("fixed")
    branch = None if fixed is None else _branch(fixed, "array")
    if branch is not None:  # atom indices
        branch["items"] = {**branch["items"], "maximum": atoms - 1}
    batch, jobs = settings.max_structures, state.jobs.settings
    _constrain(components, ("BatchRequest",), "structures", "array", maxItems=batch)
    _constrain(components, ("JobIn",), "structures", "array", maxItems=jobs.max_job_structures)
    for params in ("RelaxParams", "MDParams"):
        steps = components.get(params, {}).get("properties", {}).get("steps")
        if steps is not None:
            steps["maximum"] = min(steps.get("maximum", jobs.max_job_steps), jobs.max_job_steps)
    ipi_clients = components.get("IpiConnectRequest", {}).get("properties", {}).get("clients")
    if ipi_clients is not None:
        ipi_clients["maximum"] = settings.max_ipi_clients
    infos = list(engine.models.values())  # empty until the models are loaded
    if not infos:
        return
    elements = sorted({z for info in infos for z in info.elements})
    outputs = {o for info in infos for o in info.outputs}
    inputs = sorted({i for info in infos for i in info.required_inputs})
    for field, items in (
        ("numbers", {"type": "integer", "enum": elements}),
        ("symbols", {"type": "string", "enum": [chemical_symbols[z] for z in elements]}),
    ):
        _constrain(components, _SPECIES, field, "array", items=items)
    offered = [p for p in _PROPERTY_ORDER if p in outputs]
    _constrain(
        components,
        ("CalculateRequest", "BatchRequest"),
        "properties",
        "array",
        items={"type": "string", "enum": offered},
    )
    names_of_inputs = {"propertyNames": {"enum": inputs}} if inputs else {"maxProperties": 0}
    _constrain(components, _SPECIES, "arrays", "object", **names_of_inputs)


def _document_auth(schema: dict[str, Any], token: bool, open_paths: frozenset[str]) -> None:
    """401 and the bearer scheme on every protected route when a token is configured;
    no 401 anywhere when none is (nothing then answers it)."""
    if token:
        schema["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
    for path, operations in schema["paths"].items():
        for operation in operations.values():
            responses = operation["responses"]
            if token and path not in open_paths:
                responses["401"] = _UNAUTHORIZED
                operation["security"] = [{"bearer": []}]
            else:
                responses.pop("401", None)


def _reply(description: str, retry: bool = False) -> dict[str, Any]:
    out: dict[str, Any] = {
        "description": description,
        "content": {"application/json": {"schema": _ERROR_REF}},
    }
    if retry:
        out.update(_RETRY)
    return out


def _middleware_replies(schema: dict[str, Any]) -> None:
    """What the middleware and the protocol answer before any route runs
    (middleware.py, guards.py, timeouts.py): a repeated single header, ambiguous
    framing or a Host not allowed (400) on every route; on those that change state, an
    Origin not allowed (403), and, where they take a body, a body over the limit (413),
    one too slow (408), no or a browser's "simple" Content-Type (415) and a full budget
    of bodies in flight (503)."""
    for operations in schema["paths"].values():
        for method, operation in operations.items():
            responses = operation["responses"]
            responses.setdefault(
                "400",
                _reply("bad request: a repeated header, ambiguous framing, a Host not allowed"),
            )
            if method not in ("get", "head", "options"):
                responses.setdefault("403", _reply("an Origin not allowed (--allowed-hosts)"))
                responses.setdefault("408", _reply("the body came too slowly"))
                responses.setdefault("413", _reply("request body over the server's limit"))
                responses.setdefault("415", _reply("no Content-Type, or one a browser sends"))
                responses.setdefault("503", _reply("busy or not ready", retry=True))


def _errors_in_one_shape(schema: dict[str, Any]) -> None:
    """Every error is an :class:`ErrorResponse` in JSON (errors.install_handlers), on
    routes that stream another media type too; FastAPI documents its own 422 body for
    parameter errors and the route's media type for each error."""
    for operations in schema["paths"].values():
        for operation in operations.values():
            for code, reply in operation["responses"].items():
                if code[0] in "45" and "content" in reply:
                    reply["content"] = {"application/json": {"schema": _ERROR_REF}}
    components = schema["components"]["schemas"]
    for name in ("HTTPValidationError", "ValidationError"):
        components.pop(name, None)


def install_openapi(app: FastAPI, state: HttpState, open_paths: frozenset[str]) -> None:
    """Serve ``app``'s document with the declared request bodies, rebuilt whenever the
    served models change (a swap may change their elements and outputs)."""
    built: dict[str, Any] = {}

    def served_key() -> str:
        infos = state.engine.models
        return repr(
            [(n, i.elements, i.outputs, i.required_inputs) for n, i in sorted(infos.items())]
        )

    def openapi() -> dict[str, Any]:
        key = served_key()
        if app.openapi_schema is None or built.get("key") != key:
            schema = get_openapi(
                title=app.title,
                version=app.version,
                description=app.description,
                routes=app.routes,
            )
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for name, model in _BODY_MODELS.items():
                body = model.model_json_schema(ref_template="#/components/schemas/{model}")
                components.update(body.pop("$defs", {}))
                components[name] = body
            served_limits(schema, state)
            _document_auth(schema, state.settings.token is not None, open_paths)
            _middleware_replies(schema)
            _errors_in_one_shape(schema)
            app.openapi_schema = schema
            built["key"] = key
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
