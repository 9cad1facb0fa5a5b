"""Neighbour lists (from vesin) and the collation of structures into one graph.

Edges follow the reference convention: an edge carries information from a sender
atom to a receiver atom, its vector is r_receiver - r_sender (with the periodic
image shift), and the A-basis sums edges into their receiver. Edges are sorted by
receiver so that a contiguous block of atoms owns a contiguous block of edges,
which is what lets the model evaluate large systems in bounded memory.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
import vesin
from ase.data import chemical_symbols

from cace_server.structures import Structure, StructureError, completed_cell

# Pair arrays: numpy on the CPU, torch tensors on the model's (CUDA) device.
Pairs = npt.NDArray[np.int64] | torch.Tensor
Shifts = npt.NDArray[np.float64] | torch.Tensor


def _nbytes(array: npt.NDArray[Any] | torch.Tensor) -> int:
    if isinstance(array, torch.Tensor):
        return array.element_size() * array.nelement()
    return int(array.nbytes)


@dataclass
class PreparedStructure:
    """A validated structure with its species indices and neighbour list."""

    structure: Structure
    species: npt.NDArray[np.int64]  # index into the model's element list
    receivers: Pairs  # [n_pairs], sorted
    senders: Pairs  # [n_pairs]
    unit_shifts: Shifts  # [n_pairs, 3], image of the sender in cell units

    @property
    def n_atoms(self) -> int:
        return len(self.structure)

    @property
    def n_pairs(self) -> int:
        return int(self.receivers.shape[0])

    @cached_property
    def max_neighbors(self) -> int:
        """Most edges into one receiver; read once here, in the preparing thread (for a
        list built on the device too), so the model call need not read it back."""
        if self.n_pairs == 0:
            return 0
        if isinstance(self.receivers, np.ndarray):
            return int(np.bincount(self.receivers).max())
        return int(torch.bincount(self.receivers).max())


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
    matrix = np.eye(3) if not periodic else completed_cell(structure.cell, pbc)
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


def _checked_cell(structure: Structure, cutoff: float) -> npt.NDArray[np.float64]:
    """The cell vesin is given (zero when nothing is periodic), after the sanity checks."""
    if structure.pbc.any():
        cell = structure.cell.copy()
        if abs(np.linalg.det(cell)) < 1e-8:
            raise StructureError(
                "cell is singular: a structure with periodic directions needs three "
                "linearly independent cell vectors"
            )
    else:
        cell = np.zeros((3, 3))
    check_neighbor_grid(structure, cutoff)
    return cell


def neighbor_list(
    structure: Structure, cutoff: float, device: torch.device | None = None
) -> tuple[Pairs, Pairs, Shifts]:
    """Full neighbour list within ``cutoff``: (receivers, senders, sender unit shifts).

    numpy arrays, or with ``device`` torch tensors computed on that device.
    """
    cell = _checked_cell(structure, cutoff)
    periodic = [bool(p) for p in structure.pbc]
    calculator = vesin.NeighborList(cutoff=float(cutoff), full_list=True, sorted=True)
    try:
        if device is not None:
            points = torch.as_tensor(structure.positions, dtype=torch.float64).to(device)
            box = torch.as_tensor(cell, dtype=torch.float64).to(device)
            i, j, shifts = calculator.compute(
                points=points, box=box, periodic=periodic, quantities="ijS"
            )
        else:
            i, j, shifts = calculator.compute(
                points=structure.positions, box=cell, periodic=periodic, quantities="ijS"
            )
    except Exception as exc:  # vesin raises RuntimeError/ValueError with its own text
        raise StructureError(f"neighbour list failed: {exc}") from exc
    # vesin gives D = r_j - r_i + S.cell for pair (i, j). We take i as the receiver
    # and j as the sender, so the sender's image is at r_j + S.cell and the edge
    # vector r_i - (r_j + S.cell) is -D.
    if device is not None:
        on_device = i.to(torch.int64)
        # A stable sort on the device (a no-op order for a sorted list) rather than a
        # host check of sortedness, which would wait for the device.
        by_receiver = torch.argsort(on_device, stable=True)
        return (
            on_device[by_receiver],
            j.to(torch.int64)[by_receiver],
            shifts.to(torch.float64)[by_receiver],
        )
    receivers = np.asarray(i, dtype=np.int64)
    senders = np.asarray(j, dtype=np.int64)
    unit_shifts = np.asarray(shifts, dtype=np.float64)
    if receivers.size > 1 and np.any(np.diff(receivers) < 0):
        order = np.argsort(receivers, kind="stable")
        receivers, senders, unit_shifts = receivers[order], senders[order], unit_shifts[order]
    return receivers, senders, unit_shifts


def prepare_structure(
    structure: Structure,
    elements: Sequence[int],
    cutoff: float,
    device: torch.device | None = None,
) -> PreparedStructure:
    structure.validate()
    species = species_indices(structure.numbers, elements)
    receivers, senders, unit_shifts = neighbor_list(structure, cutoff, device)
    return PreparedStructure(structure, species, receivers, senders, unit_shifts)


class VerletList:
    """The neighbour list of one evolving structure, with a skin, rebuilt when needed.

    The list is built at ``cutoff + skin`` and reused while the atoms (the same
    species, the same periodicity) are within ``skin / 2`` of where they were at the
    build and the cell is unchanged: then no pair can have come from beyond
    ``cutoff + skin`` to within ``cutoff``, so the reused list holds every pair
    within the cutoff. On the CPU the pairs beyond the cutoff are dropped (cheap, and
    the model then does the same work as on a fresh list). On a device they are
    kept, since selecting them would wait for the device: they contribute exactly
    zero, because the model's cutoff function and its derivative are exactly zero
    beyond the cutoff (``PolynomialCutoff`` masks r >= cutoff).
    """

    def __init__(
        self,
        elements: Sequence[int],
        cutoff: float,
        skin: float,
        device: torch.device | None = None,
    ) -> None:
        if skin <= 0:
            raise ValueError(f"skin must be positive, got {skin}")
        self.elements = tuple(elements)
        self.cutoff = float(cutoff)
        self.skin = float(skin)
        self.device = device
        self.builds = 0
        self.reuses = 0
        self._lock = threading.Lock()  # one session may be prepared from two threads
        self._reference: Structure | None = None
        self._pairs: tuple[Pairs, Pairs, Shifts] | None = None

    @property
    def nbytes(self) -> int:
        """Bytes the kept list holds (its pairs and the structure it was built for)."""
        with self._lock:
            held = [] if self._pairs is None else list(self._pairs)
            ref = self._reference
        if ref is not None:
            held += [ref.positions, ref.numbers, ref.cell]
        return sum(_nbytes(a) for a in held)

    def covers(self, structure: Structure) -> bool:
        """Whether the kept list is valid for ``structure`` (see the class)."""
        with self._lock:
            return self._pairs is not None and self._still_valid(structure)

    def prepare(self, structure: Structure) -> tuple[PreparedStructure, bool]:
        """(the prepared structure, whether the list was reused)."""
        structure.validate()
        species = species_indices(structure.numbers, self.elements)
        with self._lock:
            reused = self._pairs is not None and self._still_valid(structure)
            if not reused:
                self._pairs = neighbor_list(structure, self.cutoff + self.skin, self.device)
                self._reference = structure
                self.builds += 1
            else:
                self.reuses += 1
            assert self._pairs is not None
            receivers, senders, shifts = self._pairs
        if self.device is None:
            receivers, senders, shifts = self._within_cutoff(structure, receivers, senders, shifts)
        return PreparedStructure(structure, species, receivers, senders, shifts), reused

    def _still_valid(self, structure: Structure) -> bool:
        ref = self._reference
        if ref is None or len(ref) != len(structure):
            return False
        if not (
            np.array_equal(ref.numbers, structure.numbers)
            and np.array_equal(ref.pbc, structure.pbc)
            and np.array_equal(ref.cell, structure.cell)
        ):
            return False
        moved = np.einsum("ij,ij->i", d := structure.positions - ref.positions, d)
        return bool(moved.max(initial=0.0) <= (0.5 * self.skin) ** 2)

    def _within_cutoff(
        self, structure: Structure, receivers: Pairs, senders: Pairs, shifts: Shifts
    ) -> tuple[Pairs, Pairs, Shifts]:
        assert isinstance(receivers, np.ndarray) and isinstance(senders, np.ndarray)
        assert isinstance(shifts, np.ndarray)
        positions = structure.positions
        vectors = positions[receivers] - positions[senders] - shifts @ structure.cell
        keep = np.einsum("ij,ij->i", vectors, vectors) < self.cutoff**2
        return receivers[keep], senders[keep], shifts[keep]


@dataclass
class GraphBatch:
    """Several structures as one disjoint graph, as tensors on the model's device.

    The per-structure sizes and cells are also kept on the host (``n_atoms``,
    ``n_pairs``, ``cell_host``, ``pbc_host``): code that needs them as numbers reads
    them there instead of copying device tensors back, which would wait for the device.
    """

    positions: torch.Tensor  # [N, 3] float64
    cell: torch.Tensor  # [B, 3, 3] float64
    pbc: torch.Tensor  # [B, 3] bool
    species: torch.Tensor  # [N]
    system: torch.Tensor  # [N] index of the structure each atom belongs to
    receivers: torch.Tensor  # [E], sorted
    senders: torch.Tensor  # [E]
    unit_shifts: torch.Tensor  # [E, 3] float64
    edge_system: torch.Tensor  # [E] index of the structure each edge belongs to
    n_atoms: list[int]
    # Edges of each structure, known on the host.
    n_pairs: list[int] = field(default_factory=list)
    # Most edges into one receiver, known on the host (spares the model a read-back).
    max_neighbors: int | None = None
    # The same cells and periodicity on the host, for shape decisions made before the
    # call (the long-range plan, image shifts) without reading the device tensors back.
    cell_host: npt.NDArray[np.float64] | None = None
    pbc_host: npt.NDArray[np.bool_] | None = None
    # Per-atom inputs the model reads (``Structure.arrays``): name -> [N, width], in
    # the model's dtype; empty for models that read none.
    inputs: dict[str, torch.Tensor] = field(default_factory=dict)
    # The [receiver, slot] layout of a compiled call (see model/compiled.py): when set,
    # ``receivers``, ``senders``, ``unit_shifts`` and ``edge_system`` have ``slots``
    # entries per atom and ``slot_mask`` tells the real edges from the padding;
    # ``atom_mask`` is False for the padding atoms, which carry no energy or charge.
    slots: int | None = None
    slot_mask: torch.Tensor | None = None
    atom_mask: torch.Tensor | None = None

    @property
    def n_systems(self) -> int:
        return len(self.n_atoms)


def _pairs_on(
    arrays: Sequence[Pairs | Shifts],
    offsets: Sequence[int],
    dtype: torch.dtype,
    device: torch.device,
) -> torch.Tensor:
    """Concatenate per-structure pair arrays (numpy or device tensors), plus offsets."""
    parts = []
    for a, o in zip(arrays, offsets, strict=True):
        t = a if isinstance(a, torch.Tensor) else torch.as_tensor(a, dtype=dtype)
        parts.append(t + o if o else t)
    whole = parts[0] if len(parts) == 1 else torch.cat([p.to(device) for p in parts])
    return whole.to(device, dtype, non_blocking=True)


def collate(
    prepared: Sequence[PreparedStructure],
    device: torch.device,
    inputs: Mapping[str, int] | None = None,
    dtype: torch.dtype = torch.float64,
) -> GraphBatch:
    """One graph of ``prepared``; ``inputs`` names the per-atom arrays (with their
    widths) to carry along, in ``dtype``."""
    if not prepared:
        raise ValueError("cannot collate an empty list of structures")
    n_atoms = [p.n_atoms for p in prepared]
    n_pairs = [p.n_pairs for p in prepared]
    offsets = [0, *np.cumsum(n_atoms)[:-1].tolist()]

    def cat(arrays: list[np.ndarray]) -> np.ndarray:
        return arrays[0] if len(arrays) == 1 else np.concatenate(arrays)

    positions = cat([p.structure.positions for p in prepared])
    species = cat([p.species for p in prepared])
    system = np.repeat(np.arange(len(prepared), dtype=np.int64), n_atoms)
    edge_system = np.repeat(np.arange(len(prepared), dtype=np.int64), n_pairs)
    cell = np.stack([p.structure.cell for p in prepared]).astype(np.float64)
    pbc = np.stack([p.structure.pbc for p in prepared])

    def t(a: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
        return torch.as_tensor(a, dtype=dtype).to(device, non_blocking=True)

    zeros = [0] * len(prepared)
    per_atom = {
        name: t(cat([input_array(p.structure, name, width) for p in prepared]), dtype)
        for name, width in (inputs or {}).items()
    }
    return GraphBatch(
        positions=t(positions, torch.float64),
        cell=t(cell, torch.float64),
        pbc=t(pbc, torch.bool),
        species=t(species, torch.long),
        system=t(system, torch.long),
        receivers=_pairs_on([p.receivers for p in prepared], offsets, torch.long, device),
        senders=_pairs_on([p.senders for p in prepared], offsets, torch.long, device),
        unit_shifts=_pairs_on([p.unit_shifts for p in prepared], zeros, torch.float64, device),
        edge_system=t(edge_system, torch.long),
        n_atoms=n_atoms,
        n_pairs=n_pairs,
        max_neighbors=max((p.max_neighbors for p in prepared), default=0),
        cell_host=cell.astype(np.float64),
        pbc_host=pbc.astype(bool),
        inputs=per_atom,
    )


def input_array(structure: Structure, name: str, width: int) -> npt.NDArray[np.float64]:
    """The per-atom input ``name`` of a structure as [n_atoms, width]."""
    value = structure.arrays.get(name)
    if value is None:
        raise StructureError(
            f"the model needs the per-atom input {name!r}, which the structure does not carry"
        )
    n = len(structure)
    array = np.asarray(value, dtype=np.float64).reshape(n, -1) if n else np.zeros((0, width))
    if array.shape[1] != width:
        raise StructureError(
            f"per-atom input {name!r} has {array.shape[1]} value(s) per atom; "
            f"the model reads {width}"
        )
    return array
