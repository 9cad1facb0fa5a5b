"""Server-side jobs (``POST /v1/jobs``) against ASE driving ``RemoteCACE`` step by step.

A ``cace-server serve`` subprocess (HTTP only, float64 unless --dtype, the bundled water model
``cace_server/data/water.safetensors``) serves every case; this process is the client
(httpx for jobs, ``cace_client.RemoteCACE`` for ASE).

Default: the 64 water clusters of ``scripts/water_clusters.py`` (2 to 20 molecules)
relaxed with FIRE (fmax 0.05, at most 500 steps) as

  job          one relax job: wall time from POST to the stream's end line
  sequential   ASE's FIRE through RemoteCACE, one cluster after the other
  8 threads    the same in a pool of 8 client threads, one RemoteCACE each

with the model calls each used (the job's ``model_calls``; the engine's batch count
from ``/metrics`` before and after each case) and the job's speed-up; then whether
the job's results equal the sequential run's (steps, final positions).

    python benchmarks/jobs.py                      # 64 clusters
    python benchmarks/jobs.py --count 8 --steps 200

``--md``: 16 boxes of 64 molecules, velocities drawn at 300 K (seeded, Stationary),
200 NVE steps of 0.5 fs as one job against ASE's VelocityVerlet with the in-process
``CACECalculator``, from the same velocities: energy drift per box, wall times, model
calls (``--md-boxes``, ``--md-steps`` shrink it).

``--with-ipi``: i-PI NVT PIMD of liquid water (192 atoms, ``--beads`` connections over
a UNIX socket to ``cace-server serve --ipi``): median wall time per i-PI step alone,
and while a relax job of ``--ipi-job-count`` clusters runs on the same server, for
the default job batch and for ``--job-batch-atoms`` (repeatable); with the engine's
count of the batches each i-PI step waited behind.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
# This folder holds files named like packages (ipi.py, http.py): keep it off sys.path.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(REPO))
sys.path.insert(1, str(REPO / "clients"))

import httpx  # noqa: E402
import numpy as np  # noqa: E402
from ase import Atoms, units  # noqa: E402

from scripts.water_clusters import water_boxes, water_clusters  # noqa: E402

MODEL = REPO / "cace_server" / "data" / "water.safetensors"
REFERENCE = Path(os.environ.get("CACE_REFERENCE_DIR", REPO.parent / "shared" / "reference"))


# ------------------------------------------------------------------------------ the server


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# the model's dtype in every server and reference (--dtype)
DTYPE = ["float64"]


class Server:
    """``cace-server serve`` in a subprocess (its own session, stopped with SIGTERM)."""

    def __init__(self, threads: int, log: Path, *options: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        command = [
            sys.executable, "-m", "cace_server.cli", "serve", "--port", str(self.port),
            "--model", f"water={MODEL}", "--dtype", DTYPE[0],
            "--torch-threads", str(threads), *options,
        ]  # fmt: skip
        env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS=str(threads))
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(
                command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )

    def wait_ready(self, timeout: float = 300.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("the server exited during start-up")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return
            time.sleep(0.2)
        raise TimeoutError("server not ready")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)


@contextlib.contextmanager
def serving(threads: int, log: Path, *options: str) -> Iterator[Server]:
    server = Server(threads, log, *options)
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


def metrics(url: str) -> dict[str, float]:
    """``/metrics`` as {'name{labels}': value} (counters with their ``_total``)."""
    out: dict[str, float] = {}
    for line in httpx.get(url + "/metrics", timeout=30).text.splitlines():
        match = re.match(r"^([a-zA-Z_:][\w:]*(?:\{[^}]*\})?) (\S+)$", line)
        if match:
            out[match.group(1)] = float(match.group(2))
    return out


def batches(url: str) -> int:
    return int(metrics(url).get("cace_engine_batches_total", 0))


# ------------------------------------------------------------------------------ jobs


def job_structure(atoms: Atoms, velocities: bool = False) -> dict[str, Any]:
    body: dict[str, Any] = {
        "numbers": atoms.numbers.tolist(),
        "positions": atoms.positions.tolist(),
        "pbc": atoms.pbc.tolist(),
    }
    if atoms.cell.array.any():
        body["cell"] = atoms.cell.array.tolist()
    if velocities:
        body["velocities"] = (atoms.get_velocities() * units.fs).tolist()  # Å/fs
    return body


def submit(client: httpx.Client, body: dict[str, Any]) -> str:
    response = client.post("/v1/jobs", json=body)
    if response.status_code != 202:
        raise RuntimeError(f"job refused: {response.status_code} {response.text}")
    return str(response.json()["id"])


def collect(client: httpx.Client, job_id: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Stream the job's results until its end line; (results by index, final status)."""
    results: list[dict[str, Any]] = []
    with client.stream("GET", f"/v1/jobs/{job_id}/results", timeout=None) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line:
                continue
            record = json.loads(line)
            if "end" in record:
                if record["state"] != "done":
                    raise RuntimeError(f"job {record['state']}: {record.get('error')}")
                break
            results.append(record)
    status = client.get(f"/v1/jobs/{job_id}").json()
    return sorted(results, key=lambda r: r["index"]), status


def run_job(url: str, body: dict[str, Any]) -> tuple[float, list[dict[str, Any]], dict[str, Any]]:
    with httpx.Client(base_url=url, timeout=600) as client:
        t0 = time.perf_counter()
        results, status = collect(client, submit(client, body))
        return time.perf_counter() - t0, results, status


# ------------------------------------------------------------------------------ relax


def ase_relax(url: str, atoms: Atoms, args: argparse.Namespace) -> tuple[int, np.ndarray]:
    import ase.optimize
    from cace_client import RemoteCACE

    atoms = atoms.copy()
    atoms.calc = RemoteCACE(url, binary=False)
    try:
        optimizer = getattr(ase.optimize, args.optimizer)(atoms, logfile=None)
        optimizer.run(fmax=args.fmax, steps=args.steps)
        return int(optimizer.nsteps), atoms.get_positions()
    finally:
        atoms.calc.client.close()


def relax(args: argparse.Namespace, work: Path) -> None:
    clusters = water_clusters(args.count)
    atoms_total = sum(len(a) for a in clusters)
    print(
        f"{len(clusters)} water clusters ({len(clusters[0])} to {len(clusters[-1])} atoms, "
        f"{atoms_total} in all), {args.optimizer} fmax {args.fmax} steps {args.steps}, "
        f"{DTYPE[0]}, server: cace-server serve subprocess, {args.threads} torch thread(s)"
    )
    rows: list[tuple[str, float, int, int]] = []  # case, wall, model calls, engine batches
    with serving(args.threads, work / "relax-server.log") as server:
        body = {
            "kind": "relax",
            "structures": [job_structure(a) for a in clusters],
            "relax": {"optimizer": args.optimizer, "fmax": args.fmax, "steps": args.steps},
        }
        before = batches(server.url)
        wall, results, status = run_job(server.url, body)
        rows.append(("job", wall, int(status["model_calls"]), batches(server.url) - before))
        steps = [int(r["steps"]) for r in results]

        def clients(threads: int) -> list[tuple[int, np.ndarray]]:
            name = "sequential RemoteCACE" if threads == 1 else f"{threads} client threads"
            before = batches(server.url)
            t0 = time.perf_counter()
            with ThreadPoolExecutor(threads) as pool:
                out = list(pool.map(lambda a: ase_relax(server.url, a, args), clusters))
            n = batches(server.url) - before  # one request = one model call, or fewer batched
            rows.append((name, time.perf_counter() - t0, n, n))
            return out

        sequential = clients(1)
        threaded = clients(args.client_threads)

    print()
    print(
        f"{'case':<24}{'wall s':>10}{'model calls':>14}{'engine batches':>16}{'job speed-up':>14}"
    )
    for name, seconds, calls, n_batches in rows:
        print(f"{name:<24}{seconds:>10.2f}{calls:>14}{n_batches:>16}{seconds / wall:>13.1f}x")
    print()
    print(
        f"job: {status['iterations']} iterations, {status['model_calls']} model calls; "
        f"longest relaxation {max(steps)} steps, sum of steps {sum(steps)} "
        f"(ASE's model calls: steps + 1 per structure = {sum(steps) + len(steps)}); "
        f"{sum(bool(r['converged']) for r in results)}/{len(results)} converged"
    )
    speedup = rows[1][1] / wall
    target = "met" if speedup >= 5 else "NOT met"
    print(f"target job >= 5x faster than the sequential client: {speedup:.1f}x ({target})")
    for name, other in (("sequential", sequential), ("threads", threaded)):
        dx = max(
            float(np.abs(np.asarray(r["positions"]) - pos).max())
            for r, (_, pos) in zip(results, other, strict=True)
        )
        dsteps = [int(r["steps"]) - s for r, (s, _) in zip(results, other, strict=True)]
        print(
            f"job vs {name}: max |dx| {dx:.2e} Å over all clusters, step differences: "
            f"max |d| {max(abs(d) for d in dsteps)}, {sum(d != 0 for d in dsteps)} clusters differ"
        )


# ------------------------------------------------------------------------------ MD


def drift(total: np.ndarray, n_atoms: int) -> tuple[float, float]:
    """(E_end - E_0)/N and max |E(t) - E_0|/N, eV/atom."""
    return float((total[-1] - total[0]) / n_atoms), float(np.abs(total - total[0]).max() / n_atoms)


def md(args: argparse.Namespace, work: Path) -> None:
    import ase.io
    from ase.md.velocitydistribution import Stationary
    from ase.md.verlet import VelocityVerlet

    from cace_server.calculator import CACECalculator
    from cace_server.jobs.md import draw_velocities

    liquid = REFERENCE / "liquid-64.xyz"
    if args.md_molecules == 64 and liquid.exists():
        # equilibrated liquid water: random boxes have close contacts that make NVE drift
        start = ase.io.read(liquid)
        start.pbc = True
        boxes = [start.copy() for _ in range(args.md_boxes)]
        source = f"copies of {liquid.name} (equilibrated liquid)"
    else:
        boxes = water_boxes(args.md_boxes, args.md_molecules)
        source = "scripts/water_clusters.py boxes (unrelaxed: expect drift from close contacts)"
    rng = np.random.default_rng(args.seed)
    for atoms in boxes:  # each box its own velocities
        draw_velocities(atoms, 300, rng)
        Stationary(atoms)
    n = len(boxes[0])
    print(
        f"{len(boxes)} boxes of {args.md_molecules} water molecules ({n} atoms; {source}), "
        f"{args.md_steps} NVE steps of {args.timestep} fs from velocities drawn at 300 K, "
        f"{DTYPE[0]}, server: cace-server serve subprocess, {args.threads} torch thread(s)"
    )
    with serving(args.threads, work / "md-server.log") as server:
        body = {
            "kind": "md",
            "structures": [job_structure(a, velocities=True) for a in boxes],
            "md": {
                "integrator": "velocity_verlet",
                "timestep_fs": args.timestep,
                "steps": args.md_steps,
                "stride": 1,
                "frame_fields": [],
            },
        }
        before = batches(server.url)
        job_wall, results, status = run_job(server.url, body)
        job_batches = batches(server.url) - before

    import torch

    torch.set_num_threads(args.threads)
    calc = CACECalculator(MODEL, dtype=DTYPE[0])
    ase_drifts = []
    t0 = time.perf_counter()
    for atoms in boxes:
        atoms = atoms.copy()
        atoms.calc = calc
        energies: list[float] = []
        dyn = VelocityVerlet(atoms, timestep=args.timestep * units.fs, logfile=None)
        dyn.attach(lambda a=atoms, e=energies: e.append(a.get_total_energy()), interval=1)
        dyn.run(args.md_steps)  # the observer sees steps 0 to md_steps
        ase_drifts.append(drift(np.array(energies), len(atoms)))
    ase_wall = time.perf_counter() - t0

    job_drifts = []
    for r in results:
        total = np.array([f["energy"] + f["kinetic_energy"] for f in r["frames"]])
        job_drifts.append(drift(total, n))
    print()
    print(f"{'box':>4}{'job end':>14}{'job max':>12}{'ASE end':>14}{'ASE max':>12}  (eV/atom)")
    for k, (j, a) in enumerate(zip(job_drifts, ase_drifts, strict=True)):
        print(f"{k:>4}{j[0]:>14.2e}{j[1]:>12.2e}{a[0]:>14.2e}{a[1]:>12.2e}")
    mean_j = np.mean(job_drifts, axis=0)
    mean_a = np.mean(ase_drifts, axis=0)
    print(f"{'mean':>4}{mean_j[0]:>14.2e}{mean_j[1]:>12.2e}{mean_a[0]:>14.2e}{mean_a[1]:>12.2e}")
    print()
    print(f"{'case':<34}{'wall s':>10}{'model calls':>14}")
    print(f"{'job (one call per step)':<34}{job_wall:>10.2f}{status['model_calls']:>14}")
    ase_calls = len(boxes) * (args.md_steps + 1)
    print(f"{'ASE VelocityVerlet, in-process':<34}{ase_wall:>10.2f}{ase_calls:>14}")
    print(
        f"job: {status['model_calls']} model calls for {args.md_steps} steps (expected "
        f"{args.md_steps + 1}), {job_batches} engine batches"
    )


# ------------------------------------------------------------------------------ i-PI


def arrivals(run: Any, timeout: float) -> list[float]:
    """Wall-clock (Unix) times at which i-PI's property lines appeared, one per step."""
    path = run.workdir / "sim.out"
    times: list[float] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            lines = [ln for ln in path.read_text().splitlines() if ln and not ln.startswith("#")]
            times.extend([time.time()] * (len(lines) - len(times)))
        if run.proc.poll() is not None:
            break
        time.sleep(0.002)
    if run.proc.poll() is None:
        raise RuntimeError(f"i-PI did not finish in {timeout} s")
    if run.proc.returncode != 0:
        raise RuntimeError(f"i-PI failed:\n{run.log()}")
    return times


def ipi_case(
    args: argparse.Namespace, work: Path, name: str, job: bool, options: list[str]
) -> dict[str, Any]:
    """One i-PI run against a fresh server; with ``job``, a relax job runs meanwhile."""
    import ase.io

    from tests.ipi_support import IpiRun

    atoms = ase.io.read(REFERENCE / "liquid-64.xyz")
    atoms.pbc = True
    template = work / "template.extxyz"
    ase.io.write(template, atoms, format="extxyz")
    sockets = tempfile.mkdtemp(prefix="ipij", dir="/tmp")
    outputs = '<properties stride="1" filename="out" flush="1"> [ step ] </properties>'
    run = IpiRun(
        work / name, sockets, atoms, nbeads=args.beads, steps=args.ipi_steps, outputs=outputs
    )
    clusters = water_clusters(args.ipi_job_count) if job else []
    try:
        ipi = ["--ipi", f"unix:{run.socket_path}", "--ipi-clients", str(args.beads)]
        ipi += ["--ipi-template", str(template)]
        # The server waits for i-PI (retrying), which starts once the job runs.
        with serving(args.threads, work / f"{name}.log", *ipi, *options) as server:
            job_id = None
            with httpx.Client(base_url=server.url, timeout=600) as client:
                if job:
                    body = {
                        "kind": "relax",
                        "structures": [job_structure(a) for a in clusters],
                        "relax": {"fmax": 1e-4, "steps": 100_000},  # outlasts the i-PI run
                    }
                    job_id = submit(client, body)
                    while client.get(f"/v1/jobs/{job_id}").json()["model_calls"] < 2:
                        time.sleep(0.05)
                run.start()
                times = arrivals(run, timeout=1800)
                status = client.get(f"/v1/jobs/{job_id}").json() if job_id else None
                m = metrics(server.url)
                if job_id:
                    client.delete(f"/v1/jobs/{job_id}")
    finally:
        run.stop()
        shutil.rmtree(sockets, ignore_errors=True)
    if status is not None and status["state"] != "running":
        raise RuntimeError(f"the job ended before i-PI did ({status['state']}): more clusters")
    intervals = [b - a for a, b in itertools.pairwise(times)][2:]
    behind = {
        int(k.split('"')[1]): int(v)
        for k, v in m.items()
        if k.startswith("cace_engine_ipi_waited_behind_total{")
    }
    job_batches = int(m.get('cace_engine_lane_batches_total{lane="jobs"}', 0))
    return {
        "name": name,
        "step_s": statistics.median(intervals),
        "p90_s": float(np.percentile(intervals, 90)),
        "steps": len(intervals),
        "behind": behind,
        "job_batches": job_batches,
        "job_compute_s": m.get("cace_engine_compute_seconds_sum", 0.0)
        / max(m.get("cace_engine_compute_seconds_count", 1.0), 1.0),
        "model_calls": status["model_calls"] if status else 0,
    }


def with_ipi(args: argparse.Namespace, work: Path) -> None:
    print(
        f"i-PI NVT PIMD of liquid-64 (192 atoms), {args.beads} beads = {args.beads} UNIX "
        f"connections, {args.ipi_steps} steps; cace-server serve subprocess, {DTYPE[0]}, "
        f"{args.threads} torch thread(s); the job: relax {args.ipi_job_count} clusters"
    )
    cases = [ipi_case(args, work, "alone", False, [])]
    cases.append(ipi_case(args, work, "with job", True, []))
    for atoms in args.job_batch_atoms:
        cases.append(
            ipi_case(
                args, work, f"with job, batch {atoms}", True, ["--job-batch-atoms", str(atoms)]
            )
        )
    alone = cases[0]["step_s"]
    print()
    print(
        f"{'case':<26}{'ms/step':>9}{'p90 ms':>9}{'ratio':>7}{'steps':>7}{'job batches':>13}"
        f"{'batch ms (all)':>15}{'  i-PI batches by batches waited behind'}"
    )
    for c in cases:
        behind = ", ".join(f"{k}: {v}" for k, v in sorted(c["behind"].items()))
        print(
            f"{c['name']:<26}{c['step_s'] * 1e3:>9.1f}{c['p90_s'] * 1e3:>9.1f}"
            f"{c['step_s'] / alone:>7.2f}{c['steps']:>7}{c['job_batches']:>13}"
            f"{c['job_compute_s'] * 1e3:>15.1f}  {behind}"
        )
    print(
        "\nWhat bounds the slowdown: the i-PI lane goes first, so an i-PI step waits at most "
        "for the one batch already on the device when its beads arrive; between steps i-PI "
        "itself integrates, and the jobs lane takes the idle device then. While i-PI batches "
        "keep coming, a job iteration is held to about one i-PI batch's duration (at least "
        "job_batch_atoms/8 atoms), so a step costs at most about twice its own batch; "
        "--job-batch-atoms also bounds it.\n"
    )
    worst = max(max(c["behind"], default=0) for c in cases)
    verdict = "holds" if worst <= 1 else "VIOLATED"
    print(
        f"lane rule (at most one batch ahead of an i-PI step, one worker): {verdict}, worst {worst}"
    )


# ------------------------------------------------------------------------------ main


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--count", type=int, default=64, help="clusters to relax")
    parser.add_argument("--fmax", type=float, default=0.05)
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--optimizer", default="FIRE")
    parser.add_argument("--client-threads", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1, help="server torch threads")
    parser.add_argument("--dtype", default="float64", choices=["float64", "float32"])
    parser.add_argument("--md", action="store_true", help="the NVE comparison instead")
    parser.add_argument("--md-boxes", type=int, default=16)
    parser.add_argument("--md-molecules", type=int, default=64)
    parser.add_argument("--md-steps", type=int, default=200)
    parser.add_argument("--timestep", type=float, default=0.5, help="fs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--with-ipi", action="store_true", help="the i-PI lane share instead")
    parser.add_argument("--beads", type=int, default=4)
    parser.add_argument("--ipi-steps", type=int, default=30)
    parser.add_argument("--ipi-job-count", type=int, default=256)
    parser.add_argument(
        "--job-batch-atoms", type=int, action="append", default=[],
        help="also run with the job at this job_batch_atoms (repeatable)",
    )  # fmt: skip
    args = parser.parse_args()
    DTYPE[0] = args.dtype
    work = Path(tempfile.mkdtemp(prefix="cace-jobs-bench-"))
    try:
        if args.md:
            md(args, work)
        elif args.with_ipi:
            with_ipi(args, work)
        else:
            relax(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
