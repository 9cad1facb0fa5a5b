"""``/v1/jobs``: relaxations and short MD runs of many structures, computed on the server.

``POST`` checks the body as ``/v1/calculate/batch`` does (every structure, with the
field of the first problem) plus the job's own fields, and answers 202 with the job's
id at once; the job runs whether or not its client stays. ``GET .../results``
streams each structure's result as it finishes (NDJSON, or msgpack objects one after
another with ``Accept: application/msgpack``), ending with a line ``{"end": true,
"state": ...}``; a client that reconnects passes ``start`` to skip what it has.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Any

import msgpack
import numpy as np
from fastapi import APIRouter, Query, Request
from starlette.responses import Response, StreamingResponse

from cace_server.http import codec
from cace_server.http.arrays import read_floats
from cace_server.http.errors import ApiError, invalid
from cace_server.http.job_schemas import JobIn, JobList, JobResult, JobStatus, JobStructureIn
from cace_server.http.openapi import error_responses, request_body
from cace_server.http.state import HttpState, State, validated
from cace_server.http.validate import build_structure
from cace_server.jobs import Job, JobItem, JobRefused, JobRequest, MDParams, RelaxParams, UnknownJob
from cace_server.jobs.items import check_fixed
from cace_server.structures import Structure

router = APIRouter(tags=["jobs"])

NDJSON = "application/x-ndjson"
# A reader waiting for the next result looks again this often (s); the stream has no
# other deadline: a relaxation may take hours.
_WAIT_S = 30.0


class _NdjsonStream(StreamingResponse):
    """What the results route is documented to answer (its media type)."""

    media_type = NDJSON


def _owner(request: Request) -> str:
    """Whom a job counts against for ``max_jobs_per_client``: the client's address.

    (The server has one bearer token, so the token does not tell clients apart.)
    """
    return request.client.host if request.client else "unknown"


def _needs_3d(params: RelaxParams | MDParams) -> str | None:
    if isinstance(params, RelaxParams) and params.cell:
        return "a cell relaxation"
    if isinstance(params, MDParams) and params.needs_stress:
        return "NPT dynamics"
    return None


def _per_atom(value: Any, n: int, field: str, width: int | None) -> np.ndarray:
    arr = read_floats(value, field)
    shape = (n,) if width is None else (n, width)
    if arr.shape != shape:
        raise invalid(f"expected shape {list(shape)} for {n} atoms, got {list(arr.shape)}", field)
    if not np.all(np.isfinite(arr)):
        raise invalid("contains NaN or infinity", field)
    return arr


def _item(
    s: JobStructureIn, i: int, structure: Structure, params: RelaxParams | MDParams
) -> JobItem:
    prefix = f"structures.{i}"
    n = len(structure)
    why = _needs_3d(params)
    if why is not None and not structure.pbc.all():
        raise invalid(f"{why} needs a structure periodic in all three directions", f"{prefix}.pbc")
    fixed: tuple[int, ...] = ()
    if s.fixed is not None:
        problem = check_fixed(s.fixed, n)
        if problem is not None:
            raise invalid(problem, f"{prefix}.fixed")
        fixed = tuple(sorted(set(s.fixed)))
    masses = None
    if s.masses is not None:
        masses = _per_atom(s.masses, n, f"{prefix}.masses", None)
        if np.any(masses <= 0):
            raise invalid("masses must be positive", f"{prefix}.masses")
    velocities = None
    if s.velocities is not None:
        if isinstance(params, RelaxParams):
            raise invalid("a relaxation takes no velocities", f"{prefix}.velocities")
        velocities = _per_atom(s.velocities, n, f"{prefix}.velocities", 3)
    return JobItem(structure, fixed, masses, velocities)


def _read(obj: dict[str, Any], state: HttpState, jobs_limit: int) -> JobRequest:
    items = obj.get("structures")
    if isinstance(items, list) and len(items) > jobs_limit:  # before validating a huge body
        raise ApiError(
            413,
            "too_many_structures",
            f"{len(items)} structures; a job may hold at most {jobs_limit} (max_job_structures)",
            field="structures",
        )
    req = validated(JobIn, obj)
    info = state.model(req.model)
    if "energy" not in info.outputs or "forces" not in info.outputs:
        raise invalid(f"model {info.name!r} computes no forces to move atoms with", "model")
    params = req.params()
    if _needs_3d(params) is not None and "stress" not in info.outputs:
        raise invalid(f"model {info.name!r} computes no stress", req.kind)
    job_items = []
    for i, s in enumerate(req.structures):
        structure = build_structure(s, f"structures.{i}", info, state.settings)
        job_items.append(_item(s, i, structure, params))
    return JobRequest(req.kind, job_items, params, info.name)


def _job(state: HttpState, job_id: str) -> Job:
    try:
        return state.jobs.get(job_id)
    except UnknownJob:
        raise ApiError(
            404,
            "unknown_job",
            f"no job {job_id!r}: it never existed, expired (finished jobs are kept "
            f"{state.jobs.settings.job_ttl_s:g} s) or the server restarted",
            field="id",
        ) from None


def _status(job: Job) -> dict[str, Any]:
    return {**job.status(), "results": f"/v1/jobs/{job.id}/results"}


def _out(value: Any, binary: bool) -> Any:
    """A result record for the wire: arrays as lists (JSON) or packed (msgpack)."""
    if isinstance(value, np.ndarray):
        return codec.array_out(value.astype(np.float64, copy=False), binary)
    if isinstance(value, dict):
        return {k: _out(v, binary) for k, v in value.items()}
    if isinstance(value, list):
        return [_out(v, binary) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


@router.post(
    "/v1/jobs",
    summary="Start a job: relax or run MD on many structures",
    description="Answers 202 with the job's status at once. JSON or msgpack bodies, as "
    "/v1/calculate/batch. Refused with 413 (too large) or 429 (too many jobs) naming the limit.",
    status_code=202,
    response_class=Response,
    responses={202: {"model": JobStatus}, **error_responses(400, 401, 413, 415, 422, 429, 503)},
    openapi_extra=request_body(JobIn, "the job"),
)
async def create_job(request: Request, state: State) -> Response:
    limit = state.jobs.settings.max_job_structures
    job_request = await state.parse(request, lambda obj: _read(obj, state, limit))
    try:
        job = state.jobs.submit(job_request, _owner(request))
    except JobRefused as exc:
        raise ApiError(exc.status, exc.kind, exc.message, field=exc.field) from None
    request.state.structures = len(job.items)
    request.state.atoms = job.n_atoms
    response = codec.encode(_status(job), False, status=202)
    response.headers["Location"] = f"/v1/jobs/{job.id}"
    return response


@router.get(
    "/v1/jobs",
    summary="The jobs the server holds",
    response_model=JobList,
    responses=error_responses(401),
)
async def list_jobs(state: State) -> dict[str, Any]:
    return {"jobs": [_status(job) for job in state.jobs.jobs()]}


@router.get(
    "/v1/jobs/{job_id}",
    summary="A job's state and progress",
    response_model=JobStatus,
    responses=error_responses(401, 404),
)
async def get_job(job_id: str, state: State) -> dict[str, Any]:
    return _status(_job(state, job_id))


@router.delete(
    "/v1/jobs/{job_id}",
    summary="Cancel a job (forget=true also drops its results)",
    response_model=JobStatus,
    responses=error_responses(401, 404),
)
async def cancel_job(
    job_id: str,
    state: State,
    forget: bool = Query(False, description="also forget the job and its results"),
) -> dict[str, Any]:
    job = _job(state, job_id)
    if forget:
        state.jobs.forget(job_id)
    else:
        state.jobs.cancel(job_id)
    # The runner stops at its next look at the flag (a fraction of a second).
    deadline = time.monotonic() + 2.0
    while not job.is_finished and time.monotonic() < deadline:
        await job.changed(len(job.records()[0]), deadline - time.monotonic())
    return _status(job)


@router.get(
    "/v1/jobs/{job_id}/results",
    summary="Stream a job's results as its structures finish",
    description="NDJSON (application/x-ndjson), or with Accept: application/msgpack one "
    "msgpack map after another (arrays packed). One object per finished structure, in the "
    "order they finished, each with its index; the last object is {end: true, state, error}. "
    "Reconnect with start=K to skip the K already read; wait=false returns what is ready now.",
    response_class=_NdjsonStream,
    responses={200: {"model": JobResult}, **error_responses(401, 404)},
)
async def job_results(
    job_id: str,
    request: Request,
    state: State,
    start: int = Query(0, ge=0, description="skip this many results (those already read)"),
    wait: bool = Query(True, description="wait for the job to end (false: what is ready now)"),
) -> StreamingResponse:
    job = _job(state, job_id)
    binary = codec.wants_binary(request.headers.get("accept"), None, state.settings.allow_binary)

    def frame(obj: dict[str, Any]) -> bytes:
        if binary:
            return msgpack.packb(obj, use_bin_type=True)
        return json.dumps(obj, separators=(",", ":"), allow_nan=False).encode() + b"\n"

    async def stream() -> AsyncIterator[bytes]:
        seen = start
        while True:
            records, finished = job.records(seen)
            for record in records:
                yield frame(_out(record, binary))
            seen += len(records)
            if finished or not wait:
                if finished and not job.records(seen)[0]:
                    yield frame({"end": True, "state": job.state, "error": job.error})
                    return
                if not wait:
                    yield frame({"end": False, "state": job.state, "error": None})
                    return
            if await request.is_disconnected():
                return
            await job.changed(seen, _WAIT_S)

    return StreamingResponse(stream(), media_type=codec.MSGPACK if binary else NDJSON)
