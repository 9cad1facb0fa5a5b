"""Neighbour lists (from vesin) and the collation of structures into one graph.

Edges follow the reference convention: an edge carries information from a sender
atom to a receiver atom, its vector is r_receiver - r_sender (with the periodic
image shift), and the A-basis sums edges into their receiver. Edges are sorted by
receiver so that a contiguous block of atoms owns a contiguous block of edges,
which is what lets the model evaluate large systems in bounded memory.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import torch
import vesin
from ase.data import chemical_symbols

from cace_server.structures import Structure, StructureError


@dataclass
class PreparedStructure:
    """A validated structure with its species indices and neighbour list."""

    structure: Structure
    species: npt.NDArray[np.int64]  # index into the model's element list
    receivers: npt.NDArray[np.int64]  # [n_pairs], sorted
    senders: npt.NDArray[np.int64]  # [n_pairs]
    unit_shifts: npt.NDArray[np.float64]  # [n_pairs, 3], image of the sender in cell units

    @property
    def n_atoms(self) -> int:
        return len(self.structure)

    @property
    def n_pairs(self) -> int:
        return int(self.receivers.shape[0])


def species_indices(
    numbers: npt.NDArray[np.int64], elements: Sequence[int]
) -> npt.NDArray[np.int64]:
    """Map atomic numbers to positions in ``elements``; unknown elements are an error."""
    lookup = np.full(119, -1, dtype=np.int64)
    lookup[np.asarray(elements)] = np.arange(len(elements))
    species = lookup[numbers]
    if np.any(species < 0):
        unknown = sorted({int(z) for z in numbers[species < 0]})
        names = ", ".join(f"{chemical_symbols[z]} (Z={z})" for z in unknown)
        known = ", ".join(chemical_symbols[z] for z in elements)
        raise StructureError(f"element(s) {names} not supported by this model (it knows {known})")
    return species


def plane_spacings(cell: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """Distance between lattice planes along each cell vector."""
    return np.asarray(1.0 / np.linalg.norm(np.linalg.inv(cell), axis=0))


# vesin's cell list caps its cells at 1e5 by scaling every direction down; a
# direction that ends with zero cells makes it divide by zero (SIGFPE: the process
# dies). Such geometries (very long, thin cells; huge vacuum) are refused first.
_VESIN_MAX_CELLS = 1e5


def _vesin_spacings(structure: Structure) -> npt.NDArray[np.float64]:
    """Face distances of vesin's bounding box: periodic directions from the cell (its
    non-periodic rows made orthonormal to the periodic ones), non-periodic ones from
    the Cartesian extent of the positions along that axis (+1 %, at least 1 Å)."""
    pbc = structure.pbc
    periodic = [k for k in range(3) if pbc[k]]
    matrix = np.eye(3) if not periodic else structure.cell.astype(np.float64).copy()
    if len(periodic) == 1:
        a = matrix[periodic[0]] / np.linalg.norm(matrix[periodic[0]])
        b = np.array([0.0, 1.0, 0.0]) if abs(a[1]) <= 0.9 else np.array([0.0, 0.0, 1.0])
        c = np.cross(a, b)
        c /= np.linalg.norm(c)
        matrix[(periodic[0] + 1) % 3] = np.cross(c, a)
        matrix[(periodic[0] + 2) % 3] = c
    elif len(periodic) == 2:
        c = np.cross(matrix[periodic[0]], matrix[periodic[1]])
        matrix[3 - periodic[0] - periodic[1]] = c / np.linalg.norm(c)
    spacings = plane_spacings(matrix)
    extent = np.ptp(structure.positions, axis=0)
    extent[extent < 1e-6] = 1.0
    return np.where(pbc, spacings, np.maximum(1.01 * extent, 1.0))


def check_neighbor_grid(structure: Structure, cutoff: float) -> None:
    """Raise StructureError for geometries that would crash vesin's cell list."""
    spacings = _vesin_spacings(structure)
    n = np.maximum(np.trunc(spacings / cutoff), 1.0)
    if float(np.prod(n)) <= _VESIN_MAX_CELLS:
        return
    ratio_xy, ratio_yz = n[0] / n[1], n[1] / n[2]
    nz = np.trunc(np.cbrt(_VESIN_MAX_CELLS / (ratio_xy * ratio_yz * ratio_yz)))
    ny = np.trunc(ratio_yz * nz)
    nx = np.trunc(ratio_xy * ny)
    # one more cell of margin than vesin needs: its arithmetic may round differently
    if min(nx, ny, nz) < 2:
        raise StructureError(
            f"the structure is too elongated for the neighbour list: it spans "
            f"{spacings.max():.3g} Å in one direction and {spacings.min():.3g} Å in another "
            f"(cutoff {cutoff:g} Å); use a less extreme cell or less vacuum"
        )


def neighbor_list(
    structure: Structure, cutoff: float
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[np.float64]]:
    """Full neighbour list within ``cutoff``: (receivers, senders, sender unit shifts)."""
    positions = structure.positions
    pbc = structure.pbc
    if pbc.any():
        cell = structure.cell.copy()
        if abs(np.linalg.det(cell)) < 1e-8:
            raise StructureError(
                "cell is singular: a structure with periodic directions needs three "
                "linearly independent cell vectors"
            )
    else:
        cell = np.zeros((3, 3))
    check_neighbor_grid(structure, cutoff)
    calculator = vesin.NeighborList(cutoff=float(cutoff), full_list=True, sorted=True)
    try:
        i, j, shifts = calculator.compute(
            points=positions, box=cell, periodic=[bool(p) for p in pbc], quantities="ijS"
        )
    except Exception as exc:  # vesin raises RuntimeError/ValueError with its own text
        raise StructureError(f"neighbour list failed: {exc}") from exc
    # vesin gives D = r_j - r_i + S.cell for pair (i, j). We take i as the receiver
    # and j as the sender, so the sender's image is at r_j + S.cell and the edge
    # vector r_i - (r_j + S.cell) is -D.
    receivers = np.asarray(i, dtype=np.int64)
    senders = np.asarray(j, dtype=np.int64)
    unit_shifts = np.asarray(shifts, dtype=np.float64)
    if receivers.size > 1 and np.any(np.diff(receivers) < 0):
        order = np.argsort(receivers, kind="stable")
        receivers, senders, unit_shifts = receivers[order], senders[order], unit_shifts[order]
    return receivers, senders, unit_shifts


def prepare_structure(
    structure: Structure, elements: Sequence[int], cutoff: float
) -> PreparedStructure:
    structure.validate()
    species = species_indices(structure.numbers, elements)
    receivers, senders, unit_shifts = neighbor_list(structure, cutoff)
    return PreparedStructure(structure, species, receivers, senders, unit_shifts)


@dataclass
class GraphBatch:
    """Several structures as one disjoint graph, as tensors on the model's device."""

    positions: torch.Tensor  # [N, 3] float64
    cell: torch.Tensor  # [B, 3, 3] float64
    pbc: torch.Tensor  # [B, 3] bool
    species: torch.Tensor  # [N]
    system: torch.Tensor  # [N] index of the structure each atom belongs to
    receivers: torch.Tensor  # [E], sorted
    senders: torch.Tensor  # [E]
    unit_shifts: torch.Tensor  # [E, 3] float64
    n_atoms: list[int]
    # Most edges into one receiver, known on the host (spares the model a read-back).
    max_neighbors: int | None = None
    # The same cells and periodicity on the host, for shape decisions made before the
    # call (the long-range plan) without reading the device tensors back.
    cell_host: npt.NDArray[np.float64] | None = None
    pbc_host: npt.NDArray[np.bool_] | None = None

    @property
    def n_systems(self) -> int:
        return len(self.n_atoms)


def collate(prepared: Sequence[PreparedStructure], device: torch.device) -> GraphBatch:
    if not prepared:
        raise ValueError("cannot collate an empty list of structures")
    n_atoms = [p.n_atoms for p in prepared]
    offsets = np.concatenate([[0], np.cumsum(n_atoms)[:-1]]).astype(np.int64)

    def cat(arrays: list[np.ndarray]) -> np.ndarray:
        return arrays[0] if len(arrays) == 1 else np.concatenate(arrays)

    positions = cat([p.structure.positions for p in prepared])
    species = cat([p.species for p in prepared])
    system = np.repeat(np.arange(len(prepared), dtype=np.int64), n_atoms)
    receivers = cat([p.receivers + o for p, o in zip(prepared, offsets, strict=True)])
    senders = cat([p.senders + o for p, o in zip(prepared, offsets, strict=True)])
    unit_shifts = cat([p.unit_shifts for p in prepared])
    cell = np.stack([p.structure.cell for p in prepared])
    pbc = np.stack([p.structure.pbc for p in prepared])

    def t(a: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
        return torch.as_tensor(a, dtype=dtype).to(device, non_blocking=True)

    return GraphBatch(
        positions=t(positions, torch.float64),
        cell=t(cell, torch.float64),
        pbc=t(pbc, torch.bool),
        species=t(species, torch.long),
        system=t(system, torch.long),
        receivers=t(receivers, torch.long),
        senders=t(senders, torch.long),
        unit_shifts=t(unit_shifts, torch.float64),
        n_atoms=n_atoms,
        max_neighbors=max(
            (int(np.bincount(p.receivers).max()) for p in prepared if p.n_pairs), default=0
        ),
        cell_host=cell.astype(np.float64),
        pbc_host=pbc.astype(bool),
    )
