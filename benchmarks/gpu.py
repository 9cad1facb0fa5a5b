"""GPU figures in one table: the model, PIMD through i-PI in each transport, HTTP.

Run by ``benchmarks/gpu.sh`` on a CUDA node (float32, the reference LR water
model): ms per energy+forces+stress call and peak device memory for liquid water
from 192 to 98,304 atoms; ms per i-PI PIMD step for 8 and 32 beads over one
connection per bead, the batched transport and shm; the HTTP time of one request
next to the model time of the same structure.

    python benchmarks/gpu.py [--device cuda:0] [--steps 10]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(REPO))
REFERENCE = Path(os.environ.get("CACE_REFERENCE_DIR", REPO.parent / "shared" / "reference"))


def _ipi_benchmark() -> Any:
    """benchmarks/ipi.py under another name (``ipi`` is the i-PI package)."""
    spec = importlib.util.spec_from_file_location("cace_ipi_benchmark", REPO / "benchmarks/ipi.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def timed(fn: Any, device: str, calls: int) -> float:
    import torch

    times = []
    for _ in range(calls):
        torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def model_rows(model_path: str, device: str, atoms: Any) -> list[tuple[str, str, float, str]]:
    import torch

    from cace_server.model import load_model
    from cace_server.structures import Structure

    rows = []
    model = load_model(model_path, device=device, dtype="float32")
    for repeat in (1, 2, 4, 8):
        structure = Structure.from_ase(atoms.repeat((repeat, repeat, repeat)))
        torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        model.predict([structure])
        first = time.perf_counter() - t0
        calls = 10 if repeat <= 2 else 3
        seconds = timed(lambda s=structure: model.predict([s]), device, calls)
        prepared = model.prepare(structure)
        nl = timed(lambda s=structure: model.prepare(s), device, calls)
        warm = timed(lambda p=prepared: model.predict([p]), device, calls)
        peak = torch.cuda.max_memory_allocated(device) / 1e9
        rows.append(
            (
                "model",
                f"{len(structure):,} atoms",
                seconds * 1e3,
                f"list {nl * 1e3:.1f} ms, model {warm * 1e3:.1f} ms, first {first * 1e3:.0f} ms, "
                f"peak {peak:.2f} GB",
            )
        )
        print(f"done model {len(structure)} atoms", file=sys.stderr, flush=True)
    beads = [Structure.from_ase(atoms) for _ in range(32)]
    seconds = timed(lambda: model.predict(beads), device, 10)
    rows.append(("model", "32 x 192 atoms, one batch", seconds * 1e3, "the PIMD floor"))
    return rows


def pimd_rows(
    model_path: str, device: str, atoms: Any, steps: int
) -> list[tuple[str, str, float, str]]:
    bench = _ipi_benchmark()
    work = Path(tempfile.mkdtemp(prefix="cace-gpu-bench-"))
    template = work / "template.extxyz"
    atoms.write(template, format="extxyz")
    rows = []
    for beads in (8, 32):
        for mode, (ipi_mode, batch, clients, scheme) in {
            "connections": ("unix", 1, beads, "unix"),
            "batched": ("unix", beads, 1, "unix"),
            "shm": ("shm", beads, 1, "shm"),
        }.items():
            command = bench.server_command(
                model_path, "float32", template, clients, 4, scheme, device=device
            )
            seconds = bench.run_case(
                work / f"{beads}-{mode}", atoms, beads, steps, ipi_mode, batch, [command]
            )
            rows.append(("i-PI PIMD step", f"{beads} beads, {mode}", seconds * 1e3, ""))
            print(f"done PIMD {beads} {mode}", file=sys.stderr, flush=True)
    return rows


def http_rows(model_path: str, device: str, atoms: Any) -> list[tuple[str, str, float, str]]:
    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "cace_server.cli", "serve", "--model", model_path,
         "--device", device, "--dtype", "float32", "--port", str(port), "--log-level", "warning",
         "--max-atoms", "20000"],
        env=dict(os.environ, PYTHONPATH=str(REPO)),
    )  # fmt: skip
    rows = []
    try:
        url = f"http://127.0.0.1:{port}"
        with httpx.Client(base_url=url, timeout=120) as client:
            deadline = time.monotonic() + 180
            while True:
                try:
                    if client.get("/readyz").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline or server.poll() is not None:
                    raise RuntimeError("the HTTP server did not become ready")
                time.sleep(0.2)
            for repeat in (1, 4):
                big = atoms.repeat((repeat, repeat, repeat))
                body = {
                    "numbers": big.numbers.tolist(),
                    "positions": big.positions.tolist(),
                    "cell": big.cell.tolist(),
                    "pbc": [True] * 3,
                }
                client.post("/v1/calculate", json=body).raise_for_status()
                times = []
                for _ in range(10 if repeat == 1 else 3):
                    t0 = time.perf_counter()
                    client.post("/v1/calculate", json=body).raise_for_status()
                    times.append(time.perf_counter() - t0)
                ms = statistics.median(times) * 1e3
                rows.append(("HTTP JSON request", f"{len(big):,} atoms", ms, "whole round trip"))
    finally:
        server.terminate()
        server.wait(30)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()

    import ase.io
    import torch

    if not torch.cuda.is_available():
        sys.exit("benchmarks/gpu.py: error: no CUDA device")
    from cace_server.model import convert_original, save_model

    atoms = ase.io.read(REFERENCE / "liquid-64.xyz")
    atoms.pbc = True
    work = Path(tempfile.mkdtemp(prefix="cace-gpu-model-"))
    model_path = str(
        save_model(convert_original(REFERENCE / "best_model.pth"), work / "w.safetensors")
    )
    rows = model_rows(model_path, args.device, atoms)
    rows += pimd_rows(model_path, args.device, atoms, args.steps)
    rows += http_rows(model_path, args.device, atoms)

    name = torch.cuda.get_device_name(args.device)
    print(f"\nreference LR water model, float32, {name}, torch {torch.__version__}\n")
    print("| part | case | ms | notes |")
    print("|---|---|---|---|")
    for part, case, ms, notes in rows:
        print(f"| {part} | {case} | {ms:.1f} | {notes} |")


if __name__ == "__main__":
    main()
