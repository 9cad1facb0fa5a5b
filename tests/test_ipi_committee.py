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
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import ase.io
import httpx
import numpy as np
import pytest
from ipi.engine.forcefields import FFCommittee
from ipi.interfaces.utils import parse_extra
from prometheus_client.parser import text_string_to_metric_families

from cace_server.ipi.convert import extras_json, results_to_wire
from cace_server.ipi.engine_evaluator import IPI_COMMITTEE, ipi_outputs
from cace_server.model.committee import Committee, load_served
from cace_server.outputs import Outputs
from cace_server.structures import Prediction, Structure
from cace_server.units import ANGSTROM_PER_BOHR, FORCE_AU_PER_EV_ANGSTROM, HARTREE_PER_EV
from tests.ipi_support import IPI_SCRIPT, IpiRun, serve_with_ipi
from tests.npt_support import NPT_MOTION

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


# ------------------------------------------------------------------ the real i-PI

ALPHA = 2.0  # i-PI's calibration, not the server's (the seed committee has alpha 1)
BEADS = 2
STEPS = 4
COMMITTEE_OUTPUTS = """
    <properties stride="1" filename="out" flush="1"> [ step, potential{atomic_unit} ] </properties>
    <trajectory filename="pos" stride="1" format="bin" flush="1"> positions </trajectory>
    <trajectory filename="cpot" stride="1" extra_type="committee_pot" flush="1">
      extras </trajectory>
    <trajectory filename="cunc" stride="1" extra_type="committee_uncertainty" flush="1">
      extras </trajectory>
"""
COMMITTEE_FF = f"""
  <ffcommittee name="cace">
    <ffsocket name="cace-socket" mode="unix" pbc="false">
      <address> {{address}} </address>
    </ffsocket>
    <parse_json> true </parse_json>
    <alpha> {ALPHA} </alpha>
    <active_thresh units="electronvolt"> 1e-4 </active_thresh>
    <active_output> active </active_output>
  </ffcommittee>"""


def committee_run(workdir: Path, socket_dir: str) -> IpiRun:
    """NPT water PIMD whose forcefield is ``<ffcommittee>`` around one ``<ffsocket>``."""
    # i-PI gives its sockets_prefix to top-level <ffsocket>s only: one inside
    # <ffcommittee> listens at /tmp/ipi_<address>, named here after the private dir
    address = Path(socket_dir).name + "-committee"
    run = IpiRun(
        workdir,
        socket_dir,
        ase.io.read(INIT),
        name=address,
        nbeads=BEADS,
        steps=STEPS,
        motion=NPT_MOTION.format(timestep=0.25),
        outputs=COMMITTEE_OUTPUTS,
        pressure_mpa=0.1,
    )
    xml = (workdir / "input.xml").read_text()
    xml = re.sub(
        r"<ffsocket .*?</ffsocket>", COMMITTEE_FF.format(address=run.name), xml, flags=re.S
    )
    (workdir / "input.xml").write_text(xml)
    run.socket_path = "/tmp/ipi_" + address  # stop() removes it
    return run


def extras_blocks(path: Path) -> list[np.ndarray]:
    """The values of an ``extra_type`` trajectory, one array per recorded step."""
    blocks: list[list[float]] = []
    for line in path.read_text().splitlines():
        if line.lstrip().startswith("#EXTRAS"):
            blocks.append([])
        elif line.strip():
            blocks[-1] += [float(x) for x in line.split()]
    return [np.asarray(b) for b in blocks]


def counters(url: str) -> dict[str, float]:
    text = httpx.get(url + "/metrics", timeout=10).text
    return {
        sample.name: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name.startswith("cace_engine_") and not sample.labels
    }


Served = tuple[IpiRun, str, "subprocess.Popen[bytes]"]


@pytest.fixture
def served(tmp_path: Path, socket_dir: str) -> Iterator[Served]:
    """i-PI listening, then ``cace-server serve`` with the committee on HTTP and i-PI."""
    run = committee_run(tmp_path / "ipi", socket_dir).start()
    try:
        with serve_with_ipi(
            tmp_path / "server.log",
            run,
            BEADS,
            INIT,
            "--model",
            "water=" + ",".join(str(m) for m in MEMBERS),
            "--dtype",
            "float64",
            # The count below is about our batching, not i-PI's pace: every bead of
            # every step arrives here, but a busy CPU may space a step's beads by more
            # than the quiet tenth of this limit. Measured on 2 cores: i-PI's first NPT
            # step handed out its second bead 1.09 s after the first (past a 1 s quiet
            # limit), and with a 3 s one a CI run still saw two steps closed early at a
            # load average of 3.8. A limit i-PI cannot outrun (12 s quiet) keeps the
            # count about us; a missing bead would still show as a timeout.
            "--step-wait-ms",
            "120000",
        ) as (url, server):
            yield run, url, server
    finally:
        run.stop()


@pytest.mark.ipi
@pytest.mark.skipif(not IPI_SCRIPT.exists(), reason="the i-pi program is not installed")
def test_ipi_ffcommittee_npt_against_the_served_committee(served: Served, tmp_path: Path) -> None:
    run, url, server = served
    assert run.wait(timeout=300) == 0, run.log()
    assert server.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
    stats = counters(url)  # before our own HTTP requests add to them

    # (a) i-PI's committee_pot, alpha undone, is each member's energy on i-PI's positions
    atoms = ase.io.read(INIT)
    frames: list[tuple[np.ndarray, np.ndarray]] = []  # (cell h, positions), Bohr
    recorded: list[np.ndarray] = []  # members' energies, Hartree
    for bead in range(BEADS):
        cells, positions = run.binary_frames("pos", bead, len(atoms))
        pots = extras_blocks(tmp_path / "ipi" / f"sim.cpot_{bead}")
        uncertainty = extras_blocks(tmp_path / "ipi" / f"sim.cunc_{bead}")
        assert len(pots) == len(uncertainty) == len(cells) == STEPS + 1
        for h, pos, pot, unc in zip(cells, positions, pots, uncertainty, strict=True):
            assert pot.shape == (len(MEMBERS),)
            assert unc[0] == pytest.approx(np.std(pot, ddof=1), rel=1e-12)
            frames.append((h, pos))
            recorded.append(pot.mean() + (pot - pot.mean()) / ALPHA)
    request = {
        "model": "water",
        "properties": ["committee_energies"],
        "structures": [
            {
                "numbers": atoms.numbers.tolist(),
                "positions": (pos * ANGSTROM_PER_BOHR).tolist(),
                "cell": (h.T * ANGSTROM_PER_BOHR).tolist(),
                "pbc": True,
            }
            for h, pos in frames
        ],
    }
    reply = httpx.post(url + "/v1/calculate/batch", json=request, timeout=300)
    assert reply.status_code == 200, reply.text
    results = reply.json()["results"]
    for got, result in zip(recorded, results, strict=True):
        want = np.asarray(result["committee_energies"]) * HARTREE_PER_EV
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-8)

    # (b) the uncertainty is far above the threshold: every bead of every step dumped
    active = tmp_path / "ipi" / "sim.active"
    assert active.read_text().count('"uncertainty"') == BEADS * (STEPS + 1)

    # (c) the batching's books balance: every structure evaluated once, one model call
    # per batch, and a step closed by its time limit split in exactly two. How many
    # steps close that way is not asserted here: under CI load this <ffcommittee> NPT
    # run has had 2 and 3 steps wait out even a 12 s quiet limit (a bead i-PI did not
    # hand out while our step waited for it; not yet understood, see the closing note
    # of issue 28). Full one-call steps with real i-PI are asserted for plain PIMD in
    # tests/test_ipi_steps.py.
    assert stats["cace_engine_structures_total"] == BEADS * (STEPS + 1)
    assert stats["cace_engine_model_calls_total"] == stats["cace_engine_batches_total"]
    timeouts = stats["cace_engine_step_timeouts_total"]
    assert timeouts <= STEPS + 1, stats
    assert stats["cace_engine_batches_total"] == STEPS + 1 + timeouts, stats
