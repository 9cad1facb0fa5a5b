"""`cace-server serve` as a process: an i-PI driver for real i-PI runs, stopped by SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.ipi_support import IPI_SCRIPT, check_run_against_model, start_ipi

pytestmark = pytest.mark.ipi
if not IPI_SCRIPT.exists():  # pragma: no cover
    pytest.skip("the i-pi program is not installed", allow_module_level=True)

CLI = [sys.executable, "-m", "cace_server.cli"]


def test_serve_drives_ipi_pimd_and_stops_on_sigterm(
    tmp_path: Path,
    socket_dir: str,
    ipi_runs: list,
    water_model_file: Path,
    water_model,
    liquid_water,
) -> None:
    first = start_ipi(ipi_runs, tmp_path / "run1", socket_dir, liquid_water, nbeads=8, steps=2)
    template = tmp_path / "run1" / "init.extxyz"
    log = open(tmp_path / "server.log", "wb")  # noqa: SIM115 - closed below
    server = subprocess.Popen(
        [
            *CLI,
            "serve",
            "--no-http",
            "--model",
            f"water={water_model_file}",
            "--dtype",
            "float64",
            "--ipi",
            f"unix:{first.socket_path}",
            "--ipi-clients",
            "8",
            "--ipi-template",
            str(template),
            "--batch-wait-ms",
            "20",
            "--log-json",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=dict(os.environ, OMP_NUM_THREADS="2"),
    )
    try:
        assert first.wait(timeout=180) == 0, first.log()
        check_run_against_model(first, water_model, liquid_water.numbers)
        # The server outlives i-PI: its connections reconnect, so a new run is served too.
        second = start_ipi(ipi_runs, tmp_path / "run2", socket_dir, liquid_water, nbeads=8, steps=1)
        assert second.wait(timeout=180) == 0, second.log()
        check_run_against_model(second, water_model, liquid_water.numbers)
        assert server.poll() is None, "the server exited with i-PI"
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=30) == 0
    finally:
        if server.poll() is None:
            server.kill()
            server.wait(10)
        log.close()
    text = (tmp_path / "server.log").read_text()
    assert '"message": "engine ready"' in text and '"message": "stopped"' in text, text[-3000:]


def test_serve_refuses_ipi_without_template(water_model_file: Path) -> None:
    proc = subprocess.run(
        [*CLI, "serve", "--no-http", "--model", str(water_model_file), "--ipi", "unix:nowhere"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "--ipi-template" in proc.stderr


def test_serve_refuses_missing_model(tmp_path: Path) -> None:
    t0 = time.monotonic()
    proc = subprocess.run(
        [*CLI, "serve", "--no-http", "--model", str(tmp_path / "missing.safetensors")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "error: engine failed to start: ModelFileError" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert time.monotonic() - t0 < 60


def test_ipi_structures_get_the_http_geometry_checks(
    tmp_path: Path, socket_dir: str, ipi_runs: list
) -> None:
    """Two atoms 0.01 Bohr apart and ``--ipi-refuse-close-contacts``: refused as over HTTP,
    i-PI's connection closed with a reason, and the server exits 4 (it will not reconnect).
    (Without the flag they are computed with a warning: tests/test_ipi_run_end.py.)"""
    from ase.build import molecule

    atoms = molecule("H2O", cell=[10.0, 10.0, 10.0], pbc=True)
    atoms.positions += 5.0
    atoms.positions[2] = atoms.positions[1] + [0.005, 0.0, 0.0]  # 0.0095 Bohr from atom 1
    run = start_ipi(
        ipi_runs, tmp_path / "run", socket_dir, atoms, nbeads=1, steps=2, velocities=False
    )
    log_path = tmp_path / "server.log"
    with open(log_path, "wb") as log:
        server = subprocess.run(
            [
                *CLI, "serve", "--no-http", "--no-ipi-reconnect", "--log-json",
                "--ipi", f"unix:{run.socket_path}", "--ipi-refuse-close-contacts",
                "--ipi-template", str(tmp_path / "run" / "init.extxyz"),
            ],
            stdout=log, stderr=subprocess.STDOUT, timeout=180,
            env=dict(os.environ, OMP_NUM_THREADS="1"),
        )  # fmt: skip
    text = log_path.read_text()
    assert server.returncode == 4, text[-3000:]
    refusals = [
        json.loads(line)
        for line in text.splitlines()
        if line.startswith("{") and "refusing the structure" in line
    ]
    assert refusals, text[-3000:]
    message = refusals[0]["message"]
    assert refusals[0]["level"] == "error"
    assert "atom 1 is 0.005 Å from atom 2, closer than min_distance 0.1 Å" in message, message
    assert "closing the connection" in message and "the connection closes for good" in message
    # i-PI never got forces for it
    assert all(p.stat().st_size == 0 for p in (tmp_path / "run").glob("sim.frc*"))
