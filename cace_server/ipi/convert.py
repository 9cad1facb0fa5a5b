"""Between the wire (atomic units, i-PI's cell layout) and our value types (ASE units).

The ``extras`` string returned with every structure is a JSON object with these keys:

``model``
    name of the model that computed the structure (when known).
``energy_eV``
    the potential energy in eV, as the model returned it (the wire carries Hartree).
``charges``
    per-atom latent charges of long-range models in elementary charges (a list, or a
    list of n_q-channel rows); only present when the model produced them.
``dipole``
    the electric dipole (x, y, z) in atomic units, e·Bohr, as i-PI's driven dynamics
    reads it (``ipi/engine/motion/driven_dynamics.py``, ``ElectricDipole``); dipole
    models only.
``BEC``
    the Born effective charges in e as i-PI's ``<bec mode="driver">`` reads them: a
    (3N, 3) list of rows, ``BEC[3i + a][b] = d dipole_b / d R_{i,a}`` (same module,
    ``BEC._get_driver_BEC``); only when the connection computes BEC.
``committee_pot``, ``committee_force``, ``committee_virial``
    committee models: each member's energy (M, Hartree), forces (M lists of 3N,
    Hartree/Bohr) and virial (M lists of 9, Hartree, oriented like the wire virial),
    not rescaled: what i-PI's ``<ffcommittee>`` with ``<parse_json>true</parse_json>``
    reads from one client (``ipi/engine/forcefields.py``, ``FFCommittee.gather``),
    rescaling them with its own ``<alpha>``.
``energy_uncertainty_eV``
    committee models: the served uncertainty (the committee's calibrated alpha x the
    members' standard deviation), eV. i-PI's ``FFCommittee`` computes its own
    ``committee_uncertainty`` and passes this key on as ``committee_energy_uncertainty_eV``.
any other key of :attr:`Prediction.extras`
    passed through when its value is JSON-serialisable (numpy arrays become lists).

i-PI stores extras per bead; a trajectory ``<trajectory ... extra_type="charges">``
or the raw stream (``extras``) writes them out. The key ``raw`` is reserved by i-PI
and is never sent.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from cace_server.structures import MAX_COORDINATE, Prediction, Structure, wrap_far_positions
from cace_server.units import (
    ANGSTROM_PER_BOHR,
    BOHR_PER_ANGSTROM,
    FORCE_AU_PER_EV_ANGSTROM,
    HARTREE_PER_EV,
)

# A cell with |det h| below this (Bohr^3) is treated as "no cell": non-periodic.
_MIN_VOLUME_AU = 1e-9
MAX_COORDINATE_AU = MAX_COORDINATE * BOHR_PER_ANGSTROM


def structures_from_wire(
    cells_h: npt.NDArray[np.float64],
    positions: npt.NDArray[np.float64],
    numbers: npt.NDArray[np.int64],
    pbc: bool | None = None,
    arrays: Mapping[str, npt.NDArray[np.float64]] | None = None,
) -> list[Structure]:
    """Build structures (Å) from i-PI cells ``h`` (batch, 3, 3) and positions (batch, n, 3) in Bohr.

    i-PI's ``h`` has the lattice vectors as columns, ASE's cell as rows: cell = h.T.
    ``pbc=None`` makes a structure periodic in 3-D unless its cell is zero. ``arrays``:
    per-atom model inputs (i-PI sends none; they come from the species template).
    """
    out = []
    for h, pos in zip(cells_h, positions, strict=True):
        periodic = abs(float(np.linalg.det(h))) > _MIN_VOLUME_AU if pbc is None else pbc
        # Far positions are wrapped in Bohr, as sent: converting them first would round
        # them to the float64 spacing of their size (1e-4 Å at 1e12 Bohr).
        pos = wrap_far_positions(pos, h.T, np.full(3, bool(periodic)), MAX_COORDINATE_AU)
        out.append(
            Structure.create(
                numbers,
                pos * ANGSTROM_PER_BOHR,
                h.T * ANGSTROM_PER_BOHR,
                periodic,
                arrays,
            )
        )
    return out


def virial_to_wire(virial_ev: npt.ArrayLike) -> npt.NDArray[np.float64]:
    """A virial (3, 3) in eV as the wire carries it: Hartree, transposed like ASE's and
    i-PI's own drivers send it."""
    return np.asarray(virial_ev, dtype=np.float64).reshape(3, 3).T * HARTREE_PER_EV


def _virial_ev(prediction: Prediction, structure: Structure) -> npt.NDArray[np.float64]:
    if prediction.virial is not None:
        return np.asarray(prediction.virial, dtype=np.float64).reshape(3, 3)
    if prediction.stress is not None and structure.is_periodic:
        stress = np.asarray(prediction.stress, dtype=np.float64)
        if stress.shape == (6,):  # ASE Voigt: xx yy zz yz xz xy
            xx, yy, zz, yz, xz, xy = stress
            stress = np.array([[xx, xy, xz], [xy, yy, yz], [xz, yz, zz]])
        return -stress.reshape(3, 3) * structure.volume
    return np.zeros((3, 3))


def results_to_wire(
    predictions: Sequence[Prediction], structures: Sequence[Structure]
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """Energies (batch,) Ha, forces (batch, n, 3) Ha/Bohr, virials (batch, 3, 3) Ha, wire-ready.

    The virial is ``-stress * V`` (taken from ``Prediction.virial`` or derived from its
    stress), transposed like ASE's and i-PI's own drivers send it. Raises ``ValueError``
    for missing or non-finite results: i-PI must never get a silent NaN.
    """
    if len(predictions) != len(structures):
        raise ValueError(f"{len(predictions)} predictions for {len(structures)} structures")
    natoms = len(structures[0]) if structures else 0
    energies = np.empty(len(predictions))
    forces = np.empty((len(predictions), natoms, 3))
    virials = np.empty((len(predictions), 3, 3))
    for i, (prediction, structure) in enumerate(zip(predictions, structures, strict=True)):
        if prediction.forces is None:
            raise ValueError("the evaluator returned no forces")
        f = np.asarray(prediction.forces, dtype=np.float64)
        if f.shape != (natoms, 3):
            raise ValueError(f"the evaluator returned forces of shape {f.shape}, not ({natoms}, 3)")
        energies[i] = float(prediction.energy) * HARTREE_PER_EV
        forces[i] = f * FORCE_AU_PER_EV_ANGSTROM
        virials[i] = virial_to_wire(_virial_ev(prediction, structure))
    if not (np.isfinite(energies).all() and np.isfinite(forces).all()):
        raise ValueError("the evaluator returned NaN or infinite energy or forces")
    if not np.isfinite(virials).all():
        raise ValueError("the evaluator returned a NaN or infinite virial")
    return energies, forces, virials


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


def extras_json(prediction: Prediction, model_name: str | None = None) -> str:
    """The extras string for one structure (keys documented in the module docstring)."""
    extras: dict[str, Any] = {}
    for key, value in prediction.extras.items():
        if key == "raw":
            continue
        candidate = _jsonable(value)
        try:
            json.dumps(candidate, allow_nan=False)
        except (TypeError, ValueError):
            continue
        extras[key] = candidate
    name = model_name if model_name is not None else prediction.extras.get("model")
    if name is not None:
        extras["model"] = str(name)
    energy = float(prediction.energy)
    if math.isfinite(energy):
        extras["energy_eV"] = energy
    if prediction.charges is not None:
        extras["charges"] = np.asarray(prediction.charges, dtype=np.float64).tolist()
    if prediction.dipole is not None:
        dipole = np.asarray(prediction.dipole, dtype=np.float64).reshape(3)
        extras["dipole"] = (dipole * BOHR_PER_ANGSTROM).tolist()
    if prediction.bec is not None:
        bec = np.asarray(prediction.bec, dtype=np.float64)
        extras["BEC"] = bec.reshape(-1, 3).tolist()  # (N, 3, 3) -> rows 3i + a
    extras.update(committee_extras(prediction))
    return json.dumps(extras, separators=(",", ":"))


def committee_extras(prediction: Prediction) -> dict[str, Any]:
    """The committee keys of the extras (none for a plain model's prediction)."""
    out: dict[str, Any] = {}
    if prediction.committee_energies is None:
        return out
    energies = np.asarray(prediction.committee_energies, dtype=np.float64).reshape(-1)
    out["committee_pot"] = (energies * HARTREE_PER_EV).tolist()
    if prediction.committee_forces is not None:
        forces = np.asarray(prediction.committee_forces, dtype=np.float64)
        flat = forces.reshape(len(energies), -1) * FORCE_AU_PER_EV_ANGSTROM
        out["committee_force"] = flat.tolist()
    if prediction.committee_virials is not None:
        virials = np.asarray(prediction.committee_virials, dtype=np.float64)
        rows = [virial_to_wire(v).reshape(9) for v in virials.reshape(len(energies), 3, 3)]
        out["committee_virial"] = np.asarray(rows).tolist()
    if prediction.energy_uncertainty is not None:
        out["energy_uncertainty_eV"] = float(prediction.energy_uncertainty)
    return out
