"""The OpenAPI document: error replies and the bodies of routes that read their body themselves.

Routes that accept JSON or msgpack read the raw body (:meth:`HttpState.parse`), so
FastAPI cannot see their request model; :func:`request_body` declares it and
:func:`install_openapi` adds its schema to the document's components.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

from cace_server.http.schemas import ErrorResponse

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


def install_openapi(app: FastAPI) -> None:
    """Build ``app``'s document once, on first request, with the declared request bodies."""

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
