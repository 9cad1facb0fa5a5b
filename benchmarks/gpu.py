"""GPU figures in one table: the model, PIMD through i-PI in each transport, HTTP.

Run by ``benchmarks/gpu.sh`` on a CUDA node (float32, the reference LR water
model): ms per energy+forces+stress call and peak device memory for liquid water
from 192 to 98,304 atoms; ms per i-PI PIMD step for 8 and 32 beads over one
connection per bead, the batched transport and shm; the HTTP time of one request
next to the model time of the same structure.

Beside the eager rows, compiled rows in reduce-overhead mode (Inductor's Triton
kernels replayed as CUDA graphs, ``compile_model(model, "reduce-overhead")``): the
model from 192 to 12,288 atoms and the 32-bead batch, each with its first call (the
compile) and its largest force difference from the eager model; PIMD over the
batched transport with a server started with ``--compile reduce-overhead`` and the
run's structure compiled during warm-up. One Inductor cache (TORCHINDUCTOR_CACHE_DIR,
a fresh folder) serves this process and the servers. ``--no-compile`` leaves them out.

    python benchmarks/gpu.py [--device cuda:0] [--steps 10] [--no-compile]
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


COMPILED = "model, compiled (reduce-overhead)"


def compiled_model_rows(
    model_path: str, device: str, atoms: Any
) -> list[tuple[str, str, float, str]]:
    """The model compiled in reduce-overhead mode: ms per call, the first call (which
    compiles), and the largest |dF| from the eager model on the same structure."""
    import numpy as np
    import torch

    from cace_server.model import load_model
    from cace_server.model.compiled import compile_model, total_stats
    from cace_server.structures import Structure

    eager = load_model(model_path, device=device, dtype="float32")
    model = load_model(model_path, device=device, dtype="float32")
    calls = compile_model(model, "reduce-overhead")
    # (case, structures, timed calls)
    cases = [
        (f"{192 * r**3:,} atoms", [Structure.from_ase(atoms.repeat((r, r, r)))], n)
        for r, n in ((1, 10), (2, 10), (4, 3))
    ]
    cases.append(("32 x 192 atoms, one batch", [Structure.from_ase(atoms) for _ in range(32)], 10))
    rows = []
    for case, structures, n in cases:
        compiles = total_stats(calls).compiles
        torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        got = model.predict(structures)
        torch.cuda.synchronize(device)
        first = time.perf_counter() - t0
        want = eager.predict(structures)
        df = max(float(np.max(np.abs(g.forces - w.forces))) for g, w in zip(got, want, strict=True))
        seconds = timed(lambda s=structures: model.predict(s), device, n)
        stats = total_stats(calls)
        notes = (
            f"first {first * 1e3:.0f} ms ({stats.compiles - compiles} compiles), "
            f"max abs dF vs eager {df:.1e} eV/A"
        )
        if stats.fallbacks:
            notes += f", {stats.fallbacks} shapes served eagerly"
        rows.append((COMPILED, case, seconds * 1e3, notes))
        print(f"done compiled model {case}", file=sys.stderr, flush=True)
    return rows


def pimd_rows(
    model_path: str, device: str, atoms: Any, steps: int, compile_cache: Path | None
) -> list[tuple[str, str, float, str]]:
    """Eager: each transport; with ``compile_cache``, also the batched transport
    served compiled (reduce-overhead, the run's beads compiled during warm-up)."""
    bench = _ipi_benchmark()
    work = Path(tempfile.mkdtemp(prefix="cace-gpu-bench-"))
    template = work / "template.extxyz"
    atoms.write(template, format="extxyz")
    rows = []
    for beads in (8, 32):
        modes = {
            "connections": ("unix", 1, beads, "unix"),
            "batched": ("unix", beads, 1, "unix"),
            "shm": ("shm", beads, 1, "shm"),
        }
        if compile_cache is not None:
            modes["batched, compiled (reduce-overhead)"] = ("unix", beads, 1, "unix")
        for mode, (ipi_mode, batch, clients, scheme) in modes.items():
            flags = []
            if "compiled" in mode:
                flags = bench.compile_flags(compile_cache, template, beads, "reduce-overhead")
            command = bench.server_command(
                model_path, "float32", template, clients, 4, scheme, device=device, compile=flags
            )
            seconds = bench.run_case(
                work / f"{beads}-{mode.split(',')[0]}{'-compiled' if flags else ''}",
                atoms,
                beads,
                steps,
                ipi_mode,
                batch,
                [command],
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
    parser.add_argument(
        "--no-compile", action="store_true", help="eager rows only (no compiled model or server)"
    )
    args = parser.parse_args()
    compile_cache = None
    if not args.no_compile:
        compile_cache = Path(tempfile.mkdtemp(prefix="cace-gpu-inductor-"))
        # this process's compiles; the servers are given it with --compile-cache-dir
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(compile_cache)

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
    if compile_cache is not None:
        rows += compiled_model_rows(model_path, args.device, atoms)
    rows += pimd_rows(model_path, args.device, atoms, args.steps, compile_cache)
    rows += http_rows(model_path, args.device, atoms)

    name = torch.cuda.get_device_name(args.device)
    print(f"\nreference LR water model, float32, {name}, torch {torch.__version__}\n")
    print("| part | case | ms | notes |")
    print("|---|---|---|---|")
    for part, case, ms, notes in rows:
        print(f"| {part} | {case} | {ms:.1f} | {notes} |")


if __name__ == "__main__":
    main()
