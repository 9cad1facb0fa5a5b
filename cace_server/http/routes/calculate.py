"""``POST /v1/calculate`` and ``/v1/calculate/batch``: one path, parse -> check -> submit -> format.

A single structure is read and evaluated as a batch of one; the two routes differ
only in their body's schema, where its structures sit (the field paths of errors:
``symbols.1`` or ``structures.0.symbols.1``), the limits of a batch and the reply's
layout. The requested properties are output names: ``check_properties`` makes them
the :class:`~cace_server.outputs.Outputs` the engine computes, ``result_dict`` lays
each result out.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import Response

from cace_server.capture import Origin
from cace_server.engine import EngineError, ModelInfo, StepGroup
from cace_server.http import codec
from cace_server.http.disconnect import ClientGone, results_or_hang_up
from cace_server.http.errors import ApiError, from_engine_error
from cace_server.http.openapi import error_responses, request_body
from cace_server.http.schemas import (
    BatchRequest,
    BatchResponse,
    CalculateRequest,
    CalculateResponse,
    StructureIn,
)
from cace_server.http.settings import HttpSettings
from cace_server.http.state import HttpState, State, validated
from cace_server.http.validate import build_structure, check_properties, check_stress
from cace_server.outputs import Outputs
from cace_server.structures import Prediction, Structure, voigt

router = APIRouter(tags=["calculate"])

_BINARY_NOTE = (
    "JSON by default. For large systems send `Content-Type: application/msgpack` (same "
    "fields; per-atom arrays may be packed as {shape, dtype: '<f8', data: raw bytes}) and/or "
    "`Accept: application/msgpack` to get forces, energies and charges packed the same way."
)
_ERRORS = error_responses(400, 401, 413, 415, 422, 503, 504)

SESSION_HEADER = "x-cace-session"
STEP_GROUP_HEADER = "x-cace-step-group"
STEP_GROUP_SIZE_HEADER = "x-cace-step-group-size"
#: more members than this in one step group is refused (i-PI's largest bead counts are
#: in the hundreds; a member is one client's trajectory)
MAX_STEP_GROUP_SIZE = 4096


def _session(request: Request) -> str | None:
    """A client's session id (``X-CACE-Session``): its structures evolve step by step
    (MD through ASE), so the engine keeps their neighbour lists (Verlet, with a skin)."""
    value = request.headers.get(SESSION_HEADER)
    return f"http:{value[:200]}" if value else None


def _step_group(request: Request, state: HttpState, trajectory: str | None) -> StepGroup | None:
    """The step group a request belongs to (``X-CACE-Step-Group`` and its ``-Size``).

    The clients of one path-integral run (LAMMPS partitions, one per bead) each send
    their bead's structure with the same group name and the bead count; the engine
    then batches a step's beads into one model call, as it does for the connections
    of one i-PI address. Each member is one session (``X-CACE-Session``).
    """
    key = request.headers.get(STEP_GROUP_HEADER)
    if not key:
        return None
    if trajectory is None:
        raise ApiError(
            400,
            "bad_request",
            f"{STEP_GROUP_HEADER} needs {SESSION_HEADER}: each member of a step group is "
            "one session",
            field=STEP_GROUP_HEADER,
        )
    raw = request.headers.get(STEP_GROUP_SIZE_HEADER, "")
    try:
        size = int(raw)
    except ValueError:
        size = 0
    if not 1 <= size <= MAX_STEP_GROUP_SIZE:
        raise ApiError(
            400,
            "bad_request",
            f"{STEP_GROUP_SIZE_HEADER} must be the group's member count, 1 to "
            f"{MAX_STEP_GROUP_SIZE}; got {raw[:20]!r}",
            field=STEP_GROUP_SIZE_HEADER,
        )
    return state.engine.step_group(f"http:{key[:200]}", size)


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
    if "energy_uncertainty" in props:
        out["energy_uncertainty"] = pred.energy_uncertainty
    for name in ("forces_uncertainty", "committee_energies", "committee_forces"):
        if name in props:
            out[name] = codec.array_out(getattr(pred, name), binary)
    if "committee_virials" in props:
        virials = pred.committee_virials
        out["committee_virials"] = None if virials is None else virials.tolist()
    return out


@dataclass(frozen=True)
class _Checked:
    """A checked request: the model, its structures, what to return."""

    info: ModelInfo
    structures: list[Structure]
    outputs: Outputs


def _check_count(obj: dict[str, Any], settings: HttpSettings) -> None:
    """Too many structures is refused before the body is validated (it may be huge)."""
    items = obj.get("structures")
    if isinstance(items, list) and len(items) > settings.max_structures:
        raise ApiError(
            413,
            "too_many_structures",
            f"{len(items)} structures; this server accepts at most "
            f"{settings.max_structures} per request",
            field="structures",
        )


def _check_total_atoms(total: int, i: int, settings: HttpSettings) -> None:
    if total > settings.max_request_atoms:
        raise ApiError(
            413,
            "too_many_atoms",
            f"more than {settings.max_request_atoms} atoms in one request",
            field=f"structures.{i}",
        )


def _read(obj: dict[str, Any], state: HttpState, batch: bool) -> _Checked:
    """The body checked and built into structures, or an error reply naming the field."""
    settings = state.settings
    req: CalculateRequest | BatchRequest
    items: list[StructureIn]
    if batch:
        _check_count(obj, settings)
        req = validated(BatchRequest, obj)
        items = req.structures
    else:
        req = validated(CalculateRequest, obj)
        items = [req]
    info = state.model(req.model)
    props, explicit = check_properties(req.properties, info, "properties")
    structures = []
    total = 0
    for i, s in enumerate(items):
        structure = build_structure(s, f"structures.{i}" if batch else "", info, settings)
        check_stress(structure, explicit, "properties")
        if batch:
            total += len(structure)
            _check_total_atoms(total, i, settings)
        structures.append(structure)
    return _Checked(info, structures, props)


def _origin(request: Request) -> Origin:
    """Where a request's structures come from (capture records it, and rate-limits
    per session or, without one, per client)."""
    session = request.headers.get(SESSION_HEADER)
    if session:
        source = f"session:{session[:200]}"
    else:
        source = f"client:{request.client.host if request.client else 'unknown'}"
    request_id = getattr(request.state, "request_id", None) or uuid.uuid4().hex[:16]
    return Origin("http", source, request=request_id)


async def _evaluate(
    request: Request,
    state: HttpState,
    req: _Checked,
    batch: bool,
    trajectory: str | None,
    step_group: StepGroup | None = None,
) -> list[Prediction]:
    """The predictions; a client that hangs up meanwhile has its structures dropped."""
    timeout = state.settings.request_timeout_s
    try:
        futures = state.engine.submit(
            req.structures,
            req.info.name,
            outputs=req.outputs,
            trajectory=trajectory,
            step_group=step_group,
            origin=_origin(request),
        )
        outcomes = await results_or_hang_up(request, state.engine, futures, timeout)
    except EngineError as exc:
        raise from_engine_error(exc, batch=batch) from None
    except ClientGone as exc:
        raise ApiError(499, "client_disconnected", str(exc)) from None
    except TimeoutError:
        raise ApiError(
            504,
            "timeout",
            f"not computed within {timeout:g} s; the server is busy or the request too large",
        ) from None
    for outcome in outcomes:
        if isinstance(outcome, EngineError):
            raise from_engine_error(outcome, batch=batch)
        if isinstance(outcome, BaseException):
            raise outcome
    return [o for o in outcomes if isinstance(o, Prediction)]


async def _calculate(request: Request, state: HttpState, batch: bool) -> Response:
    binary = codec.wants_binary(
        request.headers.get("accept"),
        request.headers.get("content-type"),
        state.settings.allow_binary,
    )
    trajectory = _session(request)
    group = _step_group(request, state, trajectory)
    req = await state.parse(request, lambda obj: _read(obj, state, batch))
    if group is not None and len(req.structures) != 1:
        raise ApiError(
            400,
            "bad_request",
            f"a member of a step group sends one structure per step, not {len(req.structures)}",
            field=STEP_GROUP_HEADER,
        )
    n_atoms = sum(len(s) for s in req.structures)
    request.state.structures = len(req.structures)
    request.state.atoms = n_atoms
    preds = await _evaluate(request, state, req, batch, trajectory, group)
    results = [
        result_dict(p, len(s), req.outputs, binary)
        for p, s in zip(preds, req.structures, strict=True)
    ]
    fmt = "msgpack" if binary else "json"
    state.metrics.structures.labels(fmt).inc(len(req.structures))
    state.metrics.atoms.labels(fmt).inc(n_atoms)
    # One request is computed by one version (the one current when it was submitted).
    sha = preds[0].extras.get("model_sha") if preds else None
    if batch:
        return codec.encode({"model": req.info.name, "model_sha": sha, "results": results}, binary)
    (out,) = results
    out["model"] = req.info.name
    out["model_sha"] = sha
    return codec.encode(out, binary)


@router.post(
    "/v1/calculate",
    summary="Energy, forces, stress of one structure",
    description=_BINARY_NOTE,
    response_class=Response,
    responses={200: {"model": CalculateResponse}, **_ERRORS},
    openapi_extra=request_body(CalculateRequest, "one structure"),
)
async def calculate(request: Request, state: State) -> Response:
    return await _calculate(request, state, batch=False)


@router.post(
    "/v1/calculate/batch",
    summary="Several structures, evaluated together",
    description=_BINARY_NOTE,
    response_class=Response,
    responses={200: {"model": BatchResponse}, **_ERRORS},
    openapi_extra=request_body(BatchRequest, "a list of structures"),
)
async def calculate_batch(request: Request, state: State) -> Response:
    return await _calculate(request, state, batch=True)
