"""The two value types every layer exchanges: a structure in, a prediction out.

Units are ASE's throughout: Å, eV, eV/Å, stress in eV/Å^3 with ASE's sign
convention (stress = (1/V) dE/d(strain), positive when the system wants to shrink).
Frontends convert from their own units (i-PI: Bohr/Hartree) before building a
:class:`Structure`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt

from cace_server.outputs import ARRAY_FIELDS, Outputs


class StructureError(ValueError):
    """A structure that cannot be evaluated; the message names the problem."""


#: Largest coordinate (Å) evaluated as given. Beyond it float64 keeps less than about
#: 1e-10 Å of an edge vector: periodic directions are wrapped into the cell first (in
#: float64, before any float32 work), and what is still beyond it (a non-periodic
#: direction, or a cell that large) is refused.
MAX_COORDINATE = 1e6


def completed_cell(
    cell: npt.NDArray[np.float64], pbc: npt.NDArray[np.bool_]
) -> npt.NDArray[np.float64]:
    """``cell`` (float64, rows) with each non-periodic row (possibly zero) replaced by a
    unit vector normal to the periodic ones, so that fractional coordinates along the
    periodic directions are defined; with no periodic direction, the cell as given."""
    periodic = [k for k in range(3) if pbc[k]]
    basis = cell.astype(np.float64).copy()
    if len(periodic) == 1:
        a = basis[periodic[0]] / np.linalg.norm(basis[periodic[0]])
        b = np.array([0.0, 1.0, 0.0]) if abs(a[1]) <= 0.9 else np.array([0.0, 0.0, 1.0])
        c = np.cross(a, b)
        c /= np.linalg.norm(c)
        basis[(periodic[0] + 1) % 3] = np.cross(c, a)
        basis[(periodic[0] + 2) % 3] = c
    elif len(periodic) == 2:
        c = np.cross(basis[periodic[0]], basis[periodic[1]])
        basis[3 - periodic[0] - periodic[1]] = c / np.linalg.norm(c)
    return basis


def wrap_far_positions(
    positions: npt.NDArray[np.float64],
    cell: npt.NDArray[np.float64],
    pbc: npt.NDArray[np.bool_],
    bound: float = MAX_COORDINATE,
) -> npt.NDArray[np.float64]:
    """``positions`` with every atom moved into the cell along the periodic directions
    (whole cell vectors, in float64) if any coordinate exceeds ``bound``; as given
    otherwise. Units are the caller's (i-PI wraps in Bohr, before converting)."""
    if not pbc.any() or not np.abs(positions).max(initial=0.0) > bound:
        return positions
    basis = completed_cell(cell, pbc)
    if not abs(np.linalg.det(basis)) > 1e-8:
        return positions  # a degenerate cell: validation says so, or the bound refuses
    fractional = positions @ np.linalg.inv(basis)
    images = np.where(pbc, np.floor(fractional), 0.0)
    # Whole cell vectors subtracted from the given positions: for a cell and positions
    # whose sums are exact in float64, the result is exactly the wrapped structure.
    return np.asarray(positions - images @ cell, dtype=np.float64)


@dataclass(frozen=True)
class Structure:
    """One atomic configuration.

    ``cell`` rows are the lattice vectors (Å); ``pbc`` says which of them are
    periodic. A non-periodic structure may have a zero cell. ``arrays`` holds extra
    per-atom model inputs by name (float64, shape (N,) or (N, k)), e.g.
    ``charge_states`` for models that read them.
    """

    numbers: npt.NDArray[np.int64]
    positions: npt.NDArray[np.float64]
    cell: npt.NDArray[np.float64] = field(default_factory=lambda: np.zeros((3, 3)))
    pbc: npt.NDArray[np.bool_] = field(default_factory=lambda: np.zeros(3, dtype=bool))
    arrays: Mapping[str, npt.NDArray[np.float64]] = field(
        default_factory=lambda: MappingProxyType({})
    )

    @classmethod
    def create(
        cls,
        numbers: Any,
        positions: Any,
        cell: Any = None,
        pbc: Any = None,
        arrays: Mapping[str, Any] | None = None,
    ) -> Structure:
        """Build and validate a structure from array-likes."""
        try:
            numbers_arr = np.asarray(numbers, dtype=np.int64).reshape(-1)
            positions_arr = np.asarray(positions, dtype=np.float64)
            cell_arr = np.zeros((3, 3)) if cell is None else np.asarray(cell, dtype=np.float64)
            if pbc is None:
                pbc_arr = np.zeros(3, dtype=bool)
            else:
                pbc_arr = np.broadcast_to(np.asarray(pbc, dtype=bool), (3,)).copy()
            extra = {
                str(name): np.asarray(value, dtype=np.float64)
                for name, value in (arrays or {}).items()
            }
        except (TypeError, ValueError) as exc:
            raise StructureError(f"cannot read structure arrays: {exc}") from exc
        if cell_arr.shape == (3,):
            cell_arr = np.diag(cell_arr)
        structure = cls(numbers_arr, positions_arr, cell_arr, pbc_arr, MappingProxyType(extra))
        structure.validate()
        wrapped = wrap_far_positions(positions_arr, cell_arr, pbc_arr)
        if wrapped is not positions_arr:
            structure = cls(numbers_arr, wrapped, cell_arr, pbc_arr, MappingProxyType(extra))
        far = np.abs(wrapped).max(initial=0.0)
        if far > MAX_COORDINATE:
            after = " after wrapping the periodic directions into the cell" if pbc_arr.any() else ""
            raise StructureError(
                f"a coordinate is {far:.3g} Å from the origin{after}; "
                f"at most {MAX_COORDINATE:g} Å is evaluated (float64 would lose the "
                "interatomic distances): move the structure near the origin"
            )
        return structure

    @classmethod
    def from_ase(cls, atoms: Any) -> Structure:
        """Build from an ``ase.Atoms`` object."""
        return cls.create(
            atoms.get_atomic_numbers(),
            atoms.get_positions(),
            np.asarray(atoms.get_cell()),
            atoms.get_pbc(),
        )

    def validate(self) -> None:
        """Raise :class:`StructureError` for shapes or values no model can use."""
        n = self.numbers.shape[0]
        if n == 0:
            raise StructureError("structure has no atoms")
        if self.positions.shape != (n, 3):
            raise StructureError(
                f"positions must have shape ({n}, 3) for {n} atoms, got {self.positions.shape}"
            )
        if self.cell.shape != (3, 3):
            raise StructureError(f"cell must have shape (3, 3), got {self.cell.shape}")
        if self.pbc.shape != (3,):
            raise StructureError(f"pbc must have 3 entries, got {self.pbc.shape}")
        if not np.all(np.isfinite(self.positions)):
            raise StructureError("positions contain NaN or infinity")
        if not np.all(np.isfinite(self.cell)):
            raise StructureError("cell contains NaN or infinity")
        if np.any(self.numbers <= 0) or np.any(self.numbers > 118):
            raise StructureError("atomic numbers must lie in 1..118")
        if self.pbc.any():
            periodic_vectors = self.cell[self.pbc]
            if np.any(np.linalg.norm(periodic_vectors, axis=1) < 1e-8):
                raise StructureError("a periodic direction has a zero cell vector")
            if abs(np.linalg.det(self.cell)) < 1e-8 and self.pbc.all():
                raise StructureError("cell is singular (zero volume)")
        for name, value in self.arrays.items():
            if value.ndim not in (1, 2) or value.shape[0] != n:
                raise StructureError(
                    f"per-atom input {name!r} must have shape ({n},) or ({n}, k), got {value.shape}"
                )
            if not np.all(np.isfinite(value)):
                raise StructureError(f"per-atom input {name!r} contains NaN or infinity")

    def __len__(self) -> int:
        return int(self.numbers.shape[0])

    @property
    def is_periodic(self) -> bool:
        return bool(self.pbc.any())

    @property
    def volume(self) -> float:
        return float(abs(np.linalg.det(self.cell)))


class BatchCost(NamedTuple):
    """What one prepared structure adds to a batch, in the units the engine bounds.

    A model reports it (``ServedModel.batch_cost``): a committee of M members, say,
    costs M times the pairs of one. The engine's ``max_batch_atoms`` and
    ``max_batch_pairs`` bound the sums over a batch.
    """

    atoms: int
    pairs: int


@dataclass
class Prediction:
    """What a model computed for one structure (ASE units).

    ``stress`` and ``virial`` are present for 3-D periodic structures when
    requested; ``virial = -stress * volume`` (eV), the convention of ASE and i-PI.
    ``charges`` holds the latent charges of long-range (CACE-LR, LES) and dipole
    models in elementary charges, shape (N,) or (N, n_channels). ``dipole`` (e·Å)
    and ``bec`` (Born effective charges, e, shape (N, 3, 3) with
    ``bec[i, a, b] = d dipole_b / d r_ia``) come from dipole models.
    """

    energy: float
    forces: npt.NDArray[np.float64] | None = None
    stress: npt.NDArray[np.float64] | None = None
    virial: npt.NDArray[np.float64] | None = None
    energies: npt.NDArray[np.float64] | None = None
    charges: npt.NDArray[np.float64] | None = None
    dipole: npt.NDArray[np.float64] | None = None
    bec: npt.NDArray[np.float64] | None = None
    # Committee models (M members): the calibrated spread of the energy and of each
    # atom's force, and each member's energy, forces and virial (not rescaled).
    energy_uncertainty: float | None = None
    forces_uncertainty: npt.NDArray[np.float64] | None = None
    committee_energies: npt.NDArray[np.float64] | None = None
    committee_forces: npt.NDArray[np.float64] | None = None
    committee_virials: npt.NDArray[np.float64] | None = None
    # Per-atom descriptors (the node features the heads read), when asked for.
    descriptors: npt.NDArray[np.float64] | None = None
    extras: dict[str, Any] = field(default_factory=dict)
    # What the structure added to its batch (set by the engine, for callers that
    # account device time, such as jobs): not an output, never serialised.
    cost: BatchCost | None = None

    def keep_only(self, outputs: Outputs) -> Prediction:
        """Drop (in place) the arrays of outputs not in ``outputs``; returns self.

        A model may compute more than was asked (cheap outputs come with the energy
        pass, and a batch computes what any of its structures asked for); a caller
        gets exactly what it asked for.
        """
        wanted = outputs.fields
        for name in ARRAY_FIELDS:
            if name not in wanted:
                setattr(self, name, None)
        return self

    def array_outputs(self) -> dict[str, npt.NDArray[np.float64]]:
        """The optional outputs present, by ``Prediction`` attribute name, as arrays
        (a scalar such as ``energy_uncertainty`` as a 0-d array)."""
        present = {name: getattr(self, name) for name in ARRAY_FIELDS}
        return {name: np.asarray(value) for name, value in present.items() if value is not None}


def voigt(stress: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """A 3x3 stress in ASE's Voigt order xx yy zz yz xz xy (off-diagonals symmetrised)."""
    s = np.asarray(stress, dtype=np.float64).reshape(3, 3)
    s = 0.5 * (s + s.T)
    return s[[0, 1, 2, 1, 0, 0], [0, 1, 2, 2, 2, 1]]
