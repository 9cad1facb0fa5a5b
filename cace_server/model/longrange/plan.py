"""Host-side plan of one batch's long-range term, made from numpy cells before the call.

Everything that decides tensor shapes (which back end, k-grid extents, mesh sizes, the
grouping of structures) is computed here from host data, so the model call itself
never reads a tensor back to the host. Structures with the same extents and mesh
(PIMD beads share a cell, hence all of these) form one group, evaluated as one batch.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from cace_server.structures import StructureError

OPEN = "open"
DIRECT = "direct"
MESH = "mesh"


@dataclass(frozen=True)
class StructureGroup:
    """Structures evaluated together: same back end, extents and mesh shape."""

    kind: str  # OPEN, DIRECT or MESH
    systems: tuple[int, ...]
    n_max: int
    # first atom when the group's atoms are one contiguous run of equal-sized
    # structures (a [G, n] view needs no gather), else None
    start: int | None
    # [G, n_max] atom index, -1 for pads; only when start is None
    atom_index: npt.NDArray[np.int64] | None
    extents: tuple[int, int, int] = (0, 0, 0)
    mesh: tuple[int, int, int] | None = None


@dataclass(frozen=True)
class LongRangePlan:
    n_systems: int
    groups: tuple[StructureGroup, ...]


def periodicity(pbc: npt.NDArray[np.bool_]) -> list[bool]:
    """Per structure: True for 3-D periodic, False for open; partial periodicity is refused."""
    out = []
    for row in np.asarray(pbc, dtype=bool).reshape(-1, 3):
        if row.all():
            out.append(True)
        elif not row.any():
            out.append(False)
        else:
            raise StructureError(
                "the long-range (Ewald) term of this model needs a structure that is "
                "periodic in all three directions or in none"
            )
    return out


def make_group(
    kind: str,
    systems: Sequence[int],
    n_atoms: Sequence[int],
    offsets: Sequence[int],
    extents: tuple[int, int, int] = (0, 0, 0),
    mesh: tuple[int, int, int] | None = None,
) -> StructureGroup:
    sizes = [n_atoms[b] for b in systems]
    n_max = max(sizes)
    consecutive = all(b2 == b1 + 1 for b1, b2 in itertools.pairwise(systems))
    if consecutive and all(s == n_max for s in sizes):
        return StructureGroup(
            kind, tuple(systems), n_max, int(offsets[systems[0]]), None, extents, mesh
        )
    index = np.full((len(systems), n_max), -1, dtype=np.int64)
    for row, b in enumerate(systems):
        index[row, : n_atoms[b]] = np.arange(offsets[b], offsets[b] + n_atoms[b])
    return StructureGroup(kind, tuple(systems), n_max, None, index, extents, mesh)
