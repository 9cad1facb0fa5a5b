"""Energy conservation of constant-pressure MD: the real i-PI, NPT, through cace-server.

liquid-64 (192 atoms) with the reference water CACE-LR model, float64, i-PI's
isotropic barostat, once per long-range mode (``--long-range-mode parity|smooth``).
The cell is first compressed to just below the side (2 sqrt(38) Å) where the original's
k-set gains 36 vectors (|n|^2 = 38), and the positions relaxed (liquid-64's bonds are
far from this model's minimum); at 0.1 MPa the box then expands through that side
and the next ones (|n|^2 = 40, 41). Prints, per
mode: conserved-quantity drift over the run, the largest and the median step-to-step
change, and how many steps changed the parity k-set.

    python benchmarks/npt.py                 # 600 steps of 0.25 fs in each mode
    python benchmarks/npt.py --steps 200 --modes smooth
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from tests.npt_support import NptRun, near_crossing, parity_k_count, relaxed_water  # noqa: E402

REFERENCE = Path(os.environ.get("CACE_REFERENCE_DIR", REPO.parent / "shared" / "reference"))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--modes", default="parity,smooth")
    parser.add_argument("--timestep-fs", type=float, default=0.25)
    parser.add_argument("--pressure-mpa", type=float, default=0.1)
    parser.add_argument("--margin", type=float, default=-0.002)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per server")
    parser.add_argument("--timeout", type=float, default=7200.0, help="seconds per run")
    args = parser.parse_args()

    import ase.io
    import torch

    torch.set_num_threads(args.threads)

    from cace_server.model import convert_original, save_model

    atoms = ase.io.read(REFERENCE / "liquid-64.xyz")
    atoms.pbc = True
    results = []
    with tempfile.TemporaryDirectory() as tmp, tempfile.TemporaryDirectory(dir="/tmp") as socks:
        model_file = save_model(
            convert_original(REFERENCE / "best_model.pth", dtype="float64"),
            Path(tmp) / "water.safetensors",
        )
        atoms = relaxed_water(near_crossing(atoms, args.margin), model_file)
        # the modes run side by side, one thread each (a loaded 2-core machine runs
        # small torch ops far faster on one thread than on two)
        runs = [
            NptRun(
                Path(tmp) / mode,
                socks,
                atoms,
                model_file,
                mode,
                steps=args.steps,
                timestep_fs=args.timestep_fs,
                pressure_mpa=args.pressure_mpa,
                threads=args.threads,
            )
            for mode in args.modes.split(",")
        ]
        try:
            for run in runs:
                run.start()
            for run in runs:
                results.append(run.result(timeout=args.timeout))
                print(f"done {run.mode}", file=sys.stderr, flush=True)
        finally:
            for run in runs:
                run.stop()
    print(
        f"\ni-PI NPT, liquid-64, reference LR model, float64, {args.steps} steps of "
        f"{args.timestep_fs} fs, {args.pressure_mpa} MPa, start side {atoms.cell[0, 0]:.4f} Å\n"
    )
    print(
        "| mode | steps | drift meV | largest step meV | largest after step 50 meV "
        "| median step meV | largest spike (x local median) | at step "
        "| steps that changed the parity k-set | volume range Å^3 |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        spikes = r.spikes()
        print(
            f"| {r.mode} | {r.steps} | {1e3 * r.drift:.3f} | {1e3 * r.largest_step:.3f} "
            f"| {1e3 * r.largest_step_after(50):.3f} | {1e3 * r.typical_step:.4f} "
            f"| {spikes.max():.1f} | {int(spikes.argmax()) + 1} | {r.k_set_changes} "
            f"| {r.volume.min():.1f}-{r.volume.max():.1f} |"
        )
    for r in results:
        crossings = np.nonzero(np.diff([parity_k_count(v ** (1 / 3)) for v in r.volume]))[0]
        print(
            f"\n{r.mode}: parity k-set changed at steps {(crossings + 1).tolist()}; "
            f"spike there: {[round(float(r.spikes()[i]), 1) for i in crossings]}"
        )


if __name__ == "__main__":
    main()
