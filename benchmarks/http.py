"""HTTP API throughput and latency next to the model alone doing the same work.

A cace-server HTTP API (engine + FastAPI under uvicorn, in a subprocess) serves the
converted reference water model; an asyncio load generator (httpx, this process)
keeps C requests in flight and records each latency. For each system (a water
molecule, liquid-64 = 192 atoms, a 4x4x4 liquid-64 box = 12,288 atoms), body format
(JSON, msgpack with raw float64 arrays) and engine batching (default
``max_batch_atoms``, or 1 so that every structure runs alone) it prints
requests/s and p50/p99 latency at concurrency 1, 8 and 32, next to the model's own
time for the same work measured in this process afterwards (``predict`` of C
copies in one batch when batching, of one structure otherwise; neighbour list
included). The 12,288-atom box runs at concurrency 1 only (``--full`` for all).

    python benchmarks/http.py                    # float32, 2 torch threads
    python benchmarks/http.py --dtype float64 --full

``--contention``: 3-atom requests at concurrency 32 while a CPU hog (a busy-loop
subprocess that stops itself) takes one core, for the server's default torch threads,
``--torch-threads 1`` and torch's own default (one thread per core, OpenMP's
spin-waiting): req/s and p50/p99. ``--head-of-line``: p99 of 3-atom requests (at
concurrency 4) while bulk requests (``--bulk-atoms``, default 12,288) keep the engine
busy; ``--against REV`` also runs the server of a git worktree of REV, alternating.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

# This file is named after what it measures: its folder must leave sys.path before
# anything imports the standard library's ``http`` package.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
REPO = Path(__file__).resolve().parents[1]
# The server subprocess of ``--against REV`` imports cace_server from a worktree of REV.
sys.path.insert(0, os.environ.get("CACE_BENCH_REPO", str(REPO)))

import argparse  # noqa: E402
import asyncio  # noqa: E402
import json  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402

REFERENCE = Path(os.environ.get("CACE_REFERENCE_DIR", REPO.parent / "shared" / "reference"))
CONCURRENCY = (1, 8, 32)


# ------------------------------------------------------------------ server subprocess


def serve(args: argparse.Namespace) -> None:
    import uvicorn

    from cace_server.engine import Engine, EngineSettings
    from cace_server.http import HttpSettings, create_app

    settings = EngineSettings(
        dtype=args.dtype,
        # 0: what `cace-server serve` does without --torch-threads
        torch_threads=args.threads or server_default_threads(),
        max_batch_atoms=args.max_batch_atoms,
        max_batch_pairs=args.max_batch_pairs,
    )
    http = HttpSettings(max_atoms=250_000, request_timeout_s=900, access_log=False)
    with Engine({"water": args.model}, settings=settings) as engine:
        app = create_app(engine, settings=http)
        uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning", access_log=False)


def server_default_threads() -> int | None:
    try:
        from cace_server.engine.settings import default_torch_threads
    except ImportError:
        try:  # where revisions before the settings sections had it
            from cace_server.settings import default_torch_threads
        except ImportError:  # a revision before the default existed: torch's own
            return None
    return default_torch_threads("cpu")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    def __init__(
        self,
        model: Path,
        dtype: str,
        threads: int,
        batching: bool,
        *,
        repo: Path | None = None,
        env: dict[str, str | None] | None = None,
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [
            sys.executable, __file__, "--serve", "--model", str(model), "--dtype", dtype,
            "--threads", str(threads), "--port", str(self.port),
        ]  # fmt: skip
        if not batching:  # every structure is larger than the bounds: batches of one
            cmd += ["--max-batch-atoms", "1", "--max-batch-pairs", "1"]
        environ = dict(os.environ)
        for key, value in (env or {}).items():  # None: unset
            environ.pop(key, None)
            if value is not None:
                environ[key] = value
        if repo is not None:
            environ["CACE_BENCH_REPO"] = str(repo)
        self.proc = subprocess.Popen(cmd, start_new_session=True, env=environ)

    def wait_ready(self, timeout: float = 300.0) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("the server exited during start-up")
            try:
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
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


# ------------------------------------------------------------------ systems and bodies


def systems() -> dict[str, Any]:
    import ase.io
    from ase.build import molecule

    liquid = ase.io.read(REFERENCE / "liquid-64.xyz")
    liquid.pbc = True
    water = molecule("H2O")
    return {"H2O": water, "liquid-64": liquid, "liquid-64 x64": liquid.repeat((4, 4, 4))}


def body(atoms: Any, binary: bool) -> tuple[bytes, dict[str, str]]:
    import msgpack

    pos = np.ascontiguousarray(atoms.get_positions(), dtype="<f8")
    b: dict[str, Any] = {
        "numbers": atoms.numbers.tolist(),
        "positions": (
            {"shape": list(pos.shape), "dtype": "<f8", "data": pos.tobytes()}
            if binary
            else pos.tolist()
        ),
        "pbc": bool(atoms.pbc.all()),
        "properties": ["energy", "forces"] + (["stress"] if atoms.pbc.all() else []),
    }
    if atoms.pbc.any():
        b["cell"] = np.asarray(atoms.cell).tolist()
    if binary:
        kind = "application/msgpack"
        return msgpack.packb(b, use_bin_type=True), {"content-type": kind, "accept": kind}
    kind = "application/json"
    return json.dumps(b).encode(), {"content-type": kind, "accept": kind}


async def load(url: str, content: bytes, headers: dict[str, str], conc: int, total: int):
    import httpx
    import msgpack

    latencies: list[float] = []
    limits = httpx.Limits(max_connections=conc, max_keepalive_connections=conc)
    async with httpx.AsyncClient(base_url=url, timeout=900, limits=limits) as client:
        # one warm request per connection, not timed
        await asyncio.gather(
            *(client.post("/v1/calculate", content=content, headers=headers) for _ in range(conc))
        )
        left = total

        async def worker() -> None:
            nonlocal left
            while left > 0:
                left -= 1
                t0 = time.perf_counter()
                r = await client.post("/v1/calculate", content=content, headers=headers)
                if r.status_code != 200:
                    raise RuntimeError(f"{r.status_code}: {r.text[:300]}")
                # decode as a client would
                if headers["accept"] == "application/msgpack":
                    msgpack.unpackb(r.content)
                else:
                    json.loads(r.content)
                latencies.append(time.perf_counter() - t0)

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(conc)))
        wall = time.perf_counter() - t0
    return len(latencies) / wall, latencies


def model_times(model: Path, dtype: str, threads: int, cases: list[tuple[str, Any, int, bool]]):
    """Seconds per structure of the model alone, for (system, copies in one batch)."""
    import torch

    from cace_server.model import load_model
    from cace_server.structures import Structure

    torch.set_num_threads(threads)
    m = load_model(model, dtype=dtype)
    out: dict[tuple[str, int], float] = {}
    for name, atoms, copies, _ in cases:
        if (name, copies) in out:
            continue
        s = Structure.from_ase(atoms)
        m.predict([s] * copies)  # warm
        reps = max(1, min(5, int(2.0 / max(1e-3, _timed(m, [s] * copies)))))
        times = [_timed(m, [s] * copies) for _ in range(reps)]
        out[(name, copies)] = statistics.median(times) / copies
    return out


def _timed(m: Any, structures: list[Any]) -> float:
    t0 = time.perf_counter()
    m.predict(structures)
    return time.perf_counter() - t0


def requests_for(n_atoms: int, conc: int) -> int:
    if n_atoms < 50:
        return {1: 100, 8: 240, 32: 480}[conc]
    if n_atoms < 1000:
        return {1: 16, 8: 40, 32: 96}[conc]
    return {1: 3, 8: 8, 32: 32}[conc]


def main(args: argparse.Namespace) -> None:
    model = reference_model(args.dtype)
    mols = systems()
    rows: list[dict[str, Any]] = []
    for batching in (True, False):
        server = Server(model, args.dtype, args.threads, batching)
        try:
            server.wait_ready()
            for name, atoms in mols.items():
                big = len(atoms) > 1000
                if big and not batching:
                    continue  # a 12,288-atom structure runs alone either way
                for binary in (False, True):
                    for conc in CONCURRENCY:
                        if big and conc > 1 and not args.full:
                            continue
                        content, headers = body(atoms, binary)
                        total = requests_for(len(atoms), conc)
                        rps, lat = asyncio.run(load(server.url, content, headers, conc, total))
                        lat.sort()
                        row = {
                            "system": name, "atoms": len(atoms),
                            "format": "msgpack" if binary else "json",
                            "batching": "-" if big else ("on" if batching else "off"),
                            "conc": conc, "rps": rps,
                            "p50": 1e3 * lat[len(lat) // 2],
                            "p99": 1e3 * lat[min(len(lat) - 1, int(0.99 * len(lat)))],
                            "bytes": len(content), "n": len(lat),
                        }  # fmt: skip
                        rows.append(row)
                        print(json.dumps(row), file=sys.stderr, flush=True)
        finally:
            server.stop()

    cases = [
        (r["system"], mols[r["system"]], r["conc"] if r["batching"] == "on" else 1, True)
        for r in rows
    ]
    per = model_times(model, args.dtype, args.threads, cases)
    print()
    print(
        f"cace-server HTTP API, water CACE-LR model, {args.dtype}, {args.threads} torch threads, "
        "CPU; server and load generator share this machine's cores"
    )
    print()
    print(
        "| system | atoms | body | engine batching | concurrency | req/s | p50 ms | p99 ms "
        "| model-only req/s | model-only ms/structure | HTTP share of p50 |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        copies = r["conc"] if r["batching"] == "on" else 1
        t = per[(r["system"], copies)]
        # c=1: latency above the model's own time; otherwise throughput lost to HTTP
        share = f"{100 * (r['p50'] / 1e3 - t) / (r['p50'] / 1e3):.0f}%" if r["conc"] == 1 else "-"
        print(
            f"| {r['system']} | {r['atoms']} | {r['format']} ({r['bytes'] / 1e3:.0f} kB) | "
            f"{r['batching']} | {r['conc']} | {r['rps']:.1f} | {r['p50']:.1f} | {r['p99']:.1f} "
            f"| {1 / t:.1f} | {1e3 * t:.2f} | {share} |"
        )
    print()
    print(
        "model-only: the same structure(s) through model.predict in this process, C copies "
        "in one batch where the engine batches (C = concurrency), one otherwise."
    )


# ------------------------------------------------------------------ CPU contention


def cpu_hog(seconds: float) -> subprocess.Popen[bytes]:
    """One busy core for ``seconds`` (the process stops itself)."""
    code = f"import time\nend = time.monotonic() + {seconds}\nwhile time.monotonic() < end: pass"
    return subprocess.Popen([sys.executable, "-c", code])


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def contention(args: argparse.Namespace, model: Path) -> None:
    import torch

    from cace_server.engine.settings import default_torch_threads

    torch_default = torch.get_num_threads()
    water = systems()["H2O"]
    content, headers = body(water, binary=False)
    # OpenMP threads that wait at a barrier: libgomp's own policy (spin a while, then
    # sleep), or sleep at once (what a user sets for cores shared with other work)
    passive: dict[str, str | None] = {"OMP_WAIT_POLICY": "PASSIVE"}
    unset: dict[str, str | None] = {"OMP_WAIT_POLICY": None}
    configs = [
        (f"server default ({default_torch_threads('cpu')})", 0, unset),
        (f"{torch_default} (torch default)", torch_default, unset),
        (f"{torch_default}, OMP_WAIT_POLICY=PASSIVE", torch_default, passive),
    ]
    rows = []
    for hog in (False, True):
        for label, flag, env in configs:
            server = Server(model, args.dtype, flag, True, env=env)
            try:
                server.wait_ready()
                hog_proc = cpu_hog(600) if hog else None
                try:
                    rps, lat = asyncio.run(load(server.url, content, headers, 32, args.requests))
                finally:
                    if hog_proc is not None:
                        hog_proc.kill()
                        hog_proc.wait()
            finally:
                server.stop()
            row = {
                "threads": label,
                "hog": hog,
                "rps": rps,
                "p50": 1e3 * percentile(lat, 0.5),
                "p99": 1e3 * percentile(lat, 0.99),
            }
            print(json.dumps(row), file=sys.stderr, flush=True)
            rows.append(row)
    print()
    print(
        f"3-atom water, JSON, concurrency 32, {args.requests} requests, {args.dtype}, CPU "
        f"({os.cpu_count()} cores); hog: one busy-loop process"
    )
    print()
    print("| torch threads | CPU hog | req/s | p50 ms | p99 ms |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['threads']} | {'yes' if r['hog'] else 'no'} | {r['rps']:.1f} | "
            f"{r['p50']:.1f} | {r['p99']:.1f} |"
        )


# ------------------------------------------------------------------ head-of-line blocking


async def small_while_bulk(
    url: str,
    bulk: tuple[bytes, dict[str, str]],
    n_bulk: int,
    small: tuple[bytes, dict[str, str]],
    n_small: int,
) -> dict[str, Any]:
    """``n_bulk`` bulk requests in flight all along; ``n_small`` 3-atom requests at c=4."""
    import httpx

    latencies: list[float] = []
    bulk_done = 0
    stop = asyncio.Event()
    limits = httpx.Limits(max_connections=n_bulk + 8)
    async with httpx.AsyncClient(base_url=url, timeout=1800, limits=limits) as client:

        async def bulk_worker() -> None:
            nonlocal bulk_done
            while not stop.is_set():
                r = await client.post("/v1/calculate", content=bulk[0], headers=bulk[1])
                if r.status_code != 200:
                    raise RuntimeError(f"bulk: {r.status_code}: {r.text[:300]}")
                bulk_done += 1

        bulk_tasks = [asyncio.create_task(bulk_worker()) for _ in range(n_bulk)]
        await asyncio.sleep(2.0)  # the bulk requests are queued and computing
        left = n_small

        async def small_worker() -> None:
            nonlocal left
            while left > 0:
                left -= 1
                t0 = time.perf_counter()
                r = await client.post("/v1/calculate", content=small[0], headers=small[1])
                if r.status_code != 200:
                    raise RuntimeError(f"small: {r.status_code}: {r.text[:300]}")
                latencies.append(time.perf_counter() - t0)

        t0 = time.perf_counter()
        await asyncio.gather(*(small_worker() for _ in range(4)))
        wall = time.perf_counter() - t0
        stop.set()
        for task in bulk_tasks:
            task.cancel()
        await asyncio.gather(*bulk_tasks, return_exceptions=True)
    return {
        "p50": 1e3 * percentile(latencies, 0.5),
        "p99": 1e3 * percentile(latencies, 0.99),
        "max": 1e3 * max(latencies),
        "wall": wall,
        "bulk_done": bulk_done,
    }


def bulk_system(n_atoms: int) -> Any:
    liquid = systems()["liquid-64"]
    reps = max(1, round((n_atoms / len(liquid)) ** (1 / 3)))
    return liquid.repeat((reps, reps, reps))


def head_of_line(args: argparse.Namespace, model: Path) -> None:
    bulk_atoms = bulk_system(args.bulk_atoms)
    bulk = body(bulk_atoms, binary=True)
    small = body(systems()["H2O"], binary=False)
    trees: list[tuple[str, Path | None]] = [("this tree", None)]
    worktree = None
    if args.against:
        worktree = Path(tempfile.mkdtemp(prefix="cace-http-against-"))
        subprocess.run(
            ["git", "-C", str(REPO), "worktree", "add", "--detach", str(worktree), args.against],
            check=True,
            capture_output=True,
        )
        trees.append((args.against, worktree))
        model = model_of(worktree, args.dtype)  # both trees read what the older one writes
    rows = []
    try:
        for rep in range(args.repeats):
            for label, repo in trees:
                server = Server(model, args.dtype, args.threads, True, repo=repo)
                try:
                    server.wait_ready()
                    out = asyncio.run(
                        small_while_bulk(server.url, bulk, args.bulk_requests, small, args.requests)
                    )
                finally:
                    server.stop()
                out.update(tree=label, rep=rep)
                print(json.dumps(out), file=sys.stderr, flush=True)
                rows.append(out)
    finally:
        if worktree is not None:
            subprocess.run(
                ["git", "-C", str(REPO), "worktree", "remove", "--force", str(worktree)],
                check=False,
            )
    print()
    print(
        f"3-atom requests (JSON, concurrency 4, {args.requests} of them) while "
        f"{args.bulk_requests} requests of {len(bulk_atoms)} atoms (msgpack) are in flight "
        f"all along; {args.dtype}, {args.threads} torch threads, CPU ({os.cpu_count()} cores)"
    )
    print()
    print("| server | run | small p50 ms | small p99 ms | small max ms | bulk done |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['tree']} | {r['rep'] + 1} | {r['p50']:.1f} | {r['p99']:.1f} | "
            f"{r['max']:.1f} | {r['bulk_done']} |"
        )


def model_of(repo: Path, dtype: str) -> Path:
    """The reference model converted by the cace_server of ``repo``: an older
    revision cannot read the files (format, config fields) of a newer one; the newer
    one reads older files."""
    out = Path(tempfile.mkdtemp(prefix="cace-http-bench-")) / "water.safetensors"
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); "
        "from cace_server.model import convert_original, save_model; "
        "save_model(convert_original(sys.argv[2], dtype=sys.argv[3]), sys.argv[4])"
    )
    ref = str(REFERENCE / "best_model.pth")
    subprocess.run([sys.executable, "-c", code, str(repo), ref, dtype, str(out)], check=True)
    return out


def reference_model(dtype: str) -> Path:
    from cace_server.model import convert_original, save_model

    tmp = Path(tempfile.mkdtemp(prefix="cace-http-bench-"))
    return save_model(
        convert_original(REFERENCE / "best_model.pth", dtype=dtype), tmp / "water.safetensors"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--full", action="store_true", help="12,288 atoms at every concurrency")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--max-batch-atoms", type=int, default=8192, help=argparse.SUPPRESS)
    parser.add_argument("--max-batch-pairs", type=int, default=600_000, help=argparse.SUPPRESS)
    parser.add_argument("--contention", action="store_true", help="the CPU-hog case")
    parser.add_argument("--head-of-line", action="store_true", help="small behind bulk")
    parser.add_argument("--requests", type=int, default=400, help="small requests per case")
    parser.add_argument("--bulk-atoms", type=int, default=12_288)
    parser.add_argument("--bulk-requests", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--against", help="git revision whose server runs too (head-of-line)")
    args = parser.parse_args()
    if args.serve:
        serve(args)
    elif args.contention:
        contention(args, reference_model(args.dtype))
    elif args.head_of_line:
        head_of_line(args, reference_model(args.dtype))
    else:
        main(args)
