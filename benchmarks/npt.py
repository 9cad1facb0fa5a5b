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
import math
import os
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(REPO))

from tests.npt_support import relaxed_water, run_npt  # noqa: E402

REFERENCE = Path(os.environ.get("CACE_REFERENCE_DIR", REPO.parent / "shared" / "reference"))


def near_crossing(atoms, margin: float):
    """liquid-64 scaled to a cell side ``margin`` (relative) off 2 sqrt(38) Å."""
    side = float(atoms.cell[0, 0])
    target = 2.0 * math.sqrt(38.0) * (1.0 + margin)
    out = atoms.copy()
    out.set_cell(atoms.cell * (target / side), scale_atoms=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--modes", default="parity,smooth")
    parser.add_argument("--timestep-fs", type=float, default=0.25)
    parser.add_argument("--pressure-mpa", type=float, default=0.1)
    parser.add_argument("--margin", type=float, default=-0.002)
    args = parser.parse_args()

    import ase.io

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
        for mode in args.modes.split(","):
            result = run_npt(
                Path(tmp) / mode,
                socks,
                atoms,
                model_file,
                mode,
                steps=args.steps,
                timestep_fs=args.timestep_fs,
                pressure_mpa=args.pressure_mpa,
            )
            results.append(result)
            print(f"done {mode}", file=sys.stderr, flush=True)
    print(
        f"\ni-PI NPT, liquid-64, reference LR model, float64, {args.steps} steps of "
        f"{args.timestep_fs} fs, {args.pressure_mpa} MPa, start side {atoms.cell[0, 0]:.4f} Å\n"
    )
    print(
        "| mode | steps | drift meV | largest step meV | median step meV "
        "| steps that changed the parity k-set | volume range Å^3 |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r.mode} | {r.steps} | {1e3 * r.drift:.3f} | {1e3 * r.largest_step:.3f} "
            f"| {1e3 * r.typical_step:.4f} | {r.k_set_changes} "
            f"| {r.volume.min():.1f}-{r.volume.max():.1f} |"
        )


if __name__ == "__main__":
    main()
