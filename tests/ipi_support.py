"""Running the real i-PI program for tests and benchmarks.

:class:`IpiRun` writes an i-PI input (NVT PIMD by default) for a structure, starts
``i-pi`` on a UNIX socket, and reads back what it recorded (positions, forces, bead
potentials, extras) so that it can be compared with our model evaluated directly.
"""

from __future__ import annotations

import ast
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import ase
import ase.io
import numpy as np
import pytest
from ipi.utils.units import unit_to_internal

from cace_server.ipi import DriverOptions, DriverPool
from cace_server.structures import Structure
from cace_server.units import ANGSTROM_PER_BOHR, FORCE_AU_PER_EV_ANGSTROM, HARTREE_PER_EV
from tests.test_serve_http import free_port

IPI_SCRIPT = Path(sys.executable).with_name("i-pi")

RUN_TIMEOUT = 90.0  # seconds any single i-PI run may take in these tests

# ------------------------------------------------------------ running i-PI

OUTPUTS = """
    <properties stride="1" filename="out" flush="1">
      [ step, potential{atomic_unit}, bead_potentials{atomic_unit}, virial_md{atomic_unit},
        kstress_md{atomic_unit}, pressure_md{atomic_unit}, volume{atomic_unit} ]
    </properties>
    <trajectory filename="pos" stride="1" format="ase" cell_units="ase" flush="1">
      positions{ase} </trajectory>
    <trajectory filename="frc" stride="1" format="ase" cell_units="ase" flush="1">
      forces{ase} </trajectory>
    <trajectory filename="xtra" stride="1" flush="1"> extras </trajectory>
"""


class IpiRun:
    """One i-PI process: input files in ``workdir``, socket at ``socket_path``."""

    def __init__(
        self,
        workdir: Path,
        socket_dir: str,
        atoms: ase.Atoms,
        *,
        name: str = "cace",
        mode: str = "unix",
        batch_size: int = 1,
        nbeads: int = 4,
        steps: int = 3,
        motion: str | None = None,
        sockets_prefix: str | None = None,
        timeout: float = 0.0,
        velocities: bool = True,
        outputs: str = OUTPUTS,
        pressure_mpa: float | None = None,
        port: int | None = None,
        exit_on_disconnect: bool = False,
        timestep_fs: float = 0.25,
    ) -> None:
        self.workdir = workdir
        self.nbeads = nbeads
        self.steps = steps
        self.prefix = sockets_prefix if sockets_prefix is not None else socket_dir + "/"
        self.name = name
        self.socket_path = self.prefix + name
        self.proc: subprocess.Popen[bytes] | None = None
        workdir.mkdir(parents=True, exist_ok=True)
        ase.io.write(workdir / "init.extxyz", atoms, format="extxyz")
        init_velocities = (
            '<velocities mode="thermal" units="kelvin"> 300 </velocities>' if velocities else ""
        )
        if motion is None:
            motion = f"""
      <motion mode="dynamics">
        <dynamics mode="nvt">
          <timestep units="femtosecond"> {timestep_fs} </timestep>
          <thermostat mode="pile_l"><tau units="femtosecond"> 50 </tau></thermostat>
        </dynamics>
      </motion>"""
        pressure = (
            f'<pressure units="megapascal"> {pressure_mpa} </pressure>'
            if pressure_mpa is not None
            else ""
        )
        # TCP (mode inet) on loopback when a port is given; ``name`` is then unused
        address = f"<address> {name} </address>"
        if port is not None:
            mode = "inet"
            address = f"<address> 127.0.0.1 </address> <port> {port} </port>"
        exit_flag = "<exit_on_disconnect> true </exit_on_disconnect>" if exit_on_disconnect else ""
        (workdir / "input.xml").write_text(
            f"""<simulation verbosity="low" safe_stride="1000" floatformat="%.16e"
            sockets_prefix="{self.prefix}">
  <output prefix="sim">{outputs}</output>
  <total_steps> {steps} </total_steps>
  <prng><seed> 12345 </seed></prng>
  <ffsocket name="cace" mode="{mode}" pbc="false">
    {address} {exit_flag}
    <batch_size> {batch_size} </batch_size>
    <timeout> {timeout} </timeout>
  </ffsocket>
  <system>
    <initialize nbeads="{nbeads}">
      <file mode="ase" units="angstrom"> init.extxyz </file>
      {init_velocities}
    </initialize>
    <forces><force forcefield="cace"/></forces>
    {motion}
    <ensemble><temperature units="kelvin"> 300 </temperature>{pressure}</ensemble>
  </system>
</simulation>
"""
        )

    def start(self) -> IpiRun:
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        log = open(self.workdir / "ipi.log", "ab")  # noqa: SIM115 - closed with the process
        self.proc = subprocess.Popen(
            [sys.executable, str(IPI_SCRIPT), "input.xml"],
            cwd=self.workdir,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
        log.close()
        return self

    def wait_for_socket(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if os.path.exists(self.socket_path):
                return
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"i-PI exited early:\n{self.log()}")
            time.sleep(0.05)
        raise AssertionError(f"i-PI did not open {self.socket_path} in {timeout} s")

    def wait(self, timeout: float = RUN_TIMEOUT) -> int:
        assert self.proc is not None
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.stop()
            raise AssertionError(f"i-PI did not finish in {timeout} s:\n{self.log()}") from None

    def kill(self) -> None:
        """SIGKILL, as a crash would: the socket file stays behind."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        if os.path.exists(self.socket_path):
            os.unlink(self.socket_path)

    def log(self) -> str:
        path = self.workdir / "ipi.log"
        return path.read_text(errors="replace")[-4000:] if path.exists() else ""

    # --- reading i-PI's outputs
    def properties(self) -> np.ndarray:
        return np.atleast_2d(np.loadtxt(self.workdir / "sim.out"))

    def frames(self, what: str, bead: int) -> list[ase.Atoms]:
        width = len(str(self.nbeads - 1)) if self.nbeads > 1 else 1
        path = self.workdir / f"sim.{what}_{bead:0{width}d}.extxyz"
        return ase.io.read(path, index=":", format="extxyz")

    def binary_frames(
        self, what: str, bead: int, natoms: int, frames: int | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """A ``format="bin"`` trajectory, exact: i-PI's cells ``h`` (frames, 3, 3; lattice
        vectors as columns, Bohr) and the per-atom values (frames, natoms, 3).

        i-PI writes each frame as the cell (9 doubles), the atom count (int64), 3N
        doubles, then names and a title whose lengths are the same in every frame. The
        frame count is the run's steps + 1 unless given (a run ended early).
        """
        path = self.workdir / f"sim.{what}_{bead:0{self._width}d}.bin"
        raw = path.read_bytes()
        frames = self.steps + 1 if frames is None else frames
        assert len(raw) % frames == 0, (path, len(raw), frames)
        size = len(raw) // frames
        cells = np.empty((frames, 3, 3))
        out = np.empty((frames, natoms, 3))
        for k in range(frames):
            cells[k] = np.frombuffer(raw, np.float64, 9, k * size).reshape(3, 3)
            start = k * size + 10 * 8
            out[k] = np.frombuffer(raw, np.float64, 3 * natoms, start).reshape(natoms, 3)
        return cells, out

    @property
    def _width(self) -> int:
        return len(str(self.nbeads - 1)) if self.nbeads > 1 else 1

    def extras(self, bead: int) -> list[str]:
        width = len(str(self.nbeads - 1)) if self.nbeads > 1 else 1
        path = self.workdir / f"sim.xtra_{bead:0{width}d}"
        return [line for line in path.read_text().splitlines() if line.startswith("{")]


def start_ipi(runs: list[IpiRun], *args: object, **kwargs: object) -> IpiRun:
    run = IpiRun(*args, **kwargs)  # type: ignore[arg-type]
    runs.append(run)
    run.start()
    return run


def options(atoms: ase.Atoms, **kwargs: object) -> DriverOptions:
    defaults: dict[str, object] = {
        "reconnect": False,
        "connect_timeout": 60.0,
        "backoff_initial": 0.02,
        "backoff_max": 0.2,
        "model_name": "pair-test",
    }
    defaults.update(kwargs)
    return DriverOptions(numbers=atoms.numbers, **defaults)  # type: ignore[arg-type]


async def serve_until_closed(pool: DriverPool, timeout: float = RUN_TIMEOUT) -> None:
    async with pool:
        finished = await pool.wait(timeout)
    assert finished, [s.as_dict() for s in pool.statuses()]


def ipi_to_au(dimension: str, value: np.ndarray) -> np.ndarray:
    """Undo i-PI's own conversion of an ``{ase}``-unit output back to atomic units."""
    return unit_to_internal(dimension, "ase", np.asarray(value, dtype=float))


def ipi_structure(frame: ase.Atoms, numbers: np.ndarray) -> Structure:
    """The structure i-PI recorded, converted Bohr -> Å the way our driver converts."""
    return Structure.create(
        numbers,
        ipi_to_au("length", frame.positions) * ANGSTROM_PER_BOHR,
        ipi_to_au("length", np.asarray(frame.cell)) * ANGSTROM_PER_BOHR,
        True,
    )


def check_run_against_model(run: IpiRun, model: object, numbers: np.ndarray) -> None:
    """i-PI's recorded forces, bead potentials and extras equal the model evaluated
    directly (one batch, float64) on the bead positions i-PI recorded: 1e-6 relative."""
    props = run.properties()
    frames = []
    for bead in range(run.nbeads):
        positions = run.frames("pos", bead)
        forces = run.frames("frc", bead)
        extras = run.extras(bead)
        assert len(positions) == len(forces) == len(extras) == run.steps + 1
        for step in range(run.steps + 1):
            frames.append((bead, step, positions[step], forces[step], extras[step]))
    structures = [ipi_structure(pos, numbers) for _, _, pos, _, _ in frames]
    direct = model.predict(structures)  # type: ignore[attr-defined]
    for (bead, step, _, frc, extras), expected in zip(frames, direct, strict=True):
        want = expected.forces * FORCE_AU_PER_EV_ANGSTROM
        got = ipi_to_au("force", frc.get_forces())
        assert np.abs(got - want).max() <= 1e-6 * np.abs(want).max()
        assert props[step, 2 + bead] == pytest.approx(expected.energy * HARTREE_PER_EV, rel=1e-6)
        # i-PI's extras line holds every bead's raw JSON; ours for this bead is in it
        record = ast.literal_eval(extras)  # i-PI writes the Python repr of a dict
        mine = json.loads(record["raw"][bead])
        assert mine["energy_eV"] == pytest.approx(expected.energy, rel=1e-6)
        np.testing.assert_allclose(mine["charges"], expected.charges, rtol=0, atol=1e-6)


class CountingListener:
    """A listening socket on loopback or a UNIX path that counts the connections it
    accepts, sends each one ``greeting`` (if any) and hangs up: a stand-in for a
    service a client must never reach, or must reach only so often."""

    def __init__(self, sock: socket.socket, greeting: bytes = b"") -> None:
        sock.settimeout(0.05)
        self.sock = sock
        self.greeting = greeting
        self.accepted = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    @classmethod
    def unix(cls, path: str) -> CountingListener:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(path)
        sock.listen(64)
        return cls(sock)

    @classmethod
    def tcp(cls, greeting: bytes = b"") -> CountingListener:
        return cls(socket.create_server(("127.0.0.1", 0)), greeting)

    @property
    def port(self) -> int:
        return int(self.sock.getsockname()[1])

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:  # the timeout, or the socket closed
                continue
            self.accepted += 1
            if self.greeting:
                with contextlib.suppress(OSError):
                    conn.sendall(self.greeting)
            conn.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()


@contextlib.contextmanager
def serve_with_ipi(
    log_path: Path, run: IpiRun, beads: int, template: Path, *options: str
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """``cace-server serve`` on a free loopback port, driving ``run`` with one
    connection per bead (one torch thread), ``options`` added; yields its URL and
    process and stops it (SIGTERM, then kill) on the way out."""
    port = free_port()
    command = [
        sys.executable, "-m", "cace_server.cli", "serve", "--port", str(port),
        "--ipi", f"unix:{run.socket_path}", "--ipi-clients", str(beads),
        "--ipi-template", str(template), "--torch-threads", "1", *options,
    ]  # fmt: skip
    with open(log_path, "wb") as log:
        server = subprocess.Popen(
            command,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=dict(os.environ, OMP_NUM_THREADS="1"),
        )
        try:
            yield f"http://127.0.0.1:{port}", server
        finally:
            if server.poll() is None:
                server.send_signal(signal.SIGTERM)
                try:
                    server.wait(30)
                except subprocess.TimeoutExpired:
                    server.kill()
                    server.wait(10)
