"""Wall time per path-integral MD step: i-PI driving cace-server, in each transport.

For liquid-64 water (192 atoms) with N beads, i-PI runs NVT PIMD against:

  serial       cace-server, 1 classic connection: beads evaluated one by one
  connections  cace-server, N classic connections, batched across them by the engine
  batched      cace-server, 1 connection with i-PI's batched transport (batch_size N)
  shm          cace-server, batched transport with the shared-memory payload
  py-driver    i-pi-py_driver -m custom with a PES file calling our model per structure
               (what a user has without this server), 1 connection

next to the model evaluating the same N structures directly in one batch (the
floor) and i-PI's own null driver (i-pi-py_driver -m gas) in the same transport
(the protocol floor). Time per step is the median interval between i-PI's
property lines after the first two steps.

    python benchmarks/ipi.py                           # 8 and 32 beads, float32 and float64
    python benchmarks/ipi.py --beads 8 --dtypes float32 --steps 10
    python benchmarks/ipi.py --against 19a9087         # this tree vs a revision, float32

With ``--against REV`` the revision is checked out in a temporary git worktree under
/tmp, and for every bead count and transport of cace-server (serial, connections,
batched, shm) fresh server processes of REV and of this tree are run in turn
(``--repeats`` times each, alternating), against the same i-PI input; the table gives
each side's median ms per step and the ratio (below 1: this tree is faster).

With ``--compile`` this tree's server runs its model compiled (``--compile on``),
compiling the run's structure, as many copies as i-PI sends in one request (the
bead count; one in serial mode), during warm-up (``--compile-warmup``), before it
connects, so no step pays a compile; all servers share one Inductor cache
(``--compile-cache-dir``), so only the first compiles a shape. The model floor is
compiled too. The revision of ``--against`` is run eagerly (it may predate those
flags).

    python benchmarks/ipi.py --compile --beads 8,32 --dtypes float32 --modes batched
    python benchmarks/ipi.py --against ed084ff --compile --modes batched
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# This file is named after what it measures; its folder must not be on sys.path or
# it would shadow the ``ipi`` package it drives.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(REPO))

from tests.ipi_support import IpiRun  # noqa: E402

REFERENCE = Path(os.environ.get("CACE_REFERENCE_DIR", REPO.parent / "shared" / "reference"))
BIN = Path(sys.executable).parent
LIGHT_OUTPUTS = """
    <properties stride="1" filename="out" flush="1"> [ step, potential{electronvolt} ] </properties>
"""


def step_times(run: IpiRun, proc_timeout: float) -> list[float]:
    """Arrival times of i-PI's property lines (one per step), polled while it runs."""
    path = run.workdir / "sim.out"
    times: list[float] = []
    seen = 0
    deadline = time.monotonic() + proc_timeout
    assert run.proc is not None
    while time.monotonic() < deadline:
        if path.exists():
            lines = [ln for ln in path.read_text().splitlines() if ln and not ln.startswith("#")]
            now = time.monotonic()
            times.extend([now] * (len(lines) - seen))
            seen = len(lines)
        if run.proc.poll() is not None:
            break
        time.sleep(0.002)
    if run.proc.poll() is None:
        run.stop()
        raise RuntimeError(f"i-PI did not finish in {proc_timeout} s")
    if run.proc.returncode != 0:
        raise RuntimeError(f"i-PI failed:\n{run.log()}")
    return times


def per_step(times: list[float]) -> float:
    intervals = [b - a for a, b in itertools.pairwise(times)][2:]
    return statistics.median(intervals)


def run_case(
    workdir: Path,
    atoms,
    beads: int,
    steps: int,
    mode: str,
    batch: int,
    clients: list[list[str]],
    pythonpath: Path = REPO,
) -> float:
    sockets = tempfile.mkdtemp(prefix="ipib", dir="/tmp")
    run = IpiRun(
        workdir,
        sockets,
        atoms,
        mode=mode,
        batch_size=batch,
        nbeads=beads,
        steps=steps,
        outputs=LIGHT_OUTPUTS,
    )
    procs: list[subprocess.Popen[bytes]] = []
    try:
        run.start()
        run.wait_for_socket()
        env = dict(os.environ, OMP_NUM_THREADS="2", PYTHONPATH=str(pythonpath))
        for cmd in clients:
            cmd = [
                c.replace("{socket}", run.socket_path).replace("{prefix}", run.prefix) for c in cmd
            ]
            procs.append(
                subprocess.Popen(
                    cmd,
                    env=env,
                    # not the repository: ``python -m`` puts the working directory first
                    # on sys.path, ahead of PYTHONPATH, and would import this tree's code
                    cwd=workdir,
                    stdout=subprocess.DEVNULL,
                    stderr=open(workdir / f"client{len(procs)}.log", "wb"),  # noqa: SIM115
                )
            )
        return per_step(step_times(run, proc_timeout=900))
    finally:
        run.stop()
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.wait(20)
            if p.poll() is None:
                p.kill()
        shutil.rmtree(sockets, ignore_errors=True)


def model_floor(
    model_path: str, dtype: str, atoms, beads: int, threads: int, compile: bool = False
) -> float:
    import numpy as np
    import torch

    from cace_server.model import load_model
    from cace_server.structures import Structure

    torch.set_num_threads(threads)
    model = load_model(model_path, dtype=dtype, **({"compile": True} if compile else {}))
    rng = np.random.default_rng(0)
    structures = [
        Structure.create(
            atoms.numbers,
            atoms.positions + rng.normal(0, 0.05, atoms.positions.shape),
            atoms.cell,
            True,
        )
        for _ in range(beads)
    ]
    model.predict(structures)  # warm-up; compiled, this compiles
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        model.predict(structures)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model", help="native model file (default: converted reference water model)"
    )
    parser.add_argument("--beads", default="8,32")
    parser.add_argument("--dtypes", default="float32,float64")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--modes", default="serial,connections,batched,shm,py-driver")
    parser.add_argument("--against", metavar="REV", help="compare with a git revision")
    parser.add_argument("--repeats", type=int, default=2, help="runs per side with --against")
    parser.add_argument(
        "--compile",
        action="store_true",
        help="this tree's servers compile the model (warm-up of the run's structure)",
    )
    args = parser.parse_args()
    if args.against:
        against(args)
        return

    import ase.io

    atoms = ase.io.read(REFERENCE / "liquid-64.xyz")
    atoms.pbc = True
    work = Path(tempfile.mkdtemp(prefix="cace-ipi-bench-"))
    model_path = args.model
    if model_path is None:
        from cace_server.model import convert_original, save_model

        model_path = str(
            save_model(convert_original(REFERENCE / "best_model.pth"), work / "water.safetensors")
        )
    template = work / "template.extxyz"
    ase.io.write(template, atoms, format="extxyz")
    compile_cache = _compile_cache(args, work)
    modes = args.modes.split(",")
    rows = []
    try:
        for beads in (int(b) for b in args.beads.split(",")):
            for dtype in args.dtypes.split(","):
                floor = model_floor(model_path, dtype, atoms, beads, args.threads, args.compile)

                def ours(
                    clients: int,
                    wait_ms: float,
                    scheme: str = "unix",
                    model_path: str = model_path,
                    dtype: str = dtype,
                    structures: int = beads,
                ) -> list[str]:
                    return [
                        str(BIN / "cace-server"),
                        "serve",
                        "--no-http",
                        "--model",
                        model_path,
                        "--dtype",
                        dtype,
                        "--ipi",
                        scheme + ":{socket}",
                        "--ipi-clients",
                        str(clients),
                        "--ipi-template",
                        str(template),
                        "--torch-threads",
                        str(args.threads),
                        "--batch-wait-ms",
                        str(wait_ms),
                        "--log-level",
                        "warning",
                        *compile_flags(compile_cache, template, structures),
                    ]

                def gas(extra: list[str]) -> list[str]:
                    return [
                        str(BIN / "i-pi-py_driver"),
                        "-m",
                        "gas",
                        "-u",
                        "-a",
                        "cace",
                        "-S",
                        "{prefix}",
                        *extra,
                    ]

                cases = {
                    # (i-PI socket mode, batch size, our clients, null-driver clients)
                    "serial": ("unix", 1, [ours(1, 0.0, structures=1)], [gas([])]),
                    "connections": ("unix", 1, [ours(beads, 5.0)], [gas([]) for _ in range(beads)]),
                    "batched": ("unix", beads, [ours(1, 0.0)], [gas([])]),
                    "shm": ("shm", beads, [ours(1, 0.0, "shm")], [gas(["--shm"])]),
                    "py-driver": (
                        "unix",
                        1,
                        [
                            [
                                str(BIN / "i-pi-py_driver"),
                                "-m",
                                "custom",
                                "-P",
                                str(REPO / "benchmarks" / "ipi_cace_pes.py"),
                                "-u",
                                "-a",
                                "cace",
                                "-S",
                                "{prefix}",
                                "-o",
                                f"model={model_path},template={template},dtype={dtype},threads={args.threads}",
                            ]
                        ],
                        [gas([])],
                    ),
                }
                for mode in modes:
                    ipi_mode, batch, clients, nulls = cases[mode]
                    tag = f"{beads}-{dtype}-{mode}"
                    ours_s = run_case(
                        work / f"{tag}-ours", atoms, beads, args.steps, ipi_mode, batch, clients
                    )
                    null_s = run_case(
                        work / f"{tag}-null", atoms, beads, args.steps, ipi_mode, batch, nulls
                    )
                    rows.append((beads, dtype, mode, ours_s, null_s, floor))
                    print(f"done {tag}: {ours_s * 1e3:.0f} ms/step", file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(
        f"\ni-PI NVT PIMD of liquid-64 water (192 atoms), {args.threads} threads, "
        f"{args.steps} steps{', compiled' if args.compile else ''}\n"
    )
    print(
        "| beads | dtype | mode | ms/step | null driver ms/step | model floor ms | step / floor |"
    )
    print("|---|---|---|---|---|---|---|")
    for beads, dtype, mode, ours_s, null_s, floor in rows:
        print(
            f"| {beads} | {dtype} | {mode} | {ours_s * 1e3:.0f} | {null_s * 1e3:.1f} | "
            f"{floor * 1e3:.0f} | {ours_s / floor:.2f} |"
        )


def server_command(
    model_path: str,
    dtype: str,
    template: Path,
    clients: int,
    threads: int,
    scheme: str,
    device: str = "cpu",
    compile: Sequence[str] = (),
) -> list[str]:
    """cace-server as a module of whatever tree PYTHONPATH names (this one or REV's);
    ``compile`` is added as is (:func:`compile_flags`)."""
    return [
        sys.executable, "-m", "cace_server.cli", "serve", "--no-http",
        "--model", model_path, "--dtype", dtype, "--device", device,
        "--ipi", scheme + ":{socket}", "--ipi-clients", str(clients),
        "--ipi-template", str(template), "--torch-threads", str(threads),
        # the engine of 19a9087 needs its timer to batch beads over connections
        "--batch-wait-ms", "5.0" if clients > 1 else "0.0",
        "--log-level", "warning", *compile,
    ]  # fmt: skip


def compile_flags(
    cache: Path | None, template: Path, structures: int, mode: str = "on"
) -> list[str]:
    """The serve flags that compile the model for ``structures`` copies of the run's
    structure before the server connects (none where ``cache`` is None: eager)."""
    if cache is None:
        return []
    return [
        "--compile", mode,
        "--compile-warmup", f"{template}:{structures}",
        "--compile-cache-dir", str(cache),
    ]  # fmt: skip


def _compile_cache(args: argparse.Namespace, work: Path) -> Path | None:
    """One Inductor cache for every compiled server and this process (the floor)."""
    if not args.compile:
        return None
    cache = work / "inductor-cache"
    cache.mkdir(exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache)
    return cache


def check_imports_from(tree: Path, cwd: Path) -> None:
    """Fail unless a server started as in ``run_case`` imports cace_server from ``tree``."""
    found = subprocess.run(
        [sys.executable, "-c", "import cace_server; print(cace_server.__file__)"],
        env=dict(os.environ, PYTHONPATH=str(tree)),
        cwd=cwd,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    if not Path(found).resolve().is_relative_to(tree.resolve()):
        raise RuntimeError(f"a server meant to run {tree} imports cace_server from {found}")


def converted_by(tree: Path, dest: Path, cwd: Path) -> str:
    """The reference LR checkpoint converted and saved by the code of ``tree``."""
    code = (
        "import sys; from cace_server.model import convert_original, save_model; "
        "save_model(convert_original(sys.argv[1]), sys.argv[2])"
    )
    subprocess.run(
        [sys.executable, "-c", code, str(REFERENCE / "best_model.pth"), str(dest)],
        env=dict(os.environ, PYTHONPATH=str(tree)),
        cwd=cwd,
        check=True,
    )
    return str(dest)


def against(args: argparse.Namespace) -> None:
    import ase.io

    atoms = ase.io.read(REFERENCE / "liquid-64.xyz")
    atoms.pbc = True
    dtype = "float32" if args.dtypes == "float32,float64" else args.dtypes.split(",")[0]
    modes = [m for m in args.modes.split(",") if m != "py-driver"]
    work = Path(tempfile.mkdtemp(prefix="cace-ipi-bench-"))
    tree = Path(tempfile.mkdtemp(prefix="cace-ipi-against-", dir="/tmp")) / "tree"
    subprocess.run(
        ["git", "-C", str(REPO), "worktree", "add", "--detach", "--quiet", str(tree), args.against],
        check=True,
    )
    rows = []
    try:
        for side in (tree, REPO):
            check_imports_from(side, work)
        # Each side converts the original checkpoint with its own code: a revision
        # may not read the file format of a later one.
        model_paths = {
            side: args.model or converted_by(path, work / f"{side}.safetensors", work)
            for side, path in (("rev", tree), ("ours", REPO))
        }
        template = work / "template.extxyz"
        ase.io.write(template, atoms, format="extxyz")
        compile_cache = _compile_cache(args, work)
        for beads in (int(b) for b in args.beads.split(",")):
            for mode in modes:
                ipi_mode, batch, clients, scheme = {
                    "serial": ("unix", 1, 1, "unix"),
                    "connections": ("unix", 1, beads, "unix"),
                    "batched": ("unix", beads, 1, "unix"),
                    "shm": ("shm", beads, 1, "shm"),
                }[mode]
                times: dict[str, list[float]] = {"rev": [], "ours": []}
                for r in range(args.repeats):
                    # alternate which side runs first, so drifts in load cancel
                    for side in ("rev", "ours") if r % 2 == 0 else ("ours", "rev"):
                        path = tree if side == "rev" else REPO
                        # only this tree compiles: the revision may predate the flags
                        compiled = compile_flags(
                            compile_cache if side == "ours" else None,
                            template,
                            1 if mode == "serial" else beads,
                        )
                        command = server_command(
                            model_paths[side],
                            dtype,
                            template,
                            clients,
                            args.threads,
                            scheme,
                            compile=compiled,
                        )
                        tag = f"{beads}-{mode}-{side}-{r}"
                        seconds = run_case(
                            work / tag,
                            atoms,
                            beads,
                            args.steps,
                            ipi_mode,
                            batch,
                            [command],
                            pythonpath=path,
                        )
                        times[side].append(seconds)
                        print(f"done {tag}: {times[side][-1] * 1e3:.0f} ms/step", file=sys.stderr)
                rev, ours = statistics.median(times["rev"]), statistics.median(times["ours"])
                rows.append((beads, mode, rev, ours))
    finally:
        subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(tree)])
        shutil.rmtree(tree.parent, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)

    print(
        f"\ni-PI NVT PIMD of liquid-64 water (192 atoms), reference LR model, {dtype}, "
        f"{args.threads} threads, {args.steps} steps, median of {args.repeats} runs per side\n"
    )
    ours_label = "this tree (compiled)" if args.compile else "this tree"
    print(f"| beads | mode | {args.against} ms/step | {ours_label} ms/step | ratio |")
    print("|---|---|---|---|---|")
    for beads, mode, rev, ours in rows:
        print(f"| {beads} | {mode} | {rev * 1e3:.0f} | {ours * 1e3:.0f} | {ours / rev:.2f} |")


if __name__ == "__main__":
    main()
