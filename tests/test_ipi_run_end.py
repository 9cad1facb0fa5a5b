"""How an i-PI run ends with ``cace-server serve --no-http`` (issue 28), with the real i-PI.

What must hold: a run with atoms closer than ``min_distance`` is computed, with one
warning per connection in the server log (i-PI's vibrational scans ask for such
geometries on purpose); with ``--ipi-refuse-close-contacts``, or any other refusal
(here: a species template that does not match i-PI's atoms), the server exits 4 with
the reason at once, and i-PI with ``exit_on_disconnect`` stops too: never a hang.
With ``--no-ipi-reconnect`` the server exits 0 within seconds of i-PI's end even when
i-PI never accepted most of its connections (64 against a 4-bead, 5-step run), over
UNIX and TCP; with reconnecting on it keeps waiting for the next run.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import ase
import ase.io
import numpy as np
import pytest

from tests.ipi_support import IPI_SCRIPT, IpiRun
from tests.test_serve_http import free_port

pytestmark = [
    pytest.mark.ipi,
    pytest.mark.skipif(not IPI_SCRIPT.exists(), reason="the i-pi program is not installed"),
]

ROOT = Path(__file__).resolve().parents[1]
WATER = ROOT / "clients" / "ipi" / "init.extxyz"
#: far below the default test timeouts: a hang fails here, it does not wait for CI's limit
END_TIMEOUT = 60.0


def small_water() -> ase.Atoms:
    """8 water molecules of the i-PI example box (its cell)."""
    return ase.io.read(WATER)[:24]


def close_contact() -> ase.Atoms:
    """An H atom displaced 0.05 Å from an O atom of another molecule."""
    atoms = small_water()
    atoms.positions[4] = atoms.positions[0] + np.array([0.05, 0.0, 0.0])
    return atoms


class Server:
    """``cace-server serve --no-http`` driving one i-PI address; stopped on the way out."""

    def __init__(self, log: Path, address: str, clients: int, template: Path, *flags: str):
        self.log_path = log
        command = [
            sys.executable, "-m", "cace_server.cli", "serve", "--no-http",
            "--ipi", address, "--ipi-clients", str(clients), "--ipi-template", str(template),
            "--torch-threads", "1", *flags,
        ]  # fmt: skip
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(
                command,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=dict(os.environ, OMP_NUM_THREADS="1"),
            )

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"the server did not exit in {timeout} s:\n{self.log()}") from None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


@pytest.fixture
def processes() -> Iterator[list[IpiRun | Server]]:
    started: list[IpiRun | Server] = []
    yield started
    for process in reversed(started):
        process.stop()


def run_ipi(
    started: list[IpiRun | Server], tmp_path: Path, socket_dir: str, atoms: ase.Atoms, **kw: object
) -> IpiRun:
    defaults: dict[str, object] = {"nbeads": 1, "steps": 3, "velocities": False}
    defaults.update(kw)
    run = IpiRun(tmp_path / "ipi", socket_dir, atoms, timestep_fs=0.01, **defaults)  # type: ignore[arg-type]
    started.append(run)
    return run.start()


def serve(started: list[IpiRun | Server], tmp_path: Path, *args: object, **kw: object) -> Server:
    server = Server(tmp_path / "server.log", *args, **kw)  # type: ignore[arg-type]
    started.append(server)
    return server


def write_template(tmp_path: Path, atoms: ase.Atoms) -> Path:
    path = tmp_path / "template.extxyz"
    ase.io.write(path, atoms)
    return path


def test_close_contacts_are_computed_with_one_warning(
    tmp_path: Path, socket_dir: str, processes: list[IpiRun | Server]
) -> None:
    atoms = close_contact()
    run = run_ipi(processes, tmp_path, socket_dir, atoms)
    run.wait_for_socket()
    server = serve(
        processes, tmp_path, f"unix:{run.socket_path}", 1, write_template(tmp_path, atoms),
        "--no-ipi-reconnect",
    )  # fmt: skip
    assert run.wait(END_TIMEOUT) == 0, run.log()
    assert server.wait(30) == 0, server.log()
    log = server.log()
    # 4 structures (3 steps and the first), each closer than min_distance: one warning
    warnings = [line for line in log.splitlines() if "evaluated as i-PI asked" in line]
    assert len(warnings) == 1, log
    assert "atom 0 is 0.05 Å from atom 4" in warnings[0], warnings
    assert len(run.properties()) == 4


@pytest.mark.slow
def test_refused_close_contacts_end_the_run_and_ipi_too(
    tmp_path: Path, socket_dir: str, processes: list[IpiRun | Server]
) -> None:
    atoms = close_contact()
    run = run_ipi(processes, tmp_path, socket_dir, atoms, exit_on_disconnect=True)
    run.wait_for_socket()
    server = serve(
        processes, tmp_path, f"unix:{run.socket_path}", 2, write_template(tmp_path, atoms),
        "--no-ipi-reconnect", "--ipi-refuse-close-contacts",
    )  # fmt: skip
    assert server.wait(END_TIMEOUT) == 4, server.log()
    log = server.log()
    assert "error: ipi[" in log and "closer than min_distance" in log, log
    assert "exit_on_disconnect" in log, log
    # i-PI lost its client and stops too (its own status is 0: a soft exit)
    run.wait(30)
    assert "Client shutdown" in run.log(), run.log()


@pytest.mark.slow
def test_a_template_that_does_not_match_ends_the_run(
    tmp_path: Path, socket_dir: str, processes: list[IpiRun | Server]
) -> None:
    atoms = small_water()
    run = run_ipi(processes, tmp_path, socket_dir, atoms)
    run.wait_for_socket()
    server = serve(
        processes, tmp_path, f"unix:{run.socket_path}", 1, write_template(tmp_path, atoms[:21]),
        "--no-ipi-reconnect",
    )  # fmt: skip
    assert server.wait(END_TIMEOUT) == 4, server.log()
    assert "i-PI sent 24 atoms but the species template has 21" in server.log()
    # without exit_on_disconnect i-PI waits for another client: the server said so
    assert run.proc is not None and run.proc.poll() is None
    assert "waits for another client" in server.log()


@pytest.mark.parametrize(
    "transport", ["unix", pytest.param("tcp", marks=pytest.mark.slow)], ids=["unix", "tcp"]
)
def test_no_reconnect_exits_when_ipi_ends_with_connections_never_accepted(
    tmp_path: Path, socket_dir: str, processes: list[IpiRun | Server], transport: str
) -> None:
    atoms = small_water()
    port = free_port() if transport == "tcp" else None
    run = run_ipi(processes, tmp_path, socket_dir, atoms, nbeads=4, steps=5, port=port)
    address = f"127.0.0.1:{port}" if port is not None else f"unix:{run.socket_path}"
    server = serve(
        processes, tmp_path, address, 64, write_template(tmp_path, atoms), "--no-ipi-reconnect"
    )
    assert run.wait(END_TIMEOUT) == 0, run.log()
    ended = time.monotonic()
    assert server.wait(15) == 0, server.log()
    assert time.monotonic() - ended < 5, server.log()
    assert "accepted this connection" in server.log()


@pytest.mark.slow
def test_with_reconnect_the_server_waits_for_the_next_run(
    tmp_path: Path, socket_dir: str, processes: list[IpiRun | Server]
) -> None:
    atoms = small_water()
    run = run_ipi(processes, tmp_path, socket_dir, atoms, nbeads=2, steps=2)
    server = serve(
        processes, tmp_path, f"unix:{run.socket_path}", 4, write_template(tmp_path, atoms)
    )
    assert run.wait(END_TIMEOUT) == 0, run.log()
    time.sleep(3)
    assert server.proc.poll() is None, server.log()  # waiting for the next i-PI run
    # ... which it serves
    again = IpiRun(tmp_path / "ipi2", socket_dir, atoms, nbeads=2, steps=2, velocities=False)
    processes.append(again)
    assert again.start().wait(END_TIMEOUT) == 0, again.log()
    server.stop()
    assert server.proc.returncode == 0, server.log()
