"""A committee served to i-PI's ``<ffcommittee>``: the extras layout, and a real run.

The unit tests put our extras through i-PI's own parser and ``FFCommittee.gather``
(no sockets): the members' numbers come out in i-PI's units, and their mean is the
energy, forces and virial our driver sends on the wire. The i-PI test runs NPT water
with ``<ffcommittee>`` wrapping one ``<ffsocket>`` (one connection per bead) against
``cace-server serve`` with the four seed members, and compares what i-PI recorded
with the members evaluated over HTTP.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import ase.io
import numpy as np
import pytest
from ipi.engine.forcefields import FFCommittee
from ipi.interfaces.utils import parse_extra

from cace_server.ipi.convert import extras_json, results_to_wire
from cace_server.ipi.engine_evaluator import IPI_COMMITTEE, ipi_outputs
from cace_server.model.committee import Committee, load_served
from cace_server.outputs import Outputs
from cace_server.structures import Prediction, Structure
from cace_server.units import FORCE_AU_PER_EV_ANGSTROM, HARTREE_PER_EV

MEMBERS = [
    Path(__file__).parent / "data" / "committee" / f"seed{k}.safetensors" for k in range(1, 5)
]
INIT = Path(__file__).parents[1] / "clients" / "ipi" / "init.extxyz"
CLI = [sys.executable, "-m", "cace_server.cli"]


@pytest.fixture(scope="module")
def committee() -> Committee:
    served = load_served(",".join(str(m) for m in MEMBERS), dtype="float64")
    assert isinstance(served, Committee)
    return served


@pytest.fixture(scope="module")
def water() -> Structure:
    atoms = ase.io.read(INIT)
    return Structure.create(atoms.numbers, atoms.positions, np.asarray(atoms.cell), True)


def gather(extras: str, wire: tuple[float, np.ndarray, np.ndarray], alpha: float) -> list[Any]:
    """What i-PI's ``<ffcommittee>`` (``parse_json``) makes of one client's reply."""
    ff = FFCommittee(
        fflist=[SimpleNamespace(name="cace", release=lambda request: None)],
        alpha=alpha,
        parse_json=True,
    )
    energy, forces, virial = wire
    request: dict[str, Any] = {
        "pos": forces.reshape(-1) * 0.0,
        "ff_handles": [{"result": [energy, forces.reshape(-1), virial, parse_extra(extras)]}],
    }
    ff.gather(request)
    return list(request["result"])


def test_ipi_asks_a_committee_for_its_members() -> None:
    offered = ("energy", "forces", "stress", "energies", *IPI_COMMITTEE, "forces_uncertainty")
    asked = set(ipi_outputs(offered, bec=True))
    assert asked == {"energy", "forces", "stress", *IPI_COMMITTEE}
    # a plain model: nothing of the committee
    assert list(ipi_outputs(("energy", "forces", "stress"), bec=True)) == list(Outputs())


def test_committee_extras_layout_and_units(committee: Committee, water: Structure) -> None:
    (p,) = committee.predict([water], ipi_outputs(committee.outputs, bec=True))
    members, natoms = len(MEMBERS), len(water)
    assert p.committee_energies is not None and p.committee_forces is not None
    assert p.committee_virials is not None and p.energy_uncertainty is not None
    extras = parse_extra(extras_json(p, "water"))
    pot = np.asarray(extras["committee_pot"])
    force = np.asarray(extras["committee_force"])
    virial = np.asarray(extras["committee_virial"])
    assert pot.shape == (members,) and force.shape == (members, 3 * natoms)
    assert virial.shape == (members, 9)
    np.testing.assert_allclose(pot, p.committee_energies * HARTREE_PER_EV, rtol=1e-15)
    np.testing.assert_allclose(
        force, p.committee_forces.reshape(members, -1) * FORCE_AU_PER_EV_ANGSTROM, rtol=1e-15
    )
    assert extras["energy_uncertainty_eV"] == p.energy_uncertainty

    # i-PI's mean of the members is what the wire carries (virial orientation included)
    energies, forces, virials = results_to_wire([p], [water])
    wire = (float(energies[0]), forces[0], virials[0])
    energy, mean_force, mean_virial, out = gather(extras_json(p, "water"), wire, alpha=1.0)
    assert energy == pytest.approx(wire[0], rel=1e-13)
    np.testing.assert_allclose(mean_force, forces[0].reshape(-1), rtol=0, atol=1e-12)
    np.testing.assert_allclose(mean_virial, virials[0], rtol=0, atol=1e-12)
    # each member's virial alone, against the wire's conversion of its -stress V
    single = Prediction(energy=0.0, forces=p.committee_forces[1], virial=p.committee_virials[1])
    np.testing.assert_allclose(virial[1].reshape(3, 3), results_to_wire([single], [water])[2][0])
    # our uncertainty passes through i-PI's "dissolve" of extras under a committee_ name
    assert out["committee_energy_uncertainty_eV"] == [p.energy_uncertainty]

    # alpha: i-PI writes mean + alpha (member - mean) and alpha x the sample std
    *_, scaled = gather(extras_json(p, "water"), wire, alpha=2.0)
    np.testing.assert_allclose(scaled["committee_pot"], pot.mean() + 2.0 * (pot - pot.mean()))
    assert scaled["committee_uncertainty"] == pytest.approx(2.0 * np.std(pot, ddof=1))
    assert scaled["committee_force"].shape == (members, 3 * natoms)


def test_a_plain_models_extras_have_no_committee_keys(water: Structure) -> None:
    plain = Prediction(energy=-1.0, forces=np.zeros((len(water), 3)))
    assert set(json.loads(extras_json(plain, "water"))) == {"model", "energy_eV"}
