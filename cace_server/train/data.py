"""Labelled structures for training: reading extended XYZ files and checking them.

Labels are read from ``atoms.info`` / ``atoms.arrays`` under configurable keys
(``--energy-key REF_energy``), or from the single-point calculator ASE attaches
when a file uses the plain keys ``energy``, ``forces`` and ``stress``.  Stress
follows ASE's convention (eV/Å^3, positive under tension), as 6 Voigt or 9
components.  Every problem names the file and the frame.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from cace_server.structures import Structure, StructureError


class DataError(ValueError):
    """A training file that cannot be used; the message names file and frame."""


@dataclass(frozen=True)
class DataKeys:
    """Where the labels live in the extended XYZ files."""

    energy: str = "energy"
    forces: str = "forces"
    stress: str = "stress"


@dataclass
class LabelledStructure:
    structure: Structure
    energy: float  # eV
    forces: npt.NDArray[np.float64]  # [n, 3] eV/Å
    stress: npt.NDArray[np.float64] | None  # [3, 3] eV/Å^3, ASE sign; None if not labelled
    source: str = ""  # "file:frame", for messages

    @property
    def n_atoms(self) -> int:
        return len(self.structure)


def _calculator_results(atoms: Any) -> dict[str, Any]:
    calc = getattr(atoms, "calc", None)
    return dict(getattr(calc, "results", {}) or {})


def _lookup(atoms: Any, key: str, per_atom: bool) -> Any:
    if per_atom and key in atoms.arrays:
        return atoms.arrays[key]
    if not per_atom and key in atoms.info:
        return atoms.info[key]
    # ASE's extxyz reader moves the plain keys (energy, forces, stress) into a calculator.
    return _calculator_results(atoms).get(key)


def _stress_matrix(value: Any, where: str) -> npt.NDArray[np.float64]:
    s = np.asarray(value, dtype=np.float64).reshape(-1)
    if s.size == 9:
        return s.reshape(3, 3)
    if s.size == 6:
        xx, yy, zz, yz, xz, xy = s
        return np.array([[xx, xy, xz], [xy, yy, yz], [xz, yz, zz]])
    raise DataError(f"{where}: stress must have 6 (Voigt) or 9 components, got {s.size}")


def from_atoms(atoms: Any, keys: DataKeys, where: str) -> LabelledStructure:
    """One labelled structure from an ``ase.Atoms`` with its labels."""
    try:
        structure = Structure.from_ase(atoms)
    except StructureError as exc:
        raise DataError(f"{where}: {exc}") from exc
    energy = _lookup(atoms, keys.energy, per_atom=False)
    if energy is None:
        raise DataError(
            f"{where}: no energy under key {keys.energy!r} "
            f"(info keys: {sorted(atoms.info)}); set the key with --energy-key"
        )
    forces = _lookup(atoms, keys.forces, per_atom=True)
    if forces is None:
        raise DataError(
            f"{where}: no forces under key {keys.forces!r} "
            f"(per-atom arrays: {sorted(atoms.arrays)}); set the key with --forces-key"
        )
    try:
        energy_value = float(np.asarray(energy, dtype=np.float64).reshape(()))
    except (TypeError, ValueError) as exc:
        raise DataError(f"{where}: energy {energy!r} is not a number") from exc
    forces_arr = np.asarray(forces, dtype=np.float64)
    if forces_arr.shape != (len(structure), 3):
        raise DataError(
            f"{where}: forces have shape {forces_arr.shape}, expected ({len(structure)}, 3)"
        )
    stress = _lookup(atoms, keys.stress, per_atom=False)
    stress_arr = None
    if stress is not None and structure.pbc.all():
        stress_arr = _stress_matrix(stress, where)
    if not np.isfinite(energy_value):
        raise DataError(f"{where}: energy is NaN or infinite")
    if not np.all(np.isfinite(forces_arr)):
        raise DataError(f"{where}: forces contain NaN or infinity")
    if stress_arr is not None and not np.all(np.isfinite(stress_arr)):
        raise DataError(f"{where}: stress contains NaN or infinity")
    return LabelledStructure(structure, energy_value, forces_arr, stress_arr, where)


def read_labelled(paths: Iterable[str | Path], keys: DataKeys) -> list[LabelledStructure]:
    """All frames of the given extended XYZ files (gzip allowed)."""
    from ase.io import read

    out: list[LabelledStructure] = []
    for path in paths:
        path = Path(path)
        if not path.is_file():
            raise DataError(f"data file {path} does not exist")
        try:
            frames = read(str(path), index=":")
        except Exception as exc:  # ASE raises many types for malformed files
            raise DataError(f"{path}: cannot read as extended XYZ ({exc})") from exc
        if not isinstance(frames, list):
            frames = [frames]
        if not frames:
            raise DataError(f"{path}: no structures in file")
        out.extend(from_atoms(a, keys, f"{path}:{i}") for i, a in enumerate(frames))
    return out


def check_elements(data: Iterable[LabelledStructure], known: Iterable[int], whose: str) -> None:
    """Refuse structures with elements outside ``known``, naming file and frame."""
    allowed = {int(z) for z in known}
    for d in data:
        unknown = sorted({int(z) for z in d.structure.numbers} - allowed)
        if unknown:
            raise ValueError(
                f"{d.source}: elements {unknown} are not among {whose} elements {sorted(allowed)}"
            )


def files_digest(paths: Sequence[str | Path]) -> str:
    """SHA-256 over the bytes of the data files, in order (recorded in the model)."""
    h = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def split(
    data: Sequence[LabelledStructure], fraction: float, seed: int
) -> tuple[list[LabelledStructure], list[LabelledStructure]]:
    """Random train/validation split; at least one structure on each side."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"validation fraction must be in (0, 1), got {fraction}")
    if len(data) < 2:
        raise DataError("need at least two structures to split off a validation set")
    order = np.random.default_rng(seed).permutation(len(data))
    n_valid = min(len(data) - 1, max(1, round(fraction * len(data))))
    valid = [data[i] for i in sorted(order[:n_valid])]
    train = [data[i] for i in sorted(order[n_valid:])]
    return train, valid


def fit_reference_energies(
    data: Sequence[LabelledStructure], elements: Sequence[int]
) -> dict[int, float]:
    """Per-element energies that best explain the total energies (least squares).

    With collinear compositions (pure water is always H2O) the split between
    elements is not determined; ``lstsq`` then returns the minimum-norm solution,
    which is as good as any: the network learns the rest.
    """
    index = {z: i for i, z in enumerate(elements)}
    counts = np.zeros((len(data), len(elements)))
    for row, d in enumerate(data):
        for z in d.structure.numbers:
            counts[row, index[int(z)]] += 1
    energies = np.array([d.energy for d in data])
    solution, *_ = np.linalg.lstsq(counts, energies, rcond=None)
    return {z: float(solution[i]) for z, i in index.items()}
