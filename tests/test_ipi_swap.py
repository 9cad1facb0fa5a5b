"""The real i-PI running 8-bead PIMD water through ``cace-server serve`` while the model
is replaced twice over HTTP (``PUT /v1/models/water`` with a path in the update dir).

What must hold: i-PI keeps its 8 connections (one link each, no reconnect) and exits
normally; the beads of every step carry one ``model_sha`` (read from i-PI's extras
trajectory); each swap shows in i-PI's steps within 2 steps of the PUT returning; and
the forces i-PI recorded on a step before and a step after each swap equal that
version's ``/v1/calculate`` forces on the same positions.
"""

from __future__ import annotations

import ast
import json
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ase.io
import httpx
import numpy as np
import pytest

from cace_server.engine.models import model_sha
from cace_server.units import ANGSTROM_PER_BOHR, FORCE_AU_PER_EV_ANGSTROM
from tests.ipi_support import IPI_SCRIPT, IpiRun, serve_with_ipi

pytestmark = [
    pytest.mark.ipi,
    pytest.mark.skipif(not IPI_SCRIPT.exists(), reason="the i-pi program is not installed"),
]

ROOT = Path(__file__).resolve().parents[1]
VERSIONS = [
    ROOT / "cace_server" / "data" / "water.safetensors",
    ROOT / "tests" / "data" / "committee" / "seed1.safetensors",
    ROOT / "tests" / "data" / "committee" / "seed2.safetensors",
]
INIT = ROOT / "clients" / "ipi" / "init.extxyz"
CLI = [sys.executable, "-m", "cace_server.cli"]
BEADS = 8
STEPS = 20
SETTLE = 3  # steps i-PI takes on a version before the next PUT
# i-PI writes positions and forces exactly (binary, atomic units) and the full extras
OUTPUTS = """
    <properties stride="1" filename="out" flush="1"> [ step, potential{atomic_unit} ] </properties>
    <trajectory filename="pos" stride="1" format="bin" flush="1"> positions </trajectory>
    <trajectory filename="frc" stride="1" format="bin" flush="1"> forces </trajectory>
    <trajectory filename="xtra" stride="1" flush="1"> extras </trajectory>
"""

Served = tuple[IpiRun, str, Path]


@pytest.fixture
def served(tmp_path: Path, socket_dir: str) -> Iterator[Served]:
    """i-PI listening, then ``cace-server serve`` with model updates from ``models/``."""
    models = tmp_path / "models"
    models.mkdir()
    for version in VERSIONS:
        shutil.copy(version, models / version.name)
    run = IpiRun(
        tmp_path / "ipi",
        socket_dir,
        ase.io.read(INIT),
        nbeads=BEADS,
        steps=STEPS,
        outputs=OUTPUTS,
    ).start()
    try:
        with serve_with_ipi(
            tmp_path / "server.log",
            run,
            BEADS,
            INIT,
            "--model",
            f"water={models / VERSIONS[0].name}",
            "--dtype",
            "float64",
            "--allow-model-updates",
            "--model-update-dir",
            str(models),
        ) as (url, _):
            yield run, url, models
    finally:
        run.stop()


def connections(client: httpx.Client) -> list[dict[str, Any]]:
    """The server's i-PI connections (the ``--ipi`` pool is group ``startup``)."""
    groups = client.get("/v1/ipi/connections").json()["groups"]
    (startup,) = [g for g in groups if g["id"] == "startup"]
    return list(startup["connections"])


def steps_done(client: httpx.Client) -> int:
    """i-PI steps whose beads have all been evaluated (one bead per connection)."""
    return min(c["steps"] for c in connections(client))


def wait_for_steps(client: httpx.Client, run: IpiRun, steps: int, timeout: float = 300) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done = steps_done(client)
        if done >= steps:
            return done
        assert run.proc is not None and run.proc.poll() is None, (
            f"i-PI finished before step {steps}: make STEPS larger\n{run.log()}"
        )
        time.sleep(0.02)
    raise AssertionError(f"i-PI did not reach step {steps} in {timeout} s")


def wait_for_server(url: str, run: IpiRun, timeout: float = 120) -> httpx.Client:
    client = httpx.Client(base_url=url, timeout=120)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if client.get("/v1/models").status_code == 200:
                return client
        except httpx.TransportError:
            pass
        assert run.proc is not None and run.proc.poll() is None, run.log()
        time.sleep(0.1)
    client.close()
    raise AssertionError(f"the server did not answer in {timeout} s")


def recorded_shas(run: IpiRun) -> list[list[str]]:
    """``model_sha`` of every bead (inner) of every step (outer), from i-PI's extras.

    i-PI writes each step's extras as the Python repr of a dict whose ``raw`` holds
    every bead's JSON string (the same list in each bead's file).
    """
    shas: list[list[str]] = [[] for _ in range(STEPS + 1)]
    for bead in range(BEADS):
        lines = run.extras(bead)
        assert len(lines) == STEPS + 1, (bead, len(lines))
        for step, line in enumerate(lines):
            record = ast.literal_eval(line)
            shas[step].append(json.loads(record["raw"][bead])["model_sha"])
    return shas


def calculate_forces(
    client: httpx.Client, cell: np.ndarray, positions: np.ndarray, numbers: list[int]
) -> tuple[str, np.ndarray]:
    """``/v1/calculate`` on i-PI's positions (Bohr, cell columns): its SHA and forces (au)."""
    reply = client.post(
        "/v1/calculate",
        json={
            "numbers": numbers,
            "positions": (positions * ANGSTROM_PER_BOHR).tolist(),
            "cell": (cell.T * ANGSTROM_PER_BOHR).tolist(),
            "pbc": True,
            "properties": ["forces"],
        },
    )
    assert reply.status_code == 200, reply.text
    out = reply.json()
    return out["model_sha"], np.asarray(out["forces"]) * FORCE_AU_PER_EV_ANGSTROM


def test_ipi_pimd_keeps_running_through_two_model_swaps(served: Served, tmp_path: Path) -> None:
    run, url, models = served
    shas = [model_sha(v) for v in VERSIONS]
    assert len(set(shas)) == 3
    client = wait_for_server(url, run)
    swaps: list[tuple[int, int]] = []  # (steps done when the PUT was sent, when it returned)
    try:
        for version in VERSIONS[1:]:
            after = swaps[-1][1] if swaps else 0
            sent = wait_for_steps(client, run, after + SETTLE)
            r = client.put("/v1/models/water", json={"path": str(models / version.name)})
            assert r.status_code == 200, r.text
            assert r.json()["model_sha"] == model_sha(version)
            swaps.append((sent, steps_done(client)))
        assert run.wait(timeout=300) == 0, run.log()
        links = connections(client)
    finally:
        client.close()
    server_log = (tmp_path / "server.log").read_text(errors="replace")

    # (a) no connection lost: each of the 8 served one link (one that i-PI accepted),
    # for every step. A link opened, since reconnecting is on, in the moment between
    # i-PI's last step and the removal of its socket is closed by i-PI before it
    # accepts it: the driver counts no session and no error for it.
    assert len(links) == BEADS
    for link in links:
        assert link["sessions"] == 1, (link, server_log[-3000:])
        assert link["steps"] == STEPS + 1, link
        assert link["last_error"] is None, (link, server_log[-3000:])
    # ... and i-PI saw 8 handshakes, no client dropped, and a clean exit
    ipi_log = (run.workdir / "ipi.log").read_text(errors="replace")
    assert ipi_log.count("Handshaking was successful") == BEADS, ipi_log[-3000:]
    assert "died or got unresponsive" not in ipi_log, ipi_log[-3000:]
    assert "Exiting cleanly" in ipi_log, ipi_log[-3000:]

    # (b) the beads of every step carry one model_sha; the versions follow the swaps
    per_step = recorded_shas(run)
    for step, beads in enumerate(per_step):
        assert len(set(beads)) == 1, (step, beads)
    served_sha = [beads[0] for beads in per_step]
    firsts = [served_sha.index(sha) for sha in shas[1:]]
    assert served_sha[: firsts[0]] == [shas[0]] * firsts[0]
    assert served_sha[firsts[0] : firsts[1]] == [shas[1]] * (firsts[1] - firsts[0])
    assert served_sha[firsts[1] :] == [shas[2]] * (STEPS + 1 - firsts[1])

    # (c) each swap reaches i-PI within 2 steps of the PUT returning, never before its PUT
    for (sent, returned), first in zip(swaps, firsts, strict=True):
        assert sent <= first <= returned + 2, (swaps, firsts)
    print(f"PUT sent/returned at steps {swaps}; first steps on the new versions {firsts}")

    # (d) i-PI's forces on the step before and the step after each swap are the
    # respective version's /v1/calculate forces on the same positions; each version is
    # put back in turn to ask it (which also swaps while i-PI is gone)
    numbers = ase.io.read(INIT).numbers.tolist()
    natoms = len(numbers)
    frames = {bead: run.binary_frames("pos", bead, natoms) for bead in (0, BEADS - 1)}
    forces = {bead: run.binary_frames("frc", bead, natoms)[1] for bead in (0, BEADS - 1)}
    checked: dict[int, list[int]] = {k: [] for k in range(3)}
    for k, first in enumerate(firsts):
        checked[k].append(first - 1)
        checked[k + 1].append(first)
    with httpx.Client(base_url=url, timeout=120) as client:
        for k, steps in checked.items():
            r = client.put("/v1/models/water", json={"path": str(models / VERSIONS[k].name)})
            assert r.status_code == 200 and r.json()["model_sha"] == shas[k], r.text
            for step in steps:
                for bead, (cells, positions) in frames.items():
                    sha, want = calculate_forces(client, cells[step], positions[step], numbers)
                    assert sha == shas[k]
                    got = forces[bead][step]
                    assert np.abs(got - want).max() <= 1e-6 * np.abs(want).max(), (k, step, bead)
