"""The FastAPI application: routes only; parsing, checks and formats live next door.

``create_app(engine, ipi_pool, settings)`` builds the app around an engine the
caller owns (started before, closed after); the app owns only the i-PI groups
created through it, which it stops on shutdown.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from ase.data import chemical_symbols
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from cace_server import __version__
from cace_server.engine import Engine, EngineError, ModelInfo
from cace_server.http import codec
from cace_server.http.errors import ApiError, from_engine_error, from_validation_error, invalid
from cace_server.http.ipi import IpiGroups
from cace_server.http.metrics import HttpMetrics
from cace_server.http.middleware import BearerAuth, BodyLimit, InFlight, Observe
from cace_server.http.schemas import (
    BatchRequest,
    BatchResponse,
    CalculateRequest,
    CalculateResponse,
    ErrorResponse,
    IpiConnectRequest,
    IpiGroup,
    IpiGroupsResponse,
    ModelsResponse,
)
from cace_server.http.settings import HttpSettings
from cace_server.http.validate import (
    build_structure,
    check_elements,
    check_properties,
    check_stress,
    per_atom_energies,
    read_inputs,
    read_species,
)
from cace_server.ipi import DriverPool
from cace_server.outputs import Outputs
from cace_server.structures import Prediction, Structure, voigt
from cace_server.transcode import ProcessParser

logger = logging.getLogger("cace_server.http")


# Bodies above this are parsed and checked on a worker thread, not on the event loop.
_THREAD_BODY_BYTES = 64 * 1024


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    return {code: {"model": ErrorResponse} for code in codes}


def result_dict(pred: Prediction, n: int, props: Outputs, binary: bool) -> dict:
    out: dict[str, Any] = {"n_atoms": n, "energy": pred.energy, "free_energy": pred.energy}
    if "forces" in props:
        out["forces"] = codec.array_out(pred.forces, binary)
    if "stress" in props and pred.stress is not None:
        out["stress"] = voigt(pred.stress).tolist()
        out["stress_tensor"] = pred.stress.tolist()
        out["virial"] = None if pred.virial is None else pred.virial.tolist()
    if "energies" in props:
        out["energies"] = codec.array_out(pred.energies, binary)
    if "charges" in props:
        out["charges"] = codec.array_out(pred.charges, binary)
    if "dipole" in props:
        out["dipole"] = None if pred.dipole is None else pred.dipole.tolist()
    if "bec" in props:
        out["bec"] = codec.array_out(pred.bec, binary)
    return out


class _Api:
    """The routes' shared state: engine, settings, metrics, i-PI groups, digests."""

    def __init__(self, engine: Engine, groups: IpiGroups, settings: HttpSettings) -> None:
        self.engine = engine
        self.groups = groups
        self.settings = settings
        self.metrics = HttpMetrics(engine, groups.states)
        self.parser = ProcessParser()
        self._digests: dict[str, str | None] = {}

    async def close(self) -> None:
        """What the app owns: the i-PI groups created through it, the parser process."""
        await self.groups.close()
        self.parser.close()

    # -- helpers ---------------------------------------------------------------------------
    def model(self, name: str | None) -> ModelInfo:
        if not self.engine.ready:
            raise ApiError(
                503, "not_ready", "the engine is not ready", headers={"Retry-After": "1"}
            )
        key = self.engine.default_model if name is None else name
        if key not in self.engine.model_names:
            served = ", ".join(self.engine.model_names)
            raise invalid(
                f"no model named {key[:200]!r} (served: {served})", "model", kind="unknown_model"
            )
        return self.engine.model_info(key)

    async def parse(self, request: Request, build: Callable[[dict[str, Any]], Any]) -> Any:
        body = await request.body()
        ct = request.headers.get("content-type")
        if len(body) >= self.settings.process_body_bytes and codec.is_json(ct):
            # Parsing holds the GIL throughout: in a thread it would stall the event
            # loop (every other client) for seconds; in a process it does not.
            packed, error = await self.parser.json_to_msgpack(body)
            if error is not None:
                raise ApiError(400, "bad_json", f"body is not valid JSON: {error}")
            assert packed is not None
            return await asyncio.to_thread(lambda: build(codec.decode_msgpack(packed)))

        def work() -> Any:
            return build(codec.decode(body, ct, self.settings.allow_binary))

        if len(body) > _THREAD_BODY_BYTES:
            return await asyncio.to_thread(work)
        return work()

    async def evaluate(
        self,
        structures: list[Structure],
        model: str,
        props: Outputs,
        batch: bool,
        session: str | None = None,
    ) -> list[Prediction]:
        try:
            return await asyncio.wait_for(
                self.engine.evaluate(
                    structures,
                    model,
                    outputs=props,
                    session=session,
                ),
                self.settings.request_timeout_s,
            )
        except EngineError as exc:
            raise from_engine_error(exc, batch=batch) from None
        except asyncio.TimeoutError:
            raise ApiError(
                504,
                "timeout",
                f"not computed within {self.settings.request_timeout_s:g} s; the server is "
                "busy or the request too large",
            ) from None

    async def digest(self, info: ModelInfo) -> str | None:
        if info.source is None:
            return None
        if info.name not in self._digests:
            from cace_server.model.io import file_digest

            try:
                self._digests[info.name] = await asyncio.to_thread(file_digest, info.source)
            except OSError:
                self._digests[info.name] = None
        return self._digests[info.name]


def _validate(model: type[BaseModel], obj: dict[str, Any]) -> Any:
    try:
        return model.model_validate(obj)
    except ValidationError as exc:
        raise from_validation_error(exc) from None


SESSION_HEADER = "x-cace-session"


def _session(request: Request) -> str | None:
    """A client's session id (``X-CACE-Session``): its structures evolve step by step
    (MD through ASE), so the engine keeps their neighbour lists (Verlet, with a skin)."""
    value = request.headers.get(SESSION_HEADER)
    return f"http:{value[:200]}" if value else None


def _count(request: Request, structures: list[Structure], binary: bool) -> None:
    request.state.structures = len(structures)
    request.state.atoms = sum(len(s) for s in structures)


def _install_handlers(app: FastAPI) -> None:
    async def api_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, ApiError)
        request.state.error_kind = exc.kind
        return exc.response()

    async def validation_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        problems = [
            {"field": ".".join(str(p) for p in e["loc"]), "message": e["msg"]} for e in exc.errors()
        ]
        first = problems[0] if problems else {"field": None, "message": "invalid request"}
        error = ApiError(
            422,
            "invalid_input",
            f"{first['field']}: {first['message']}",
            field=first["field"],
            errors=problems,
        )
        return await api_error(request, error)

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        kinds = {404: "not_found", 405: "method_not_allowed"}
        error = ApiError(
            exc.status_code,
            kinds.get(exc.status_code, "http_error"),
            str(exc.detail),
            headers=dict(exc.headers or {}),
        )
        return await api_error(request, error)

    async def internal_error(request: Request, exc: Exception) -> Response:
        logger.error("internal error on %s", request.url.path, exc_info=exc)
        error = ApiError(500, "internal_error", f"internal error: {type(exc).__name__}")
        return await api_error(request, error)

    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, internal_error)


_BODY_MODELS: dict[str, type[BaseModel]] = {}


def _body(model: type[BaseModel], description: str) -> dict[str, Any]:
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


_BINARY_NOTE = (
    "JSON by default. For large systems send `Content-Type: application/msgpack` (same "
    "fields; per-atom arrays may be packed as {shape, dtype: '<f8', data: raw bytes}) and/or "
    "`Accept: application/msgpack` to get forces, energies and charges packed the same way."
)


def create_app(
    engine: Engine,
    ipi_pool: DriverPool | None = None,
    settings: HttpSettings | None = None,
) -> FastAPI:
    """The HTTP API around a (started or starting) engine."""
    settings = settings or HttpSettings()
    groups = IpiGroups(engine, settings, ipi_pool)
    api = _Api(engine, groups, settings)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        api.parser.start()
        yield
        await api.close()

    app = FastAPI(
        title="cace-server",
        version=__version__,
        description="Energies, forces and stresses from a CACE machine-learned potential. "
        "ASE units: Å, eV, eV/Å, stress eV/Å^3 (Voigt xx yy zz yz xz xy). "
        "Errors: {error, message, field}.",
        lifespan=lifespan,
    )
    app.state.api = api
    # For servers that run uvicorn with lifespan="off": await this when shutting down.
    app.state.shutdown = api.close
    _install_handlers(app)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
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
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]

    # -- health ----------------------------------------------------------------------------
    @app.get(
        "/healthz",
        tags=["health"],
        summary="The process is alive and its device works (no auth)",
        responses=_errors(503),
    )
    async def healthz() -> dict[str, str]:
        if not engine.healthy:
            raise ApiError(503, "device_failed", f"the device failed: {engine.fatal_error}")
        return {"status": "ok"}

    # HEAD too: load balancers and `curl -I` probe with it.
    @app.head("/healthz", include_in_schema=False)
    async def healthz_head() -> Response:
        return Response(status_code=200)

    @app.get("/readyz", tags=["health"], summary="Models loaded and warm", responses=_errors(503))
    async def readyz() -> Response:
        if not engine.healthy:
            raise ApiError(503, "device_failed", f"the device failed: {engine.fatal_error}")
        if not engine.ready:
            error = engine.startup_error
            message = "engine is starting" if error is None else f"engine failed: {error}"
            raise ApiError(503, "not_ready", message, headers={"Retry-After": "1"})
        return codec.encode({"status": "ready", "models": list(engine.model_names)}, False)

    @app.get("/metrics", tags=["health"], summary="Prometheus metrics", response_class=Response)
    async def metrics() -> Response:
        return Response(generate_latest(api.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    # -- models ----------------------------------------------------------------------------
    @app.get("/v1/models", tags=["models"], response_model=ModelsResponse, responses=_errors(503))
    async def models() -> dict[str, Any]:
        if not engine.ready:
            raise ApiError(
                503, "not_ready", "the engine is not ready", headers={"Retry-After": "1"}
            )
        out = []
        for info in engine.models.values():
            out.append(
                {
                    "name": info.name,
                    "default": info.default,
                    "elements": list(info.elements),
                    "symbols": [chemical_symbols[z] for z in info.elements],
                    "cutoff": info.cutoff,
                    "dtype": info.dtype,
                    "device": info.device,
                    "n_parameters": info.n_parameters,
                    "has_charges": info.has_charges,
                    "per_atom_energies": per_atom_energies(info),
                    "family": info.family,
                    "long_range": info.long_range,
                    "outputs": list(info.outputs),
                    "required_inputs": list(info.required_inputs),
                    "description": info.description,
                    "source": info.source,
                    "sha256": await api.digest(info),
                }
            )
        return {"default": engine.default_model, "models": out}

    # -- calculations ----------------------------------------------------------------------
    @app.post(
        "/v1/calculate",
        tags=["calculate"],
        summary="Energy, forces, stress of one structure",
        description=_BINARY_NOTE,
        response_class=Response,
        responses={200: {"model": CalculateResponse}, **_errors(400, 401, 413, 415, 422, 503, 504)},
        openapi_extra=_body(CalculateRequest, "one structure"),
    )
    async def calculate(request: Request) -> Response:
        binary = codec.wants_binary(
            request.headers.get("accept"),
            request.headers.get("content-type"),
            settings.allow_binary,
        )

        def build(obj: dict[str, Any]) -> tuple[CalculateRequest, ModelInfo, Structure, Any]:
            req = _validate(CalculateRequest, obj)
            info = api.model(req.model)
            props, explicit = check_properties(req.properties, info, "properties")
            structure = build_structure(req, "", info, settings)
            check_stress(structure, explicit, "properties")
            return req, info, structure, props

        _req, info, structure, props = await api.parse(request, build)
        _count(request, [structure], binary)
        (pred,) = await api.evaluate(
            [structure], info.name, props, batch=False, session=_session(request)
        )
        out = result_dict(pred, len(structure), props, binary)
        out["model"] = info.name
        fmt = "msgpack" if binary else "json"
        api.metrics.structures.labels(fmt).inc()
        api.metrics.atoms.labels(fmt).inc(len(structure))
        return codec.encode(out, binary)

    @app.post(
        "/v1/calculate/batch",
        tags=["calculate"],
        summary="Several structures, evaluated together",
        description=_BINARY_NOTE,
        response_class=Response,
        responses={200: {"model": BatchResponse}, **_errors(400, 401, 413, 415, 422, 503, 504)},
        openapi_extra=_body(BatchRequest, "a list of structures"),
    )
    async def calculate_batch(request: Request) -> Response:
        binary = codec.wants_binary(
            request.headers.get("accept"),
            request.headers.get("content-type"),
            settings.allow_binary,
        )

        def build(obj: dict[str, Any]) -> tuple[ModelInfo, list[Structure], Any]:
            items = obj.get("structures")
            if isinstance(items, list) and len(items) > settings.max_structures:
                raise ApiError(
                    413,
                    "too_many_structures",
                    f"{len(items)} structures; this server accepts at most "
                    f"{settings.max_structures} per request",
                    field="structures",
                )
            req = _validate(BatchRequest, obj)
            info = api.model(req.model)
            props, explicit = check_properties(req.properties, info, "properties")
            structures = []
            total = 0
            for i, s in enumerate(req.structures):
                structure = build_structure(s, f"structures.{i}", info, settings)
                check_stress(structure, explicit, "properties")
                total += len(structure)
                if total > settings.max_request_atoms:
                    raise ApiError(
                        413,
                        "too_many_atoms",
                        f"more than {settings.max_request_atoms} atoms in one request",
                        field=f"structures.{i}",
                    )
                structures.append(structure)
            return info, structures, props

        info, structures, props = await api.parse(request, build)
        _count(request, structures, binary)
        preds = await api.evaluate(
            structures, info.name, props, batch=True, session=_session(request)
        )
        results = [
            result_dict(p, len(s), props, binary) for p, s in zip(preds, structures, strict=True)
        ]
        fmt = "msgpack" if binary else "json"
        api.metrics.structures.labels(fmt).inc(len(structures))
        api.metrics.atoms.labels(fmt).inc(sum(len(s) for s in structures))
        return codec.encode({"model": info.name, "results": results}, binary)

    # -- i-PI --------------------------------------------------------------------------------
    def ipi_enabled() -> None:
        if not settings.allow_ipi_control:
            raise ApiError(
                403,
                "forbidden",
                "attaching to i-PI runs is disabled on this server (enable it with --ipi-attach)",
            )

    @app.post(
        "/v1/ipi/connections",
        tags=["i-PI"],
        summary="Connect the running server to an i-PI run",
        status_code=201,
        response_model=IpiGroup,
        responses=_errors(400, 401, 403, 415, 422, 429, 503),
        openapi_extra=_body(IpiConnectRequest, "where i-PI listens and what it simulates"),
    )
    async def ipi_connect(request: Request) -> Response:
        ipi_enabled()

        def build(obj: dict[str, Any]) -> tuple[IpiConnectRequest, ModelInfo, Any]:
            req = _validate(IpiConnectRequest, obj)
            info = api.model(req.model)
            numbers, field = read_species(req.numbers, req.symbols, "")
            if numbers.size == 0:
                raise invalid("i-PI runs need at least one atom", field)
            check_elements(numbers, info.elements, field, info.name)
            arrays = read_inputs(req.arrays, len(numbers), "", info)
            return req, info, (numbers, arrays)

        req, info, (numbers, arrays) = await api.parse(request, build)
        group = await groups.add(
            req.address,
            req.clients,
            info.name,
            numbers,
            arrays=arrays,
            bec=req.bec,
            pbc=req.pbc,
            reconnect=req.reconnect,
            connect_timeout=req.connect_timeout,
            sockets_prefix=req.sockets_prefix,
        )
        return codec.encode(group.as_dict(), False, status=201)

    @app.get("/v1/ipi/connections", tags=["i-PI"], response_model=IpiGroupsResponse)
    async def ipi_list() -> dict[str, Any]:
        return {"groups": [g.as_dict() for g in groups.list()]}

    @app.get(
        "/v1/ipi/connections/{group_id}",
        tags=["i-PI"],
        response_model=IpiGroup,
        responses=_errors(404),
    )
    async def ipi_get(group_id: str) -> dict[str, Any]:
        for g in groups.list():
            if g.id == group_id:
                return g.as_dict()
        raise ApiError(404, "not_found", f"no i-PI group {group_id[:100]!r}", field="group_id")

    @app.delete(
        "/v1/ipi/connections/{group_id}",
        tags=["i-PI"],
        response_model=IpiGroup,
        responses=_errors(403, 404),
    )
    async def ipi_close(group_id: str) -> dict[str, Any]:
        ipi_enabled()
        return (await groups.remove(group_id)).as_dict()

    app.state.in_flight = InFlight(settings.max_pending_bytes)
    app.add_middleware(
        BodyLimit, max_bytes=settings.max_request_bytes, in_flight=app.state.in_flight
    )
    if settings.token is not None:
        app.add_middleware(BearerAuth, token=settings.token)
    app.add_middleware(Observe, metrics=api.metrics, access_log=settings.access_log)
    return app
