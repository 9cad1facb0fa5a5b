"""The dipole and BEC extras as i-PI's own code reads them (no sockets, no i-PI run).

Our extras string goes through i-PI's parser (``ipi.interfaces.utils.parse_extra``)
and i-PI's Born-charge reader (``BEC._get_driver_BEC`` of driven dynamics), which
checks its layout and the acoustic sum rule; what comes out must be our model's
numbers in i-PI's units.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from ipi.engine.motion.driven_dynamics import BEC
from ipi.interfaces.utils import parse_extra
from ipi.utils.units import unit_to_internal

from cace_server.ipi.convert import extras_json, structures_from_wire
from cace_server.structures import Prediction


def prediction(n: int, seed: int) -> Prediction:
    """Hand-built outputs of a dipole/BEC model for ``n`` atoms (charge-neutral BEC)."""
    rng = np.random.default_rng(seed)
    bec = rng.normal(size=(n, 3, 3))
    bec -= bec.mean(axis=0)  # the acoustic sum rule i-PI checks
    return Prediction(
        energy=-1.5,
        forces=rng.normal(size=(n, 3)),
        charges=rng.normal(size=(n, 2)),
        dipole=rng.normal(size=3),
        bec=bec,
    )


def ipi_born_charges(extras: list[dict], natoms: int) -> np.ndarray:
    """What i-PI's driven dynamics makes of the extras of every bead: Z (nbeads, 3N, 3)."""
    reader = BEC(cbec=True, mode="driver")
    reader.nbeads = len(extras)
    reader.natoms = natoms
    reader.forces = SimpleNamespace(extras={"BEC": [e["BEC"] for e in extras]})
    return reader._get_driver_BEC()


def test_bec_is_read_by_ipi_in_its_layout() -> None:
    preds = [prediction(5, seed) for seed in (1, 2)]
    extras = [parse_extra(extras_json(p, "m")) for p in preds]
    z = ipi_born_charges(extras, 5)
    assert z.shape == (2, 15, 3)
    for bead, p in enumerate(preds):
        assert p.bec is not None
        for i in range(5):
            for a in range(3):
                # Z[3i + a, b] = d mu_b / d R_{i,a}, in e (i-PI's "number")
                np.testing.assert_array_equal(z[bead, 3 * i + a], p.bec[i, a])


def test_bec_breaking_the_sum_rule_is_refused_by_ipi() -> None:
    """The check is i-PI's: a charged BEC set reaches it unchanged and is refused there."""
    p = prediction(4, 3)
    assert p.bec is not None
    p.bec = p.bec + np.eye(3)
    with pytest.raises(ValueError, match="acoustic sum rule"):
        ipi_born_charges([parse_extra(extras_json(p))], 4)


def test_dipole_and_charges_in_ipi_units() -> None:
    p = prediction(3, 4)
    extras = parse_extra(extras_json(p, "m"))
    assert extras["model"] == "m"
    # i-PI reads extras["dipole"] as a length-3 list in atomic units (e·Bohr)
    want = unit_to_internal("electric-dipole", "eang", p.dipole)
    np.testing.assert_allclose(extras["dipole"], want, rtol=1e-15)
    assert np.asarray(extras["charges"]).shape == (3, 2)  # multi-channel rows
    np.testing.assert_array_equal(extras["charges"], p.charges)


def test_no_bec_no_dipole_keys_without_them() -> None:
    extras = parse_extra(extras_json(Prediction(energy=0.0, forces=np.zeros((2, 3)))))
    assert "BEC" not in extras and "dipole" not in extras


def test_template_inputs_reach_every_structure() -> None:
    h = np.eye(3)[None] * 20.0
    positions = np.zeros((2, 3, 3)) + np.arange(3)[None, :, None] * 2.0
    charge_states = np.array([0.0, 1.0, -1.0])
    structures = structures_from_wire(
        np.repeat(h, 2, axis=0),
        positions,
        np.array([8, 1, 1]),
        None,
        {"charge_states": charge_states},
    )
    for s in structures:
        np.testing.assert_array_equal(s.arrays["charge_states"], charge_states)
