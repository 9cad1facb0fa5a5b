"""The long-range term: direct vs mesh back end, speed (crossover) and error.

Two tables on liquid-64 supercells with the reference water CACE-LR model:

1. time of the Ewald term alone (energy, forces and virial: forward + backward), direct
   and mesh, per size, with the model's own latent charges: where the mesh gets faster
   is the ``mesh_above`` of ``--long-range-method auto``;
2. the mesh's error against the direct sum for the whole model (energy, largest force
   component, largest stress component), float64.

    python benchmarks/longrange.py                 # both tables
    python benchmarks/longrange.py --sizes 1,2,3,4,8 --error-sizes 1,2,4
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
REFERENCE = Path(os.environ.get("CACE_REFERENCE_DIR", REPO.parent / "shared" / "reference"))


def water(repeat: str):
    """liquid-64 repeated: "2" is 2x2x2, "2x1x1" as written."""
    import ase.io

    from cace_server.structures import Structure

    atoms = ase.io.read(REFERENCE / "liquid-64.xyz")
    atoms.pbc = True
    reps = [int(x) for x in repeat.split("x")] if "x" in repeat else [int(repeat)] * 3
    return Structure.from_ase(atoms.repeat(reps))


def time_ewald(model, structure, method: str, calls: int) -> float:
    """Median seconds of the Ewald term's energy + forces + virial for fixed charges."""
    import numpy as np
    import torch

    from cace_server.model.longrange import LongRangeOptions

    module = model.ewald
    module.configure(LongRangeOptions(**{**module.options.__dict__, "method": method}))
    charges = np.random.default_rng(0).normal(0, 0.5, len(structure))
    q = torch.as_tensor(charges, dtype=model.dtype)
    cells = structure.cell[None]
    plan = module.plan(cells, np.ones((1, 3), bool), [len(structure)])
    times = []
    for _ in range(calls + 1):  # the first call warms up
        t0 = time.perf_counter()
        r = torch.as_tensor(structure.positions).requires_grad_(True)
        strain = torch.zeros(1, 3, 3, dtype=torch.float64, requires_grad=True)
        deform = torch.eye(3, dtype=torch.float64) + strain
        energy = module(r @ deform[0], q, torch.as_tensor(cells) @ deform, plan=plan)
        torch.autograd.grad(energy.sum(), [r, strain])
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:]) if calls else times[0]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--sizes",
        default="1,2x1x1,2x2x1,2,3,4,8",
        help="repeats of liquid-64 for the speed table (N for NxNxN, or AxBxC)",
    )
    parser.add_argument("--error-sizes", default="1,2,4", help="repeats for the error table")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    from cace_server.model import convert_original

    model = convert_original(REFERENCE / "best_model.pth", dtype="float64")
    options = model.ewald.options
    print(
        f"\nEwald term alone (E + F + virial), float64, {args.threads} threads; mesh: "
        f"B-spline order {options.mesh_order}, oversampling {options.mesh_oversampling}\n"
    )
    print("| atoms | direct ms | mesh ms | direct / mesh |")
    print("|---|---|---|---|")
    for repeat in args.sizes.split(","):
        s = water(repeat)
        calls = 3 if len(s) <= 12288 else 1
        direct = time_ewald(model, s, "direct", calls) if len(s) <= 12288 else float("nan")
        mesh = time_ewald(model, s, "mesh", calls)
        d = f"{1e3 * direct:.1f}" if direct == direct else "-"
        ratio = f"{direct / mesh:.2f}" if direct == direct else "-"
        print(f"| {len(s):,} | {d} | {1e3 * mesh:.1f} | {ratio} |", flush=True)

    print("\nMesh vs direct, whole model, float64 (max over atoms and components)\n")
    print(
        "| atoms | E direct eV | |dE| eV | |dE|/|E| | |dE_ewald|/|E_ewald| "
        "| max |dF| eV/Å | max |dstress| eV/Å^3 |"
    )
    print("|---|---|---|---|---|---|---|")
    from cace_server.model.neighbors import collate

    for repeat in args.error_sizes.split(","):
        s = water(repeat)
        prepared = model.prepare(s)
        out = {}
        for method in ("direct", "mesh"):
            model.configure_long_range(method=method)
            pred = model.predict([prepared])[0]
            with torch.no_grad():
                split = model.compute(collate([prepared], model.device), forces=False, virial=False)
            ewald = float(split.energy[0] - split.atom_energy.sum())
            out[method] = (pred, ewald)
        (d, d_ew), (m, m_ew) = out["direct"], out["mesh"]
        de = abs(m.energy - d.energy)
        print(
            f"| {len(s):,} | {d.energy:.6f} | {de:.2e} | {de / abs(d.energy):.2e} "
            f"| {abs(m_ew - d_ew) / abs(d_ew):.2e} | {np.abs(m.forces - d.forces).max():.2e} "
            f"| {np.abs(m.stress - d.stress).max():.2e} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
