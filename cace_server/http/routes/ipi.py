"""``/v1/ipi/connections``: attach the running server to i-PI runs, list and detach them."""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt
from fastapi import APIRouter, Request
from starlette.responses import Response

from cace_server.engine import ModelInfo
from cace_server.http import codec
from cace_server.http.errors import ApiError, invalid
from cace_server.http.openapi import error_responses, request_body
from cace_server.http.schemas import IpiConnectRequest, IpiGroup, IpiGroupsResponse
from cace_server.http.settings import HttpSettings
from cace_server.http.state import HttpState, State, validated
from cace_server.http.validate import check_elements, read_inputs, read_species

router = APIRouter(tags=["i-PI"])


def _check_enabled(settings: HttpSettings) -> None:
    if not settings.allow_ipi_control:
        raise ApiError(
            403,
            "forbidden",
            "attaching to i-PI runs is disabled on this server (enable it with --ipi-attach)",
        )


_Checked = tuple[
    IpiConnectRequest, ModelInfo, npt.NDArray[np.int64], dict[str, npt.NDArray[np.float64]]
]


def _read(obj: dict[str, Any], state: HttpState) -> _Checked:
    req = validated(IpiConnectRequest, obj)
    info = state.model(req.model)
    numbers, field = read_species(req.numbers, req.symbols, "")
    if numbers.size == 0:
        raise invalid("i-PI runs need at least one atom", field)
    check_elements(numbers, info.elements, field, info.name)
    arrays = read_inputs(req.arrays, len(numbers), "", info)
    return req, info, numbers, arrays


@router.post(
    "/v1/ipi/connections",
    summary="Connect the running server to an i-PI run",
    status_code=201,
    response_model=IpiGroup,
    responses=error_responses(400, 401, 403, 415, 422, 429, 503),
    openapi_extra=request_body(IpiConnectRequest, "where i-PI listens and what it simulates"),
)
async def ipi_connect(request: Request, state: State) -> Response:
    _check_enabled(state.settings)
    req, info, numbers, arrays = await state.parse(request, lambda obj: _read(obj, state))
    group = await state.groups.add(
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


@router.get("/v1/ipi/connections", response_model=IpiGroupsResponse)
async def ipi_list(state: State) -> dict[str, Any]:
    return {"groups": [g.as_dict() for g in state.groups.list()]}


@router.get(
    "/v1/ipi/connections/{group_id}", response_model=IpiGroup, responses=error_responses(404)
)
async def ipi_get(group_id: str, state: State) -> dict[str, Any]:
    for g in state.groups.list():
        if g.id == group_id:
            return g.as_dict()
    raise ApiError(404, "not_found", f"no i-PI group {group_id[:100]!r}", field="group_id")


@router.delete(
    "/v1/ipi/connections/{group_id}", response_model=IpiGroup, responses=error_responses(403, 404)
)
async def ipi_close(group_id: str, state: State) -> dict[str, Any]:
    _check_enabled(state.settings)
    return (await state.groups.remove(group_id)).as_dict()
