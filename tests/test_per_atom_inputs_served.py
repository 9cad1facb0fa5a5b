"""A converted model whose energy head reads a per-atom input, served for real.

``../shared/reference/synthetic/atomwise-extra-feature`` (README there) reads
``charge_states`` next to the node features. Over HTTP the input is ``arrays``; an
i-PI run takes it from the per-atom columns of its ``--ipi-template`` file.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ase
import ase.io
import httpx
import numpy as np
import pytest
import torch

from cace_server.engine import Engine, EngineSettings
from cace_server.http import BackgroundServer, create_app
from cace_server.model import CACEPotential, convert_original, save_model
from cace_server.outputs import Outputs
from cace_server.structures import Structure
from cace_server.units import FORCE_AU_PER_EV_ANGSTROM, HARTREE_PER_EV
from tests.conftest import REFERENCE_DIR
from tests.ipi_support import IPI_SCRIPT, ipi_structure, ipi_to_au, start_ipi
from tests.published_support import structure

NAME = "atomwise-extra-feature"
SYNTHETIC = REFERENCE_DIR / "synthetic"
KEY = "charge_states"

if not (SYNTHETIC / f"{NAME}.pth").is_file():  # pragma: no cover
    pytest.skip(f"{SYNTHETIC / NAME}.pth is absent", allow_module_level=True)


@pytest.fixture(scope="module")
def model() -> CACEPotential:
    return convert_original(SYNTHETIC / f"{NAME}.pth", dtype="float64")


@pytest.fixture(scope="module")
def structures() -> dict[str, Structure]:
    npz = np.load(SYNTHETIC / f"{NAME}.npz")
    return {p: structure(npz, p) for p in ("box", "cluster", "mixed")}


@pytest.fixture(scope="module")
def server(model: CACEPotential) -> Iterator[BackgroundServer]:
    # One torch thread for the engine and the direct predict alike (bit-equal results).
    threads = torch.get_num_threads()
    settings = EngineSettings(dtype="float64", batch_wait_ms=2.0, torch_threads=1)
    try:
        with (
            Engine(model, settings=settings) as engine,
            BackgroundServer(create_app(engine)) as srv,
        ):
            torch.set_num_threads(1)
            yield srv
    finally:
        torch.set_num_threads(threads)


@pytest.fixture
def client(server: BackgroundServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


def body(s: Structure, **extra: Any) -> dict[str, Any]:
    out: dict[str, Any] = {
        "numbers": s.numbers.tolist(),
        "positions": s.positions.tolist(),
        "arrays": {KEY: s.arrays[KEY].tolist()},
        "properties": ["energy", "forces"],
    }
    if s.pbc.all():
        out.update(cell=s.cell.tolist(), pbc=[True, True, True])
    out.update(extra)
    return out


def test_models_lists_the_input(client: httpx.Client) -> None:
    (info,) = client.get("/v1/models").json()["models"]
    assert info["required_inputs"] == [KEY]


@pytest.mark.parametrize("pattern", ["box", "cluster", "mixed"])
def test_http_equals_predict_exactly(
    client: httpx.Client, model: CACEPotential, structures: dict[str, Structure], pattern: str
) -> None:
    s = structures[pattern]
    want = model.predict([s], Outputs(["energy", "forces"]))[0]
    r = client.post("/v1/calculate", json=body(s))
    assert r.status_code == 200, r.text
    got = r.json()
    assert got["energy"] == want.energy
    np.testing.assert_array_equal(np.asarray(got["forces"]), want.forces)


def test_request_without_the_input_is_a_422_naming_it(
    client: httpx.Client, structures: dict[str, Structure]
) -> None:
    request = body(structures["cluster"])
    del request["arrays"]
    r = client.post("/v1/calculate", json=request)
    assert r.status_code == 422, r.text
    reply = r.json()
    assert (reply["error"], reply["field"]) == ("missing_input", "arrays.charge_states"), reply
    # the server stays up and answers the next request
    assert client.post("/v1/calculate", json=body(structures["cluster"])).status_code == 200


@pytest.mark.ipi
@pytest.mark.skipif(not IPI_SCRIPT.exists(), reason="the i-pi program is not installed")
def test_ipi_run_takes_the_input_from_the_template(
    tmp_path: Path,
    socket_dir: str,
    ipi_runs: list,
    model: CACEPotential,
    structures: dict[str, Structure],
) -> None:
    mixed = structures["mixed"]
    atoms = ase.Atoms(numbers=mixed.numbers, positions=mixed.positions, cell=mixed.cell, pbc=True)
    template = tmp_path / "template.extxyz"
    with_input = atoms.copy()
    with_input.arrays[KEY] = mixed.arrays[KEY].copy()
    ase.io.write(template, with_input, format="extxyz")
    model_file = save_model(model, tmp_path / "model.safetensors")
    run = start_ipi(ipi_runs, tmp_path / "ipi", socket_dir, atoms, nbeads=2, steps=2)
    log = open(tmp_path / "server.log", "wb")  # noqa: SIM115 - closed below
    server = subprocess.Popen(
        [
            *(sys.executable, "-m", "cace_server.cli", "serve", "--no-http"),
            *("--model", f"m={model_file}", "--dtype", "float64"),
            *("--ipi", f"unix:{run.socket_path}", "--ipi-clients", "2"),
            *("--ipi-template", str(template)),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=dict(os.environ, OMP_NUM_THREADS="2"),
    )
    try:
        assert run.wait(timeout=180) == 0, run.log()
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=30)
        finally:
            if server.poll() is None:
                server.kill()
                server.wait(10)
            log.close()
    props = run.properties()
    for bead in range(2):
        positions, forces = run.frames("pos", bead), run.frames("frc", bead)
        assert len(positions) == 3
        for step, (frame, frc) in enumerate(zip(positions, forces, strict=True)):
            recorded = ipi_structure(frame, mixed.numbers)
            s = Structure.create(
                recorded.numbers, recorded.positions, recorded.cell, True, {KEY: mixed.arrays[KEY]}
            )
            want = model.predict([s], Outputs(["energy", "forces"]))[0]
            assert props[step, 2 + bead] == pytest.approx(want.energy * HARTREE_PER_EV, rel=1e-6)
            got = ipi_to_au("force", frc.get_forces())
            expected = want.forces * FORCE_AU_PER_EV_ANGSTROM
            assert np.abs(got - expected).max() <= 1e-6 * np.abs(expected).max()
