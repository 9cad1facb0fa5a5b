"""One structure of a job as ASE sees it: atoms with constraints, masses, velocities.

Built once from the request; each run works on its own copy (``atoms()``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt
from ase import Atoms, units
from ase.constraints import FixAtoms

from cace_server.structures import Structure


@dataclass(frozen=True)
class JobItem:
    """A structure of a job and what ASE needs beyond it.

    ``fixed``: indices of atoms held in place (ASE's ``FixAtoms``). ``masses`` (amu;
    default ASE's). ``velocities`` in Å/fs (MD; default: drawn or zero).
    """

    structure: Structure
    fixed: tuple[int, ...] = ()
    masses: npt.NDArray[np.float64] | None = None
    velocities: npt.NDArray[np.float64] | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.structure)

    def atoms(self) -> Atoms:
        s = self.structure
        atoms = Atoms(numbers=s.numbers, positions=s.positions, cell=s.cell, pbc=s.pbc)
        if self.masses is not None:
            atoms.set_masses(self.masses)
        if self.fixed:
            atoms.set_constraint(FixAtoms(indices=list(self.fixed)))
        if self.velocities is not None:
            atoms.set_velocities(self.velocities / units.fs)  # Å/fs -> ASE's time unit
        return atoms

    def free_mask(self) -> npt.NDArray[np.bool_] | None:
        """Atoms not held fixed (None: all are free)."""
        if not self.fixed:
            return None
        mask = np.ones(len(self), dtype=bool)
        mask[list(self.fixed)] = False
        return mask

    @classmethod
    def from_ase(cls, atoms: Atoms) -> JobItem:
        """From ASE atoms: their ``FixAtoms`` constraints, masses and velocities are kept."""
        fixed: list[int] = []
        for constraint in atoms.constraints:
            if isinstance(constraint, FixAtoms):
                fixed.extend(int(i) for i in constraint.get_indices())
        velocities = atoms.get_velocities()
        has_velocities = velocities is not None and bool(np.any(velocities))
        return cls(
            Structure.from_ase(atoms),
            tuple(sorted(set(fixed))),
            np.asarray(atoms.get_masses(), dtype=np.float64) if atoms.has("masses") else None,
            velocities * units.fs if has_velocities else None,
        )


def check_fixed(fixed: Sequence[int], n_atoms: int) -> str | None:
    """Why ``fixed`` is not a valid set of atom indices for ``n_atoms`` atoms (None: it is)."""
    bad = [i for i in fixed if not 0 <= int(i) < n_atoms]
    if bad:
        return f"atom index {bad[0]} out of range for {n_atoms} atoms"
    return None
