"""What Born effective charges cost: i-PI steps with a dipole/BEC model, with and without.

For liquid-64 water (192 atoms) and the published LES-BEC water model (converted by
our importer), i-PI drives ``cace-server serve`` over one batched UNIX connection:

  nvt, no BEC   plain NVT (PI)MD, the server started with --no-ipi-bec
  nvt, BEC      plain NVT, BEC computed and sent as the extra every step (the default)
  eda-nvt       i-PI's electric-field driven dynamics, which reads those BEC every step

next to the model alone on the same beads (one batch, with and without BEC). Time
per step is the median interval between i-PI's property lines after the first two.

    python benchmarks/field_md.py                  # 1 and 4 beads, float64
    python benchmarks/field_md.py --beads 8 --dtypes float32,float64 --steps 10
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Our folder must not be on sys.path: benchmarks/ipi.py would shadow the ipi package.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(REPO))

from tests.ipi_support import IpiRun  # noqa: E402
from tests.test_ipi_field import LES_BEC_WATER, eda_motion  # noqa: E402

_spec = importlib.util.spec_from_file_location("ipi_bench", REPO / "benchmarks" / "ipi.py")
assert _spec is not None and _spec.loader is not None
ipi_bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ipi_bench)

REFERENCE = Path(os.environ.get("CACE_REFERENCE_DIR", REPO.parent / "shared" / "reference"))
BIN = Path(sys.executable).parent
NVT = """
      <motion mode="dynamics">
        <dynamics mode="nvt">
          <timestep units="femtosecond"> 0.25 </timestep>
          <thermostat mode="langevin"><tau units="femtosecond"> 100 </tau></thermostat>
        </dynamics>
      </motion>"""


def run_case(workdir: Path, atoms, beads: int, steps: int, motion: str, server: list[str]) -> float:
    sockets = tempfile.mkdtemp(prefix="ipif", dir="/tmp")
    run = IpiRun(
        workdir,
        sockets,
        atoms,
        batch_size=beads,
        nbeads=beads,
        steps=steps,
        motion=motion,
        outputs=ipi_bench.LIGHT_OUTPUTS,
    )
    proc = None
    try:
        run.start()
        run.wait_for_socket()
        cmd = [c.replace("{socket}", run.socket_path) for c in server]
        env = dict(os.environ, OMP_NUM_THREADS="2", PYTHONPATH=str(REPO))
        with open(workdir / "server.log", "wb") as log:
            proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=log)
        return float(ipi_bench.per_step(ipi_bench.step_times(run, proc_timeout=1800)))
    finally:
        run.stop()
        if proc is not None:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(30)
            if proc.poll() is None:
                proc.kill()
        shutil.rmtree(sockets, ignore_errors=True)


def model_alone(model_path: str, dtype: str, atoms, beads: int, threads: int) -> tuple[float, ...]:
    import numpy as np
    import torch

    from cace_server.model import load_model
    from cace_server.structures import Structure

    torch.set_num_threads(threads)
    model = load_model(model_path, dtype=dtype)
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
    out = []
    for bec in (False, True):
        model.predict(structures, model.default_outputs | {"bec"} if bec else None)
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            model.predict(structures, model.default_outputs | {"bec"} if bec else None)
            times.append(time.perf_counter() - t0)
        out.append(statistics.median(times))
    return tuple(out)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--beads", default="1,4")
    parser.add_argument("--dtypes", default="float64")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    import ase
    import ase.io

    from cace_server.model import convert_original, save_model

    atoms = ase.io.read(REFERENCE / "liquid-64.xyz")
    assert isinstance(atoms, ase.Atoms)
    atoms.pbc = True
    work = Path(tempfile.mkdtemp(prefix="cace-field-bench-"))
    rows = []
    try:
        model = convert_original(REFERENCE / "published" / LES_BEC_WATER)
        model_path = str(save_model(model, work / "les-bec.safetensors"))
        template = work / "template.extxyz"
        ase.io.write(template, atoms, format="extxyz")
        for beads in (int(b) for b in args.beads.split(",")):
            for dtype in args.dtypes.split(","):
                plain, with_bec = model_alone(model_path, dtype, atoms, beads, args.threads)
                server = [
                    str(BIN / "cace-server"), "serve", "--no-http", "--no-ipi-reconnect",
                    "--model", model_path, "--dtype", dtype, "--ipi", "unix:{socket}",
                    "--ipi-template", str(template), "--torch-threads", str(args.threads),
                    "--log-level", "warning",
                ]  # fmt: skip
                cases = {
                    "nvt, no BEC": (NVT, [*server, "--no-ipi-bec"]),
                    "nvt, BEC": (NVT, server),
                    "eda-nvt": (eda_motion(asr_threshold=5e-4), server),
                }
                for name, (motion, cmd) in cases.items():
                    tag = f"{beads}-{dtype}-{name.replace(', ', '-').replace(' ', '')}"
                    step = run_case(work / tag, atoms, beads, args.steps, motion, cmd)
                    rows.append((beads, dtype, name, step, plain, with_bec))
                    print(f"done {tag}: {step * 1e3:.0f} ms/step", file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(
        f"\ni-PI with the LES-BEC water model, liquid-64 (192 atoms), {args.threads} threads, "
        f"{args.steps} steps, batched transport\n"
    )
    print("| beads | dtype | run | ms/step | model alone ms | model alone + BEC ms |")
    print("|---|---|---|---|---|---|")
    for beads, dtype, name, step, plain, with_bec in rows:
        print(
            f"| {beads} | {dtype} | {name} | {step * 1e3:.0f} | {plain * 1e3:.0f} | "
            f"{with_bec * 1e3:.0f} |"
        )


if __name__ == "__main__":
    main()
