"""Bodies of the jobs API (``/v1/jobs``), the same for JSON and msgpack.

A job's structures are those of ``/v1/calculate/batch`` with what ASE keeps beside
positions: atoms held fixed, masses, velocities (Å/fs). The parameters are the
models of :mod:`cace_server.jobs.params` (ASE's names and defaults).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, WithJsonSchema, field_validator

from cace_server.http.schemas import StructureIn
from cace_server.jobs.params import Integer, MDParams, RelaxParams

_strict = ConfigDict(extra="forbid", strict=True)

Velocities = Annotated[
    Any,
    WithJsonSchema(
        {
            "type": "array",
            "items": {"type": "array", "items": {"type": "number"}, "minItems": 3, "maxItems": 3},
            "description": "velocities (Å/fs), one row per atom",
        }
    ),
]
Masses = Annotated[
    Any,
    WithJsonSchema(
        {
            "type": "array",
            "items": {"type": "number", "exclusiveMinimum": 0},
            "description": "masses (amu, positive), per atom",
        }
    ),
]

Fixed = Annotated[
    list[Integer],
    WithJsonSchema(
        {
            "type": "array",
            "items": {"type": "integer", "minimum": 0},
            "description": "indices of atoms held in place (ASE's FixAtoms)",
        }
    ),
]


class JobStructureIn(StructureIn):
    """A structure of a job: a calculate structure, and what ASE keeps beside it."""

    fixed: Fixed | None = None
    masses: Masses | None = None
    velocities: Velocities | None = None


class JobIn(BaseModel):
    """``POST /v1/jobs``: what to run on which structures."""

    model_config = _strict

    kind: Literal["relax", "md"]
    structures: list[JobStructureIn] = Field(..., min_length=1)
    model: str | None = Field(None, max_length=200, description="Model name (default model).")
    relax: RelaxParams | None = Field(None, description="kind relax: the relaxation")
    md: MDParams | None = Field(None, description="kind md: the MD run")

    @field_validator("relax", "md")
    @classmethod
    def _only_the_kinds_parameters(cls, value: Any, info: ValidationInfo) -> Any:
        kind = info.data.get("kind")
        if value is not None and kind is not None and info.field_name != kind:
            raise ValueError(f"a {kind} job takes no {info.field_name} parameters")
        return value

    def params(self) -> RelaxParams | MDParams:
        if self.kind == "relax":
            return self.relax or RelaxParams.model_validate({})
        return self.md or MDParams.model_validate({})


class JobStatus(BaseModel):
    """A job's state and progress (``GET /v1/jobs/{id}``)."""

    id: str
    kind: Literal["relax", "md"]
    state: Literal["queued", "running", "done", "failed", "cancelled"]
    model: str
    model_sha: str | None = Field(None, description="version of the model (latest evaluation)")
    n_structures: int
    n_atoms: int
    finished_structures: int = Field(..., description="structures whose results are ready")
    by_status: dict[str, int] = Field(
        ..., description="finished structures by status: converged, not_converged, done, failed"
    )
    live_structures: int = Field(..., description="structures in the current iteration")
    iterations: int = Field(..., description="lockstep iterations so far")
    model_calls: int = Field(..., description="engine calls so far (one per iteration)")
    max_force: float | None = Field(
        None, description="relax: the largest force on a live structure now (eV/Å)"
    )
    created: float = Field(..., description="Unix time")
    started: float | None = None
    finished: float | None = None
    error: str | None = Field(None, description="why a failed job failed")
    params: dict[str, Any]
    results: str | None = Field(None, description="where its results stream from")


class JobList(BaseModel):
    jobs: list[JobStatus]


class JobResult(BaseModel):
    """One structure's result, a line of ``GET /v1/jobs/{id}/results`` (ASE units)."""

    index: int = Field(..., description="position of the structure in the job")
    status: Literal["converged", "not_converged", "done", "failed"]
    error: dict[str, Any] | None = Field(None, description="failed: {error, message}")
    energy: float | None = Field(None, description="final potential energy (eV)")
    positions: list[list[float]] | None = Field(None, description="final positions (Å)")
    forces: list[list[float]] | None = Field(None, description="final forces (eV/Å)")
    cell: list[list[float]] | None = Field(None, description="final cell (Å)")
    pbc: list[bool] | None = None
    stress: list[float] | None = Field(
        None, description="cell relaxations and NPT: final stress (eV/Å^3, Voigt)"
    )
    steps: int | None = Field(None, description="optimiser or MD steps taken")
    converged: bool | None = Field(None, description="relax: fmax reached within steps")
    fmax: float | None = Field(None, description="relax: final largest force (eV/Å)")
    evaluations: int | None = Field(None, description="relax: force evaluations")
    velocities: list[list[float]] | None = Field(None, description="md: final velocities (Å/fs)")
    kinetic_energy: float | None = Field(None, description="md: final kinetic energy (eV)")
    temperature_K: float | None = None
    frames: list[dict[str, Any]] | None = Field(
        None,
        description="md: every stride-th step: step, time_fs, energy, kinetic_energy, "
        "temperature_K and the frame_fields asked for",
    )
