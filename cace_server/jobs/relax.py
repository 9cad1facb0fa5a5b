"""A relaxation: ASE's optimiser (and ``FrechetCellFilter`` for the cell) on one structure.

The run is exactly what a user writes with ASE (``FIRE(atoms, logfile=None).run(fmax,
steps)``); only the calculator differs (see ``lockstep.py``).
"""

from __future__ import annotations

from typing import Any

import ase.optimize
import numpy as np
from ase.filters import FrechetCellFilter

from cace_server.jobs.items import JobItem
from cace_server.jobs.lockstep import Body, LockstepCalculator
from cace_server.jobs.params import RelaxParams


def relax_calculator(item: JobItem, params: RelaxParams) -> LockstepCalculator:
    return LockstepCalculator(
        stress=params.cell, arrays=item.structure.arrays, free=item.free_mask()
    )


def relax_body(item: JobItem, params: RelaxParams) -> Body:
    """What one structure of a relaxation job runs in its greenlet."""

    def body(calc: LockstepCalculator) -> dict[str, Any]:
        atoms = item.atoms()
        atoms.calc = calc
        target: Any = atoms
        if params.cell:
            target = FrechetCellFilter(
                atoms,
                hydrostatic_strain=params.hydrostatic_strain,
                constant_volume=params.constant_volume,
                scalar_pressure=params.scalar_pressure,
            )
        kwargs: dict[str, Any] = dict(params.optimizer_args)
        if params.maxstep is not None:
            kwargs["maxstep"] = params.maxstep
        optimizer = getattr(ase.optimize, params.optimizer)(target, logfile=None, **kwargs)
        converged = bool(optimizer.run(fmax=params.fmax, steps=params.steps))
        forces = atoms.get_forces()
        free = item.free_mask()
        norms = np.linalg.norm(forces if free is None else forces[free], axis=1)
        record: dict[str, Any] = {
            "status": "converged" if converged else "not_converged",
            "converged": converged,
            "steps": int(optimizer.nsteps),
            "evaluations": calc.evaluations,
            "energy": float(atoms.get_potential_energy()),
            "fmax": float(norms.max()) if norms.size else 0.0,
            "positions": atoms.get_positions(),
            "forces": forces,
            "cell": atoms.cell.array.copy(),
            "pbc": atoms.pbc.tolist(),
        }
        if params.cell:
            record["stress"] = atoms.get_stress()
        return record

    return body
