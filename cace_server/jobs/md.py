"""A short MD run: one of ASE's integrators on one structure, frames kept at a stride.

As for relaxations, the run is ASE's own (``VelocityVerlet(atoms, dt).run(steps)``,
``Langevin``, ``NVTBerendsen``, ``NPTBerendsen``, ``NoseHooverChainNVT``); the job
only chooses the integrator from the parameters, draws the starting velocities
(Maxwell-Boltzmann, seeded per structure) where a structure brings none, and records
frames through an ASE observer. Velocities are reported in Å/fs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from ase import Atoms, units
from ase.constraints import FixCom
from ase.md import velocitydistribution
from ase.md.langevin import Langevin
from ase.md.md import MolecularDynamics
from ase.md.nose_hoover_chain import NoseHooverChainNVT
from ase.md.nptberendsen import NPTBerendsen
from ase.md.nvtberendsen import NVTBerendsen
from ase.md.velocitydistribution import Stationary
from ase.md.verlet import VelocityVerlet

from cace_server.jobs.items import JobItem
from cace_server.jobs.lockstep import Body, LockstepCalculator
from cace_server.jobs.params import MDParams


def md_calculator(item: JobItem, params: MDParams) -> LockstepCalculator:
    return LockstepCalculator(
        stress=params.needs_stress, arrays=item.structure.arrays, free=item.free_mask()
    )


def structure_rng(params: MDParams, index: int) -> np.random.Generator:
    """The random numbers of structure ``index``: the same for the same seed, whatever
    else the job holds or in which order its structures run."""
    return np.random.default_rng([params.seed, index])


def draw_velocities(atoms: Atoms, temperature_K: float, rng: np.random.Generator) -> None:
    """Maxwell-Boltzmann momenta at ``temperature_K`` (ASE's ``thermalize_momenta``,
    called ``MaxwellBoltzmannDistribution`` before ASE 3.29)."""
    thermalize = getattr(velocitydistribution, "thermalize_momenta", None)
    if thermalize is not None:
        thermalize(atoms, temperature_K, rng=rng)
    else:  # pragma: no cover - ASE < 3.29
        velocitydistribution.MaxwellBoltzmannDistribution(
            atoms, temperature_K=temperature_K, rng=rng
        )


def integrator(atoms: Atoms, params: MDParams, rng: np.random.Generator) -> MolecularDynamics:
    """The ASE integrator ``params`` names, on ``atoms``."""
    dt = params.timestep_fs * units.fs
    if params.integrator == "velocity_verlet":
        return VelocityVerlet(atoms, timestep=dt, logfile=None)
    assert params.temperature_K is not None  # MDParams requires it for the thermostats
    if params.integrator == "langevin":
        if params.fix_com:
            atoms.set_constraint([*atoms.constraints, FixCom()])
        return Langevin(
            atoms,
            timestep=dt,
            temperature_K=params.temperature_K,
            friction=params.friction_per_fs / units.fs,
            fixcm=False,
            rng=rng,
            logfile=None,
        )
    if params.integrator == "berendsen_nvt":
        return NVTBerendsen(
            atoms,
            timestep=dt,
            temperature_K=params.temperature_K,
            taut=params.taut_fs * units.fs,
            logfile=None,
        )
    if params.integrator == "berendsen_npt":
        return NPTBerendsen(
            atoms,
            timestep=dt,
            temperature_K=params.temperature_K,
            taut=params.taut_fs * units.fs,
            pressure_au=params.pressure,
            taup=params.taup_fs * units.fs,
            compressibility_au=params.compressibility,
            logfile=None,
        )
    return NoseHooverChainNVT(
        atoms,
        timestep=dt,
        temperature_K=params.temperature_K,
        tdamp=params.tdamp_fs * units.fs,
        tchain=params.tchain,
        logfile=None,
    )


def _temperature(atoms: Atoms) -> float | None:
    """Kinetic temperature, or None where the atoms have no degree of freedom left (one
    atom whose centre of mass is fixed): ASE would divide zero by zero."""
    if atoms.get_number_of_degrees_of_freedom() <= 0:
        return None
    return float(atoms.get_temperature())


def _state(atoms: Atoms, step: int, params: MDParams, fields: Sequence[str]) -> dict[str, Any]:
    """One frame: energies and temperature, and the per-atom arrays asked for."""
    frame: dict[str, Any] = {
        "step": step,
        "time_fs": step * params.timestep_fs,
        "energy": float(atoms.get_potential_energy()),
        "kinetic_energy": float(atoms.get_kinetic_energy()),
        "temperature_K": _temperature(atoms),
    }
    if "positions" in fields:
        frame["positions"] = atoms.get_positions()
    if "velocities" in fields:
        frame["velocities"] = atoms.get_velocities() * units.fs
    if "forces" in fields:
        frame["forces"] = atoms.get_forces()
    if "cell" in fields:
        frame["cell"] = atoms.cell.array.copy()
    return frame


def md_body(item: JobItem, params: MDParams, index: int) -> Body:
    """What one structure of an MD job runs in its greenlet."""

    def body(calc: LockstepCalculator) -> dict[str, Any]:
        atoms = item.atoms()
        rng = structure_rng(params, index)
        start = params.start_temperature
        if item.velocities is None and start is not None and start > 0:
            draw_velocities(atoms, start, rng)
            if params.zero_momentum:
                # ASE rescales to the drawn temperature afterwards: a lone atom has no
                # kinetic energy left to rescale (0/0), and simply stands still
                Stationary(atoms, preserve_temperature=len(atoms) > 1)
        atoms.calc = calc
        dyn = integrator(atoms, params, rng)
        frames: list[dict[str, Any]] = []
        if params.stride > 0:
            fields = list(params.frame_fields)
            dyn.attach(
                lambda: frames.append(_state(atoms, dyn.nsteps, params, fields)),
                interval=params.stride,
            )
        dyn.run(params.steps)
        record = _state(
            atoms, int(dyn.nsteps), params, ["positions", "velocities", "forces", "cell"]
        )
        record.update(status="done", steps=int(dyn.nsteps), frames=frames, pbc=atoms.pbc.tolist())
        if params.needs_stress:
            record["stress"] = atoms.get_stress()
        return record

    return body
