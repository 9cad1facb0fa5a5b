"""``/healthz``, ``/readyz`` and ``/metrics``: what an orchestrator and Prometheus probe."""

from __future__ import annotations

from fastapi import APIRouter, Request
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.responses import PlainTextResponse, Response

from cace_server.engine import Engine
from cace_server.http import codec
from cace_server.http.errors import ApiError
from cace_server.http.openapi import error_responses
from cace_server.http.state import State

router = APIRouter(tags=["health"])


def _check_device(engine: Engine) -> None:
    if not engine.healthy:
        raise ApiError(
            503,
            "device_failed",
            f"the device failed: {engine.fatal_error}",
            headers={"Retry-After": "5"},  # the process exits and is restarted
        )


@router.get(
    "/healthz",
    summary="The process is alive and its device works (no auth)",
    responses=error_responses(503),
)
async def healthz(state: State) -> dict[str, str]:
    _check_device(state.engine)
    return {"status": "ok"}


# HEAD too: load balancers and `curl -I` probe with it.
@router.head("/healthz", include_in_schema=False)
async def healthz_head() -> Response:
    return Response(status_code=200)


@router.get("/readyz", summary="Models loaded and warm", responses=error_responses(503))
async def readyz(request: Request, state: State) -> Response:
    engine = state.engine
    # open to probes without a token (BearerAuth); details only to those with one
    detailed = getattr(request.state, "authorized", True)
    if detailed:
        _check_device(engine)
    elif not engine.healthy:
        raise ApiError(503, "device_failed", "the device failed", headers={"Retry-After": "5"})
    if not engine.ready:
        error = engine.startup_error
        message = "engine is starting" if error is None else "engine failed"
        if detailed and error is not None:
            message = f"engine failed: {error}"
        raise ApiError(503, "not_ready", message, headers={"Retry-After": "1"})
    if not detailed:
        return codec.encode({"status": "ready"}, False)
    return codec.encode({"status": "ready", "models": list(engine.model_names)}, False)


@router.get("/metrics", summary="Prometheus metrics", response_class=PlainTextResponse)
async def metrics(state: State) -> Response:
    return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
