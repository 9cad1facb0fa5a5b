"""``PUT /v1/models/{name}`` and ``POST /v1/models/{name}/reload``: hot model swaps.

Off unless the server runs with ``--allow-model-updates`` (403 otherwise); behind the
bearer token like every route. A PUT body is either the model file itself (any
content type but JSON, e.g. ``application/octet-stream``; at most ``max_model_bytes``;
written into the update directory, or a private temporary one, as
``NAME-SHA.safetensors``) or JSON
``{"path": FILE}`` naming a model file, committee file or comma-separated member list
whose real paths lie inside ``--model-update-dir``. Reload re-reads the path the
model is served from. The swap itself is :meth:`~cace_server.engine.Engine.swap_model`;
a refused one (422 ``bad_model``, 409 ``species_in_use``) leaves the old version
serving. The reply is the model's ``/v1/models`` entry, new ``model_sha`` included.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request

from cace_server.engine import EngineError, SwapRefused
from cace_server.engine.models import SHA_DIGITS
from cace_server.http import codec
from cace_server.http.errors import ApiError, from_engine_error
from cace_server.http.openapi import error_responses
from cace_server.http.routes.models import model_out
from cace_server.http.schemas import ModelOut
from cace_server.http.state import HttpState, State

router = APIRouter(tags=["models"])

_ERRORS = error_responses(400, 401, 403, 409, 413, 422, 503)
_SWAP_TIMEOUT_S = 600.0


def _check_enabled(state: HttpState) -> None:
    if not state.settings.allow_model_updates:
        raise ApiError(
            403,
            "updates_disabled",
            "model updates are off; start the server with --allow-model-updates",
        )


def _allowed(source: str, state: HttpState) -> str:
    """``source`` when every file it names lies inside the update directory; else 403."""
    directory = state.settings.model_update_dir
    if directory is None:
        raise ApiError(
            403,
            "path_not_allowed",
            "this server takes no model paths (start it with --model-update-dir DIR); "
            "upload the file instead",
            field="path",
        )
    root = Path(directory).resolve()
    from cace_server.model.committee import CommitteeError, committee_spec

    def refuse_outside(path: Path, what: str) -> None:
        if not path.resolve().is_relative_to(root):
            raise ApiError(
                403,
                "path_not_allowed",
                f"{what}{path} is outside the model update directory {root}",
                field="path",
            )

    # the named files first: nothing outside the directory is read
    for part in source.split(","):
        refuse_outside(Path(part.strip()), "")
    try:
        spec = committee_spec(source)
    except (CommitteeError, OSError, ValueError) as exc:
        raise ApiError(422, "bad_model", str(exc), field="path") from None
    for member in [] if spec is None else spec.members:  # a committee file's members too
        refuse_outside(member, "committee member ")
    return source


def _upload_dir(state: HttpState) -> Path:
    directory = state.settings.model_update_dir
    if directory is not None:
        return Path(directory)
    if state.upload_dir is None:
        state.upload_dir = tempfile.mkdtemp(prefix="cace-models-")
    return Path(state.upload_dir)


def _store(body: bytes, name: str, directory: Path) -> str:
    """Write an uploaded model file (atomically) and return its path."""
    sha = hashlib.sha256(body).hexdigest()[:SHA_DIGITS]
    path = directory / f"{Path(name).name}-{sha}.safetensors"
    if not path.exists():
        with tempfile.NamedTemporaryFile(dir=directory, delete=False, suffix=".part") as f:
            f.write(body)
        os.replace(f.name, path)
    return str(path)


async def _swap(state: HttpState, name: str, source: str) -> dict[str, Any]:
    try:
        info = await state.engine.aswap_model(name, source, timeout=_SWAP_TIMEOUT_S)
    except SwapRefused as exc:
        status = 409 if exc.reason == "species_in_use" else 422
        raise ApiError(status, exc.reason, str(exc)) from None
    except EngineError as exc:
        raise from_engine_error(exc, batch=False) from None
    return (await model_out(info, state)).model_dump()


@router.put(
    "/v1/models/{name}",
    summary="Replace a served model while serving (upload, or a path in the update directory)",
    response_model=ModelOut,
    responses=_ERRORS,
)
async def put_model(name: str, request: Request, state: State) -> Any:
    _check_enabled(state)
    state.model(name)  # 503 while not ready, 422 for an unknown name
    body = await request.body()
    content_type = request.headers.get("content-type")
    if content_type is not None and codec.is_json(content_type):
        try:
            obj = json.loads(body)
        except ValueError as exc:
            raise ApiError(400, "bad_json", f"body is not valid JSON: {exc}") from None
        path = obj.get("path") if isinstance(obj, dict) else None
        if not isinstance(path, str) or not path:
            raise ApiError(422, "invalid_input", 'expected {"path": "MODEL FILE"}', field="path")
        source = _allowed(path, state)
    else:
        limit = state.settings.max_model_bytes
        if len(body) > limit:
            raise ApiError(413, "too_large", f"model files above {limit} bytes are refused")
        if not body:
            raise ApiError(400, "empty_body", "no model file in the request body")
        source = await asyncio.to_thread(_store, body, name, _upload_dir(state))
    return await _swap(state, name, source)


@router.post(
    "/v1/models/{name}/reload",
    summary="Re-read a served model from its path (a new file there becomes the new version)",
    response_model=ModelOut,
    responses=_ERRORS,
)
async def reload_model(name: str, state: State) -> Any:
    _check_enabled(state)
    info = state.model(name)
    if info.source is None:
        raise ApiError(409, "no_source", f"model {name!r} was not loaded from a file")
    return await _swap(state, name, info.source)
