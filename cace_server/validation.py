"""Geometry checks every frontend applies before a structure reaches the engine.

HTTP requests and i-PI positions get the same checks: atoms closer than
``min_distance`` (periodic images included), cells the neighbour list cannot
handle, and densities that would exhaust memory rather than inform. A failure is a
:class:`GeometryError` saying what and where (``("positions", 3)``, ``("cell",)``);
each frontend reports it its own way (HTTP: a 422 naming the field; i-PI: the
connection is closed with a log line). On the i-PI path close contacts are a warning
unless refused on purpose (:func:`check_ipi_geometry`): i-PI asks for the geometries
of vibrational analyses and scans on purpose, some with atoms 0.05 Å apart.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import vesin

from cace_server.model.neighbors import check_neighbor_grid, plane_spacings
from cace_server.structures import Structure, StructureError


class GeometryError(StructureError):
    """A structure refused by :func:`check_geometry`.

    ``kind``: ``overlapping_atoms``, ``unsupported_geometry`` or ``too_dense``;
    ``where``: the path of the offending input within the structure.
    """

    def __init__(self, message: str, kind: str, where: tuple[str | int, ...]) -> None:
        super().__init__(message)
        self.kind = kind
        self.where = where


@dataclass(frozen=True)
class GeometryLimits:
    """The structure checks of every frontend (defaults: ``HttpSettings``)."""

    #: atoms closer than this (Å, periodic images included) make a structure invalid.
    min_distance: float
    #: upper bound of the neighbours per atom within the model cutoff, as estimated on
    #: a grid (about 6x the true count); denser input would exhaust memory, not inform.
    max_neighbors_per_atom: int


def check_geometry(
    structure: Structure, cutoff: float, limits: GeometryLimits, *, overlap: bool = True
) -> None:
    """Raise GeometryError unless ``structure`` is fit for a model of this ``cutoff``
    (atoms closer than ``min_distance`` included unless ``overlap`` is False)."""
    where: tuple[str, ...] = ("cell",) if structure.pbc.any() else ("positions",)
    for radius in (max(limits.min_distance, 1.0), cutoff):
        try:
            check_neighbor_grid(structure, radius)
        except StructureError as exc:
            raise GeometryError(str(exc), "unsupported_geometry", where) from None
    if overlap:
        check_overlap(structure, limits.min_distance)
    density = estimated_neighbors(structure, cutoff)
    if density > limits.max_neighbors_per_atom:
        raise GeometryError(
            f"atoms are packed too densely: about {density:.0f} neighbours per atom within "
            f"the model cutoff {cutoff:g} Å (estimate; the limit is "
            f"{limits.max_neighbors_per_atom})",
            "too_dense",
            ("positions",),
        )


def check_ipi_geometry(
    structure: Structure,
    cutoff: float,
    limits: GeometryLimits,
    *,
    refuse_close_contacts: bool = False,
) -> str | None:
    """The checks of :func:`check_geometry` for a structure i-PI sent: atoms closer than
    ``min_distance`` are refused only if ``refuse_close_contacts``; otherwise the
    structure is evaluated and the returned warning names the closest pair."""
    check_geometry(structure, cutoff, limits, overlap=refuse_close_contacts)
    if refuse_close_contacts:
        return None
    try:
        check_overlap(structure, limits.min_distance)
    except GeometryError as exc:
        return f"{exc}; evaluated as i-PI asked (ipi_refuse_close_contacts is off)"
    return None


def check_overlap(structure: Structure, min_distance: float) -> None:
    """Refuse atoms closer than ``min_distance`` (periodic images included)."""
    if min_distance <= 0:
        return
    pbc = structure.pbc
    if pbc.any():
        spacing = plane_spacings(structure.cell)
        thin = np.flatnonzero(pbc & (spacing < min_distance))
        if thin.size:
            raise GeometryError(
                f"cell is {spacing[thin[0]]:.3g} Å thick along vector {thin[0]}: every atom "
                f"overlaps its periodic image (min_distance {min_distance:g} Å)",
                "overlapping_atoms",
                ("cell",),
            )
        box = structure.cell
    else:
        box = np.zeros((3, 3))
    # A cutoff of 1 Å at least keeps vesin's cell grid coarse; closer pairs are kept.
    calculator = vesin.NeighborList(cutoff=max(float(min_distance), 1.0), full_list=False)
    i, j, d = calculator.compute(
        points=structure.positions, box=box, periodic=[bool(p) for p in pbc], quantities="ijd"
    )
    close = d < min_distance
    i, j, d = i[close], j[close], d[close]
    if len(d):
        k = int(np.argmin(d))
        a, b = sorted((int(i[k]), int(j[k])))
        what = "its own periodic image" if a == b else f"atom {b}"
        raise GeometryError(
            f"atom {a} is {d[k]:.3g} Å from {what}, closer than min_distance {min_distance:g} Å",
            "overlapping_atoms",
            ("positions", a),
        )


def estimated_neighbors(structure: Structure, cutoff: float) -> float:
    """An upper estimate of neighbours per atom within ``cutoff`` (about 6x the truth).

    Atoms are binned in cubes of side ``cutoff``; every atom is counted against the
    27 cubes around its own. Periodic structures also get the uniform-density count
    of the same 27 cubes, which covers small cells whose images crowd every atom.
    """
    n = len(structure)
    keys = np.floor(structure.positions / cutoff).astype(np.int64)
    keys -= keys.min(axis=0)
    dims = keys.max(axis=0) + 3
    flat = ((keys[:, 0] + 1) * dims[1] + keys[:, 1] + 1) * dims[2] + keys[:, 2] + 1
    cubes, counts = np.unique(flat, return_counts=True)
    around = np.zeros(len(cubes), dtype=np.int64)
    for dx in (-1, 0, 1):
        for dy in (-1, 0, 1):
            for dz in (-1, 0, 1):
                shifted = cubes + (dx * dims[1] + dy) * dims[2] + dz
                pos = np.searchsorted(cubes, shifted)
                pos[pos == len(cubes)] = 0
                hit = cubes[pos] == shifted
                around[hit] += counts[pos[hit]]
    estimate = float(np.dot(counts, around)) / n
    if structure.pbc.all():
        estimate = max(estimate, n / structure.volume * 27 * cutoff**3)
    return estimate
