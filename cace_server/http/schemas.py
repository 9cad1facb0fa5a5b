"""Request and response bodies (pydantic v2), the same for JSON and msgpack.

Arrays are typed loosely here (``Any`` with a documented JSON schema) and read by
:mod:`cace_server.http.arrays`, which accepts nested lists or packed bytes and
names the field in its errors; pydantic checks everything else.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema

from cace_server.jobs.params import Integer

Property = Literal[
    "energy",
    "forces",
    "stress",
    "energies",
    "charges",
    "dipole",
    "bec",
    "energy_uncertainty",
    "forces_uncertainty",
    "committee_energies",
    "committee_forces",
    "committee_virials",
]
DEFAULT_PROPERTIES: tuple[Property, ...] = ("energy", "forces", "stress")

#: Coordinates and cell lengths beyond this (Å, one micrometre) are a unit mistake, not
#: a structure; far larger spans also make neighbour lists slow (vesin).
MAX_COORDINATE = 1.0e4

_NUMBER = {"type": "number"}
_COORDINATE = {"type": "number", "minimum": -MAX_COORDINATE, "maximum": MAX_COORDINATE}
_ROWS3 = {
    "type": "array",
    "items": {"type": "array", "items": _COORDINATE, "minItems": 3, "maxItems": 3},
}
_PACKED_NOTE = (
    " With application/msgpack, also a packed array "
    '{"shape": [...], "dtype": "<f8", "data": <bin, little-endian, C order>}.'
)

Positions = Annotated[
    Any,
    WithJsonSchema(
        {**_ROWS3, "minItems": 1, "description": "Cartesian positions (Å), one row per atom."}
    ),
]
Cell = Annotated[
    Any,
    WithJsonSchema(
        {
            "anyOf": [
                {**_ROWS3, "minItems": 3, "maxItems": 3},
                {"type": "array", "items": _COORDINATE, "minItems": 3, "maxItems": 3},
            ],
            "description": "Lattice vectors as rows (Å), or three lengths of an orthorhombic "
            "cell. Required when any direction is periodic.",
        }
    ),
]
# The server checks species itself (validate.read_species: an empty list is
# "empty_structure"); the schemas say what it accepts.
Numbers = Annotated[
    Any,
    WithJsonSchema(
        {
            "type": "array",
            "items": {"type": "integer", "minimum": 1, "maximum": 118},
            "minItems": 1,
            "description": "Atomic numbers (give these or symbols).",
        }
    ),
]
Symbols = Annotated[
    list[str],
    WithJsonSchema(
        {
            "type": "array",
            "items": {"type": "string"},
            "minItems": 1,
            "description": "Chemical symbols, e.g. ['O', 'H', 'H'] (give these or numbers).",
        }
    ),
]
Pbc = Annotated[
    bool | list[bool],
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "boolean"},
                {"type": "array", "items": {"type": "boolean"}, "minItems": 3, "maxItems": 3},
            ],
            "description": "Periodicity: one flag or three. Default: not periodic (as in ASE).",
        }
    ),
]

PerAtomArrays = Annotated[
    Any,
    WithJsonSchema(
        {
            "type": "object",
            "additionalProperties": {
                "anyOf": [
                    {"type": "array", "items": _NUMBER},
                    {"type": "array", "items": {"type": "array", "items": _NUMBER}},
                ]
            },
            "description": "Extra per-atom inputs of models that read them, by the model's "
            "name for them (GET /v1/models lists a model's required_inputs), e.g. "
            '{"charge_states": [0, 1, -1]}: one value (or one row of k values) per atom, '
            "in atom order." + _PACKED_NOTE,
        }
    ),
]

# strict: a schema integer or boolean is not read from false, 1 or "5" (lax pydantic would)
_strict = ConfigDict(extra="forbid", allow_inf_nan=False, strict=True)
#: exactly one of numbers and symbols (validate.read_species), as a schema can say it
_ONE_SPECIES_LIST: dict[str, Any] = {
    "anyOf": [
        {
            "required": [given],
            "properties": {given: {"type": "array"}, other: {"type": "null"}},
        }
        for given, other in (("numbers", "symbols"), ("symbols", "numbers"))
    ]
}
_structure = ConfigDict(**_strict, json_schema_extra=_ONE_SPECIES_LIST)


class StructureIn(BaseModel):
    """One structure: species (``numbers`` or ``symbols``), positions, optional cell/pbc."""

    model_config = _structure

    numbers: Numbers | None = None
    symbols: Symbols | None = None
    positions: Positions
    cell: Cell | None = None
    pbc: Pbc | None = None
    arrays: PerAtomArrays | None = None


class CalculateRequest(StructureIn):
    """``POST /v1/calculate``: one structure and what to compute."""

    properties: list[Property] | None = Field(
        None,
        description="What to return. Default: energy, forces and stress (stress only for "
        "periodic structures). 'energies' (per atom), 'charges', 'dipole' and 'bec' depend "
        "on the model (GET /v1/models lists its outputs).",
    )
    model: str | None = Field(None, max_length=200, description="Model name (default model).")


class BatchRequest(BaseModel):
    """``POST /v1/calculate/batch``: several structures, evaluated together."""

    model_config = _strict

    structures: list[StructureIn] = Field(..., min_length=1)
    properties: list[Property] | None = None
    model: str | None = Field(None, max_length=200)


class Result(BaseModel):
    """What was computed for one structure (ASE units). Absent properties are null."""

    n_atoms: int
    energy: float = Field(..., description="eV")
    free_energy: float = Field(..., description="eV (equal to energy)")
    forces: list[list[float]] | None = Field(None, description="eV/Å, one row per atom")
    stress: list[float] | None = Field(
        None, description="eV/Å^3, Voigt order xx yy zz yz xz xy, ASE sign convention"
    )
    stress_tensor: list[list[float]] | None = Field(None, description="eV/Å^3, 3x3")
    virial: list[list[float]] | None = Field(None, description="eV, -stress x volume")
    energies: list[float] | None = Field(None, description="eV per atom")
    charges: list[float] | list[list[float]] | None = Field(
        None,
        description="latent charges of long-range models in elementary charges, one per atom "
        "(one row of n_q channels per atom for multi-channel models)",
    )
    dipole: list[float] | None = Field(
        None, description="electric dipole moment (e·Å), x y z, of dipole/BEC models"
    )
    bec: list[list[list[float]]] | None = Field(
        None,
        description="Born effective charges (e), [atom][a][b] = d dipole_b / d position_a "
        "of that atom",
    )

    energy_uncertainty: float | None = Field(
        None,
        description="committee models: calibrated spread of the energy (eV), alpha x the "
        "members' sample standard deviation",
    )
    forces_uncertainty: list[float] | None = Field(
        None,
        description="committee models: calibrated spread of each atom's force (eV/Å), alpha x "
        "the norm of the per-component standard deviations",
    )
    committee_energies: list[float] | None = Field(
        None, description="committee models: each member's energy (eV), not rescaled"
    )
    committee_forces: list[list[list[float]]] | None = Field(
        None, description="committee models: [member][atom][xyz] forces (eV/Å), not rescaled"
    )
    committee_virials: list[list[list[float]]] | None = Field(
        None, description="committee models: [member] 3x3 virial (eV), not rescaled"
    )


_SHA_NOTE = (
    "the model version that computed the reply: the short SHA-256 of its file(s), as in "
    "GET /v1/models (null for a model built in memory)"
)


class CalculateResponse(Result):
    model: str
    model_sha: str | None = Field(None, description=_SHA_NOTE)


class BatchResponse(BaseModel):
    model: str
    model_sha: str | None = Field(None, description=_SHA_NOTE)
    results: list[Result]


class ErrorResponse(BaseModel):
    error: str = Field(..., description="stable error kind, e.g. invalid_input")
    message: str
    field: str | None = Field(None, description="dotted path of the offending input")
    errors: list[dict[str, Any]] | None = None


class CommitteeMember(BaseModel):
    name: str = Field(..., description="the member's name (its file's stem)")
    family: list[str] = Field(..., description="the member's model families, e.g. cace")
    n_parameters: int


class CommitteeOut(BaseModel):
    """A committee model: its members and the calibration of its uncertainty."""

    size: int = Field(..., description="number of members M")
    alpha: float = Field(
        ...,
        description="calibration factor: uncertainties are alpha x the members' sample "
        "standard deviation (i-PI's <alpha>); members' own outputs are not rescaled",
    )
    calibration: dict[str, Any] = Field(
        ..., description="how alpha was fitted (cace-server calibrate): data, structures, ..."
    )
    evaluation: str | None = Field(
        None, description="how the members are evaluated: shared edge pass or member loop"
    )
    members: list[CommitteeMember]


class ModelOut(BaseModel):
    name: str
    default: bool
    elements: list[int]
    symbols: list[str]
    cutoff: float
    dtype: str
    device: str
    n_parameters: int
    has_charges: bool
    per_atom_energies: bool
    family: list[str] = Field(
        ..., description="the model families it is built of, e.g. cace, combine, les, polarization"
    )
    long_range: bool
    outputs: list[str] = Field(
        ..., description="properties this model computes (values of 'properties')"
    )
    required_inputs: list[str] = Field(
        ..., description="per-atom inputs every structure must bring in 'arrays'"
    )
    description: dict[str, Any] = Field(..., description="the model's own description")
    source: str | None = Field(
        ...,
        description="the model file (files of a committee); its full path only on a server "
        "with a token, else the file name",
    )
    sha256: str | None = Field(None, description="SHA-256 of the model file, when from a file")
    model_sha: str | None = Field(
        None,
        description="the serving version: short SHA-256 of the file (a committee: of its "
        "members' digests); every calculate reply and i-PI extras carry it",
    )
    committee: CommitteeOut | None = Field(
        None, description="committee models: members and calibration (null for one model)"
    )


class ModelsResponse(BaseModel):
    default: str
    models: list[ModelOut]


_PORT = "(?:[1-9][0-9]{0,3}|[1-5][0-9]{4}|6[0-4][0-9]{3}|65[0-4][0-9]{2}|655[0-2][0-9]|6553[0-5])"
#: what cace_server.ipi.address.parse_address reads (its socket path length aside)
_IPI_ADDRESS = (
    r"^(?:(?:unix|shm):[^\x00]+|(?:tcp:)?(?:\[[^\]]*\]|(?:[^\[\x00][^\x00]*)?):" + _PORT + ")$"
)


class IpiConnectRequest(BaseModel):
    """``POST /v1/ipi/connections``: connect to a running i-PI."""

    model_config = _structure

    address: str = Field(
        ...,
        max_length=300,
        description="unix:NAME (i-PI's sockets_prefix + NAME), unix:/abs/path, shm:NAME, HOST:PORT",
        json_schema_extra={"pattern": _IPI_ADDRESS},
    )
    clients: Integer = Field(1, ge=1, description="connections (one per bead, or 1 when batched)")
    model: str | None = Field(None, max_length=200)
    numbers: Numbers | None = None
    symbols: Symbols | None = Field(
        None, description="species of i-PI's atoms, in order (i-PI does not send them)"
    )
    pbc: bool | None = Field(None, description="default: periodic unless i-PI's cell is zero")
    arrays: PerAtomArrays | None = None
    bec: bool = Field(
        True,
        description="send i-PI Born effective charges (extra 'BEC') when the model has them",
    )
    reconnect: bool = Field(False, description="wait for the next i-PI at the same address")
    connect_timeout: float = Field(60.0, gt=0, le=86400, description="seconds to wait for i-PI")
    sockets_prefix: str = Field(
        "/tmp/ipi_",
        max_length=200,
        json_schema_extra={"pattern": "^/"},
        description="absolute path prefix of unix:NAME addresses",
    )


class IpiConnection(BaseModel):
    name: str
    address: str
    transport: str
    state: str
    steps: int
    structures: int
    sessions: int
    bead_index: int | None
    batch_size: int
    last_error: str | None
    last_step_seconds: float | None


class IpiGroup(BaseModel):
    id: str
    address: str
    model: str
    clients: int
    state: str = Field(..., description="connecting, running or closed")
    connections: list[IpiConnection]


class IpiGroupsResponse(BaseModel):
    groups: list[IpiGroup]
