"""``GET /v1/models``: the served models, each as :func:`~cace_server.engine.info.info_dict`."""

from __future__ import annotations

from fastapi import APIRouter

from cace_server.engine.info import info_dict
from cace_server.http.openapi import error_responses
from cace_server.http.schemas import ModelOut, ModelsResponse
from cace_server.http.state import State

router = APIRouter(tags=["models"])


@router.get("/v1/models", response_model=ModelsResponse, responses=error_responses(503))
async def models(state: State) -> ModelsResponse:
    engine = state.engine
    state.model(None)  # 503 until the engine is ready
    out = [
        ModelOut.model_validate(info_dict(info, sha256=await state.digest(info)))
        for info in engine.models.values()
    ]
    return ModelsResponse(default=engine.default_model, models=out)
