"""Error replies: one JSON shape for every failure, and the engine's errors mapped to 4xx/5xx.

Every error body is ``{"error": KIND, "message": TEXT, "field": PATH | null}``
(plus ``"errors"``, the list of problems, for validation failures). ``field`` is the
dotted path of the offending input (``structures.2.positions``), so a client can
point at it. Only a bug gives 500.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response
from starlette.routing import Match, Route

from cace_server.engine import errors as engine_errors

logger = logging.getLogger("cace_server.http")


#: What a 429 or 503 says when its raiser names no better time (seconds).
DEFAULT_RETRY_AFTER = "1"


class ApiError(Exception):
    """An error reply: HTTP status, stable kind, message and the field it concerns.

    A 429 or 503 always carries ``Retry-After`` (the raiser's, or one second).
    """

    def __init__(
        self,
        status: int,
        kind: str,
        message: str,
        *,
        field: str | None = None,
        headers: dict[str, str] | None = None,
        errors: list[dict[str, Any]] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.kind = kind
        self.message = message
        self.field = field
        self.headers = dict(headers or {})
        self.errors = errors
        if status in (429, 503) and not any(k.lower() == "retry-after" for k in self.headers):
            self.headers["Retry-After"] = DEFAULT_RETRY_AFTER

    def response(self) -> Response:
        body: dict[str, Any] = {"error": self.kind, "message": self.message, "field": self.field}
        if self.errors is not None:
            body["errors"] = self.errors
        return Response(
            json.dumps(body).encode(),
            status_code=self.status,
            media_type="application/json",
            headers=self.headers,
        )


def invalid(message: str, field: str | None, kind: str = "invalid_input") -> ApiError:
    return ApiError(422, kind, message, field=field)


def join_path(*parts: object) -> str:
    return ".".join(str(p) for p in parts if p != "" and p is not None)


def from_validation_error(exc: ValidationError, prefix: tuple[object, ...] = ()) -> ApiError:
    """A pydantic error as a 422 naming the first offending field (all are listed)."""
    problems = []
    for err in exc.errors(include_url=False, include_input=False, include_context=False):
        problems.append({"field": join_path(*prefix, *err["loc"]), "message": err["msg"]})
    if not problems:  # pragma: no cover - pydantic always reports at least one
        problems.append({"field": join_path(*prefix), "message": str(exc)})
    first = problems[0]
    where = f"{first['field']}: " if first["field"] else ""
    more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
    return ApiError(
        422,
        "invalid_input",
        f"{where}{first['message']}{more}",
        field=first["field"] or None,
        errors=problems,
    )


# Engine failures: status and whether the failure concerns one structure (its index).
_ENGINE_STATUS: dict[type[engine_errors.EngineError], int] = {
    engine_errors.InvalidStructure: 422,
    engine_errors.UnknownModel: 422,
    engine_errors.UnsupportedOutput: 422,
    engine_errors.NonFiniteResult: 422,
    # The structure does not fit in device memory even alone: the request is too large.
    engine_errors.OutOfMemory: 413,
    engine_errors.Overloaded: 503,
    engine_errors.NotReady: 503,
    engine_errors.EngineClosed: 503,
    # The device died; the process exits and is restarted: retry against the new one.
    engine_errors.DeviceFailed: 503,
    engine_errors.EvaluationError: 500,
}


def from_engine_error(exc: engine_errors.EngineError, *, batch: bool) -> ApiError:
    status = 500
    for cls, code in _ENGINE_STATUS.items():
        if isinstance(exc, cls):
            status = code
            break
    field: str | None = None
    if isinstance(exc, engine_errors.UnknownModel):
        field = "model"
    elif exc.index is not None:
        field = f"structures.{exc.index}" if batch else None
    # a failed device restarts the process: seconds, not one
    headers = {"Retry-After": "5"} if isinstance(exc, engine_errors.DeviceFailed) else None
    return ApiError(status, exc.kind, str(exc), field=field, headers=headers)


def allowed_methods(request: Request) -> list[str]:
    """The methods the request's path answers, over all its routes (one route per
    method), OPTIONS included: what ``Allow`` lists (RFC 9110 10.2.1)."""
    methods = {"OPTIONS"}
    scope = {**request.scope, "method": "OPTIONS"}
    for route in getattr(request.app.state, "method_routes", request.app.router.routes):
        if isinstance(route, Route) and route.methods:
            match, _ = route.matches(scope)
            if match != Match.NONE:
                methods.update(route.methods)
    return sorted(methods)


def install_handlers(app: FastAPI) -> None:
    """Every failure as an :class:`ApiError` reply (its kind recorded for the access log)."""

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
        headers = dict(exc.headers or {})
        if exc.status_code == 405:
            # The router's Allow names only the first route of the path (one per method).
            allow = ", ".join(allowed_methods(request))
            if request.method == "OPTIONS":  # what the path supports: 204, no body
                return Response(status_code=204, headers={"Allow": allow})
            headers["Allow"] = allow
        kinds = {404: "not_found", 405: "method_not_allowed"}
        error = ApiError(
            exc.status_code,
            kinds.get(exc.status_code, "http_error"),
            str(exc.detail),
            headers=headers,
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
