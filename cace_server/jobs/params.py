"""What a job is asked to do: the parameters of a relaxation or a short MD run.

The names, units and defaults are ASE's (the reference semantics: a job runs ASE's own
optimisers and integrators), with two exceptions made for a wire format: times are in
femtoseconds (``timestep_fs``, ``taut_fs``, ...) and friction in 1/fs, where ASE takes
its internal time unit. Pressures are eV/Å^3 and compressibilities Å^3/eV, as ASE's
``scalar_pressure`` and ``pressure_au``. The same pydantic models check the HTTP body
and the Python API, so a bad value is refused with the name of its field.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    JsonValue,
    ValidationInfo,
    field_validator,
)

# strict: an integer or boolean is not read from false, 1 or "5" (the schema says so)
_strict = ConfigDict(extra="forbid", strict=True)


def _integral(value: Any) -> Any:
    return int(value) if isinstance(value, float) and value.is_integer() else value


#: an integer, also written 100.0 (JSON Schema's integer), but not false or "100"
Integer = Annotated[int, BeforeValidator(_integral)]

#: ASE optimisers a relaxation may use -> the keyword arguments each accepts beyond
#: ``maxstep`` (ASE's names and meanings).
OPTIMIZER_ARGS: dict[str, frozenset[str]] = {
    "FIRE": frozenset(
        {"dt", "dtmax", "Nmin", "finc", "fdec", "astart", "fa", "a", "downhill_check"}
    ),
    "LBFGS": frozenset({"memory", "damping", "alpha"}),
    "BFGS": frozenset({"alpha"}),
    "LBFGSLineSearch": frozenset({"memory", "damping", "alpha"}),
    "BFGSLineSearch": frozenset({"c1", "c2", "alpha", "stpmax"}),
    "MDMin": frozenset({"dt"}),
}
_CANONICAL = {name.lower(): name for name in OPTIMIZER_ARGS}
_ALL_ARGS: list[JsonValue] = [*sorted(set().union(*OPTIMIZER_ARGS.values()))]


def _any_case(words: list[str]) -> str:
    """A JSON-schema pattern (ECMA regex, no inline flags) of ``words`` in any case."""
    spelled = ("".join(f"[{c.upper()}{c.lower()}]" if c.isalpha() else c for c in w) for w in words)
    return "^(" + "|".join(spelled) + ")$"


Integrator = Literal[
    "velocity_verlet", "langevin", "berendsen_nvt", "berendsen_npt", "nose_hoover_chain"
]
FrameField = Literal["positions", "velocities", "forces", "cell"]
#: integrators that hold a temperature (and so need ``temperature_K``)
THERMOSTATS = frozenset({"langevin", "berendsen_nvt", "berendsen_npt", "nose_hoover_chain"})


class RelaxParams(BaseModel):
    """A geometry optimisation (``ase.optimize``), optionally of the cell too."""

    model_config = _strict

    optimizer: str = Field(
        "FIRE",
        description=f"ASE optimiser: one of {', '.join(OPTIMIZER_ARGS)} (any case).",
        json_schema_extra={"pattern": _any_case(list(OPTIMIZER_ARGS))},
    )
    fmax: float = Field(0.05, gt=0, description="converged when every force is below (eV/Å)")
    steps: Integer = Field(1000, ge=0, le=1_000_000, description="most optimiser steps")
    maxstep: float | None = Field(
        None, gt=0, description="largest move of an atom in one step (Å); ASE's default if null"
    )
    optimizer_args: dict[str, float | int | bool] = Field(
        default_factory=dict,
        description="further keyword arguments of the optimiser, by ASE's names "
        "(e.g. FIRE: dt, dtmax, Nmin, finc, fdec, astart, fa, a; LBFGS: memory, damping, alpha)",
        json_schema_extra={"propertyNames": {"enum": _ALL_ARGS}},
    )
    cell: bool = Field(
        False, description="relax the cell too (ASE's FrechetCellFilter); 3-D periodic only"
    )
    scalar_pressure: float = Field(
        0.0, description="external pressure of a cell relaxation (eV/Å^3; 1 GPa = 0.00624 eV/Å^3)"
    )
    hydrostatic_strain: bool = Field(False, description="cell relaxation: shape fixed")
    constant_volume: bool = Field(False, description="cell relaxation: volume fixed")

    @field_validator("optimizer")
    @classmethod
    def _known_optimizer(cls, value: str) -> str:
        name = _CANONICAL.get(value.lower())
        if name is None:
            raise ValueError(
                f"unknown optimizer {value!r}; choose one of {', '.join(OPTIMIZER_ARGS)}"
            )
        return name

    @field_validator("optimizer_args")
    @classmethod
    def _arguments_of_the_optimizer(
        cls, value: dict[str, float | int | bool], info: ValidationInfo
    ) -> dict[str, float | int | bool]:
        name = info.data.get("optimizer")
        if name is None:  # the optimizer itself was refused
            return value
        unknown = sorted(set(value) - OPTIMIZER_ARGS[name])
        if unknown:
            allowed = ", ".join(sorted(OPTIMIZER_ARGS[name]))
            raise ValueError(f"{name} takes no argument {', '.join(unknown)} (it takes: {allowed})")
        return value


class MDParams(BaseModel):
    """A short MD run (``ase.md``): NVE, or NVT/NPT with one of ASE's thermostats."""

    model_config = _strict

    integrator: Integrator = Field(
        "velocity_verlet",
        description="velocity_verlet (NVE), langevin, berendsen_nvt, nose_hoover_chain (NVT), "
        "berendsen_npt (NPT)",
    )
    timestep_fs: float = Field(0.5, gt=0, le=100, description="time step (fs)")
    steps: Integer = Field(100, ge=0, le=10_000_000, description="MD steps")
    temperature_K: float | None = Field(
        None,
        ge=0,
        validate_default=True,
        description="thermostat temperature (K); required by the thermostats",
    )
    initial_temperature_K: float | None = Field(
        None,
        ge=0,
        description="draw Maxwell-Boltzmann velocities at this temperature for structures "
        "that bring none (default: temperature_K, or zero velocities)",
    )
    zero_momentum: bool = Field(
        True, description="remove the centre-of-mass motion of drawn velocities (ASE Stationary)"
    )
    fix_com: bool = Field(
        True,
        description="langevin: keep the centre of mass in place (ASE's FixCom constraint, "
        "what ASE recommends over the deprecated fixcm)",
    )
    seed: Integer = Field(0, ge=0, description="seed of the velocities and the Langevin noise")
    friction_per_fs: float = Field(0.01, gt=0, description="Langevin friction (1/fs)")
    taut_fs: float = Field(100.0, gt=0, description="Berendsen thermostat time (fs)")
    taup_fs: float = Field(1000.0, gt=0, description="Berendsen barostat time (fs)")
    pressure: float = Field(0.0, description="berendsen_npt pressure (eV/Å^3)")
    compressibility: float = Field(
        0.0003, gt=0, description="berendsen_npt compressibility (Å^3/eV; water ~ 4.6e-5/bar)"
    )
    tdamp_fs: float = Field(100.0, gt=0, description="Nose-Hoover chain damping time (fs)")
    tchain: Integer = Field(3, ge=1, le=20, description="Nose-Hoover chain length")
    stride: Integer = Field(
        10, ge=0, description="keep a frame every this many steps (0: only the last state)"
    )
    frame_fields: list[FrameField] = Field(
        default_factory=lambda: list[FrameField](["positions"]),
        description="per-atom arrays of each frame (energies and temperature always come)",
    )

    @field_validator("temperature_K")
    @classmethod
    def _thermostat_has_temperature(cls, value: float | None, info: ValidationInfo) -> float | None:
        integrator = info.data.get("integrator")
        if value is None and integrator in THERMOSTATS:
            raise ValueError(f"integrator {integrator} needs temperature_K")
        return value

    @property
    def needs_stress(self) -> bool:
        return self.integrator == "berendsen_npt"

    @property
    def start_temperature(self) -> float | None:
        if self.initial_temperature_K is not None:
            return self.initial_temperature_K
        return self.temperature_K


JobKind = Literal["relax", "md"]
