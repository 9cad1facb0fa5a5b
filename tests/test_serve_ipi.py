"""`cace-server serve` as a process: an i-PI driver for real i-PI runs, stopped by SIGTERM."""

from __future__ import annotations

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
