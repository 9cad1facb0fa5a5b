"""Requests per second of 192-atom structures through Ray Serve with 1 and 2 replicas.

A local Ray cluster of two nodes on this machine (``cace_server.ray_serve.local_fleet``,
one CPU each) serves the app with 1, then 2 replicas of 1 torch thread each; next to
it, one plain ``cace-server serve`` with 2 torch threads (a subprocess, while the Ray
cluster is down). Each is loaded with liquid water of 64 molecules (192 atoms,
``clients/lammps/water64.data``, 16 rattled copies in turn) by an AsyncCACEClient
keeping ``--concurrency`` requests in flight for ``--seconds`` after a warm-up;
prints req/s, p50/p99 latency, the 2-replica/1-replica scaling ratio and how the
requests spread over the replicas (their counters as Ray exports them). Needs the
extra: ``pip install 'cace-server[ray]'``.

    python benchmarks/scale.py
    python benchmarks/scale.py --seconds 30 --dtype float64
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

# benchmarks/http.py would shadow the standard library's http package.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "clients"))
DATA = REPO / "clients" / "lammps" / "water64.data"
# The Ray workers and the server subprocess import this tree's cace_server too.
os.environ["PYTHONPATH"] = os.pathsep.join(
    [str(REPO), str(REPO / "clients"), *filter(None, [os.environ.get("PYTHONPATH")])]
)

import httpx  # noqa: E402
import numpy as np  # noqa: E402
from cace_client import AsyncCACEClient  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def load(url: str, images: list[Any], concurrency: int, seconds: float, warmup: float):
    """(requests/s, p50 s, p99 s) of ``concurrency`` clients sending one image at a time."""
    latencies: list[float] = []
    start = time.monotonic()
    measure_from, end = start + warmup, start + warmup + seconds
    async with AsyncCACEClient(url, max_connections=concurrency, timeout=300) as client:

        async def worker(k: int) -> None:
            i = k
            while time.monotonic() < end:
                t0 = time.monotonic()
                await client.calculate(images[i % len(images)])
                t1 = time.monotonic()
                if t0 >= measure_from and t1 <= end:
                    latencies.append(t1 - t0)
                i += concurrency

        await asyncio.gather(*(worker(k) for k in range(concurrency)))
    latencies.sort()
    p99 = latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))]
    return len(latencies) / seconds, statistics.median(latencies), p99


def water64(count: int) -> list[Any]:
    """``count`` copies of liquid water (64 molecules), each rattled differently."""
    import ase.io

    liquid = ase.io.read(DATA, format="lammps-data", atom_style="atomic")
    liquid.set_atomic_numbers(np.where(liquid.get_masses() > 10, 8, 1))
    liquid.pbc = True
    images = []
    for seed in range(count):
        atoms = liquid.copy()
        atoms.rattle(0.02, seed=seed)
        images.append(atoms)
    return images


def wait_ready(url: str, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/readyz", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} not ready after {timeout} s")


def plain_server(args: argparse.Namespace, images: list[Any]) -> tuple[float, float, float]:
    port = free_port()
    command = [
        sys.executable,
        "-c",
        "from cace_server.cli import main; main()",
        "serve",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--torch-threads",
        "2",
        "--dtype",
        args.dtype,
        "--log-level",
        "warning",
    ]
    process = subprocess.Popen(command)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_ready(url)
        return asyncio.run(load(url, images, args.concurrency, args.seconds, args.warmup))
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def ray_fleet(args: argparse.Namespace, images: list[Any]) -> dict[int, Any]:
    from ray import serve

    from cace_server.ray_serve import app_builder, local_fleet

    out: dict[int, Any] = {}
    base = {"torch_threads": 1, "dtype": args.dtype, "metrics_interval_s": 1}
    with local_fleet({**base, "num_replicas": 1}, nodes=2, cpus_per_node=1) as fleet:
        for replicas in (1, 2):
            if replicas > 1:
                serve.run(app_builder({**base, "num_replicas": replicas}), name="cace")
            wait_ready(fleet.url)
            time.sleep(3.0)  # earlier work exported
            before = fleet.per_replica("cace_engine_structures_total")
            rate = asyncio.run(load(fleet.url, images, args.concurrency, args.seconds, args.warmup))
            time.sleep(3.0)
            after = fleet.per_replica("cace_engine_structures_total")
            spread = sorted(
                (int(v - before.get(r, 0.0)) for r, v in after.items() if v > before.get(r, 0.0)),
                reverse=True,
            )
            out[replicas] = (*rate, spread)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--warmup", type=float, default=5.0)
    parser.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    args = parser.parse_args()
    images = water64(16)

    fleet = ray_fleet(args, images)
    plain = plain_server(args, images)
    print(
        f"\n192-atom water boxes, concurrency {args.concurrency}, {args.seconds:g} s each, "
        f"{args.dtype}, {os.cpu_count()} cores"
    )
    print(f"{'server':<34} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8}  requests per replica")
    rows = [
        ("Ray Serve, 1 replica x 1 thread", fleet[1]),
        ("Ray Serve, 2 replicas x 1 thread", fleet[2]),
        ("cace-server serve, 2 threads", (*plain, [])),
    ]
    for name, (rps, p50, p99, spread) in rows:
        shown = ", ".join(str(n) for n in spread)
        print(f"{name:<34} {rps:8.1f} {p50 * 1e3:8.0f} {p99 * 1e3:8.0f}  {shown}")
    print(f"scaling, 2 replicas / 1 replica: {fleet[2][0] / fleet[1][0]:.2f}x")
    print(f"Ray 2 replicas / plain server:    {fleet[2][0] / plain[0]:.2f}x")


if __name__ == "__main__":
    main()
