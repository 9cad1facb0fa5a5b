"""``GET /v1/models``: the served models, each as :func:`~cace_server.engine.info.info_dict`."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter

from cace_server.engine import ModelInfo
from cace_server.engine.info import info_dict
from cace_server.http.openapi import error_responses
from cace_server.http.schemas import ModelOut, ModelsResponse
from cace_server.http.state import HttpState, State

router = APIRouter(tags=["models"])


async def model_out(info: ModelInfo, state: HttpState) -> ModelOut:
    """``info`` as the API shows it: the model file's full path only behind a token
    (a server without one answers anyone who reaches it, a web page included)."""
    out = info_dict(info, sha256=await state.digest(info))
    if state.settings.token is None and info.source is not None:
        # a committee's source lists its member files, comma-separated
        out["source"] = ",".join(Path(part.strip()).name for part in info.source.split(","))
    return ModelOut.model_validate(out)


@router.get("/v1/models", response_model=ModelsResponse, responses=error_responses(503))
async def models(state: State) -> ModelsResponse:
    engine = state.engine
    state.model(None)  # 503 until the engine is ready
    out = [await model_out(info, state) for info in engine.models.values()]
    return ModelsResponse(default=engine.default_model, models=out)
