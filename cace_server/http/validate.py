"""From a request body to engine-ready :class:`Structure` objects, or a 4xx naming the field.

Everything the model cannot meaningfully evaluate is refused here, before it costs
device time: unknown species, non-finite or absurd coordinates, singular cells,
overlapping atoms (periodic images included) and densities that would make the
neighbour list, and memory, explode.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
from ase.data import atomic_numbers, chemical_symbols

from cace_server.engine import ModelInfo
from cace_server.http.arrays import read_floats, read_ints
from cace_server.http.errors import ApiError, invalid, join_path
from cace_server.http.schemas import DEFAULT_PROPERTIES, MAX_COORDINATE, Property, StructureIn
from cace_server.http.settings import HttpSettings
from cace_server.outputs import COMMITTEE_OUTPUTS, Outputs
from cace_server.structures import Structure, StructureError
from cace_server.validation import GeometryError, check_geometry


def read_species(
    numbers: object, symbols: Sequence[str] | None, prefix: str
) -> tuple[npt.NDArray[np.int64], str]:
    """Atomic numbers from ``numbers`` or ``symbols`` and the name of the field used."""
    if (numbers is None) == (symbols is None):
        raise invalid("give exactly one of numbers and symbols", join_path(prefix, "numbers"))
    if symbols is not None:
        field = join_path(prefix, "symbols")
        out = np.empty(len(symbols), dtype=np.int64)
        for i, symbol in enumerate(symbols):
            z = atomic_numbers.get(symbol, 0)
            if not 1 <= z <= 118:
                raise invalid(f"unknown chemical symbol {symbol[:20]!r}", join_path(field, i))
            out[i] = z
        return out, field
    field = join_path(prefix, "numbers")
    out = read_ints(numbers, field)
    bad = np.flatnonzero((out < 1) | (out > 118))
    if bad.size:
        raise invalid(
            f"atomic numbers must lie in 1..118, got {out[bad[0]]}", join_path(field, bad[0])
        )
    return out, field


def check_elements(
    numbers: npt.NDArray[np.int64], elements: Sequence[int], field: str, model: str
) -> None:
    known = np.zeros(119, dtype=bool)
    known[np.asarray(elements, dtype=np.int64)] = True
    bad = np.flatnonzero(~known[numbers])
    if bad.size:
        z = int(numbers[bad[0]])
        names = ", ".join(chemical_symbols[e] for e in elements)
        raise invalid(
            f"element {chemical_symbols[z]} (Z={z}) is not supported by model {model!r} "
            f"(it knows {names})",
            join_path(field, bad[0]),
            kind="unknown_element",
        )


def _first_non_finite(arr: npt.NDArray[np.float64]) -> int | None:
    bad = np.flatnonzero(~np.isfinite(arr).reshape(arr.shape[0], -1).all(axis=1))
    return int(bad[0]) if bad.size else None


def read_geometry(
    s: StructureIn, n: int, prefix: str
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64], npt.NDArray[np.bool_]]:
    pfield = join_path(prefix, "positions")
    positions = read_floats(s.positions, pfield)
    if positions.shape != (n, 3):
        raise invalid(
            f"positions must have shape [{n}, 3] for {n} atoms, got {list(positions.shape)}",
            pfield,
        )
    row = _first_non_finite(positions)
    if row is not None:
        raise invalid("position is NaN or infinite", join_path(pfield, row))
    if np.abs(positions).max() > MAX_COORDINATE:
        row = int(np.flatnonzero(np.abs(positions).max(axis=1) > MAX_COORDINATE)[0])
        raise invalid(f"coordinates beyond {MAX_COORDINATE:g} Å", join_path(pfield, row))

    cfield = join_path(prefix, "cell")
    cell: npt.NDArray[np.float64]
    if s.cell is None:
        cell = np.zeros((3, 3))
    else:
        cell = read_floats(s.cell, cfield)
        if cell.shape == (3,):
            cell = np.diag(cell).astype(np.float64)
        if cell.shape != (3, 3):
            raise invalid(
                f"cell must be 3 lattice vectors [3, 3] or 3 lengths [3], got {list(cell.shape)}",
                cfield,
            )
        row = _first_non_finite(cell)
        if row is not None:
            raise invalid("cell vector is NaN or infinite", join_path(cfield, row))
        if np.abs(cell).max() > MAX_COORDINATE:
            raise invalid(f"cell lengths beyond {MAX_COORDINATE:g} Å", cfield)

    if s.pbc is None:
        pbc = np.zeros(3, dtype=bool)
    elif isinstance(s.pbc, bool):
        pbc = np.full(3, s.pbc)
    else:
        if len(s.pbc) != 3:
            raise invalid(f"pbc must be one flag or 3, got {len(s.pbc)}", join_path(prefix, "pbc"))
        pbc = np.asarray(s.pbc, dtype=bool)
    if pbc.any():
        lengths = np.linalg.norm(cell, axis=1)
        if not lengths.all():
            raise invalid("a periodic structure needs three non-zero cell vectors", cfield)
        # volume relative to the box of the vector lengths: 0 for (nearly) coplanar vectors
        if abs(np.linalg.det(cell)) / float(np.prod(lengths)) < 1e-6:
            raise invalid("cell is singular: its vectors are (nearly) coplanar", cfield)
    return positions, cell, pbc


def read_inputs(
    value: object, n: int, prefix: str, info: ModelInfo
) -> dict[str, npt.NDArray[np.float64]]:
    """The per-atom inputs ``arrays`` of a structure: exactly those the model reads."""
    field = join_path(prefix, "arrays")
    if value is None:
        value = {}
    if not isinstance(value, dict):
        raise invalid(
            f"arrays must be an object of per-atom arrays, got {type(value).__name__}", field
        )
    out: dict[str, npt.NDArray[np.float64]] = {}
    for name, raw in value.items():
        afield = join_path(field, name)
        if name not in info.required_inputs:
            reads = ", ".join(info.required_inputs) or "none"
            raise invalid(
                f"model {info.name!r} reads no per-atom input {str(name)[:100]!r} "
                f"(it reads: {reads})",
                afield,
            )
        arr = read_floats(raw, afield)
        if arr.ndim not in (1, 2) or arr.shape[0] != n:
            raise invalid(
                f"per-atom input {name!r} must have shape [{n}] or [{n}, k] for {n} atoms, "
                f"got {list(arr.shape)}",
                afield,
            )
        row = _first_non_finite(arr)
        if row is not None:
            raise invalid(f"per-atom input {name!r} is NaN or infinite", join_path(afield, row))
        out[name] = arr
    missing = [name for name in info.required_inputs if name not in out]
    if missing:
        raise invalid(
            f"model {info.name!r} needs the per-atom input {missing[0]!r} for every structure "
            f"(give it as arrays.{missing[0]}: one value per atom)",
            join_path(field, missing[0]),
            kind="missing_input",
        )
    return out


def build_structure(
    s: StructureIn, prefix: str, info: ModelInfo, settings: HttpSettings
) -> Structure:
    numbers, species_field = read_species(s.numbers, s.symbols, prefix)
    n = len(numbers)
    if n == 0:
        raise invalid("structure has no atoms", species_field, kind="empty_structure")
    if n > settings.max_atoms:
        raise ApiError(
            413,
            "too_many_atoms",
            f"{n} atoms; this server accepts at most {settings.max_atoms} per structure",
            field=species_field,
        )
    check_elements(numbers, info.elements, species_field, info.name)
    positions, cell, pbc = read_geometry(s, n, prefix)
    arrays = read_inputs(s.arrays, n, prefix, info)
    try:
        structure = Structure.create(numbers, positions, cell, pbc, arrays)
    except StructureError as exc:
        raise invalid(str(exc), prefix or None) from None
    try:
        check_geometry(structure, info.cutoff, settings.geometry)
    except GeometryError as exc:
        raise invalid(str(exc), join_path(prefix, *exc.where), kind=exc.kind) from None
    return structure


# Why a model may lack an output, for the refusal's message.
_WHY_MISSING = {
    "charges": "not a long-range model",
    "energies": "its long-range term is not split into atoms",
    "dipole": "not a dipole/polarization model",
    "bec": "not a dipole/polarization model",
    **{
        name: "not a committee: serve one with --model NAME=A,B,... or NAME=COMMITTEE.toml"
        for name in COMMITTEE_OUTPUTS
    },
}


def check_properties(
    requested: Sequence[Property] | None, info: ModelInfo, field: str
) -> tuple[Outputs, bool]:
    """The outputs to compute (HTTP property names are output names), and whether
    stress was asked for explicitly."""
    if "energy" not in info.outputs:  # a bare representation: descriptors only
        raise invalid(
            f"model {info.name!r} computes no energy (a representation without energy "
            "heads): there is nothing to calculate with it",
            "model",
            kind="unsupported_property",
        )
    if requested is None:
        return Outputs(DEFAULT_PROPERTIES), False
    for i, prop in enumerate(requested):
        if prop not in info.outputs:
            why = _WHY_MISSING.get(prop)
            raise invalid(
                f"model {info.name!r} does not compute {prop!r}"
                + (f" ({why})" if why else "")
                + f"; it offers {', '.join(info.outputs)}",
                join_path(field, i),
                kind="unsupported_property",
            )
    props = Outputs(requested)
    return props, "stress" in props


def check_stress(structure: Structure, explicit: bool, field: str) -> None:
    if explicit and not structure.pbc.all():
        raise invalid("stress needs a structure periodic in all three directions", field)
