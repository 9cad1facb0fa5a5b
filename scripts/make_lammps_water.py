"""Write the start structure of the LAMMPS example (clients/lammps/water64.data).

64 water molecules at 1 g/cm^3 (``scripts.water_clusters.water_box``), relaxed
with FIRE and then equilibrated for 1 ps of Langevin MD at 300 K (0.5 fs steps)
with the bundled water model, so the example's MD starts from a liquid.

    python scripts/make_lammps_water.py  # about a minute on 2 cores
"""

from __future__ import annotations

import argparse
from pathlib import Path

import ase.io
import numpy as np
from ase import units
from ase.md.langevin import Langevin
from ase.md.velocitydistribution import MaxwellBoltzmannDistribution
from ase.optimize import FIRE

from cace_server.calculator import CACECalculator
from scripts.water_clusters import water_box

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "clients" / "lammps" / "water64.data")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    atoms = water_box(64, rng, min_oo=2.4, min_contact=1.2)
    atoms.calc = CACECalculator(ROOT / "cace_server" / "data" / "water.safetensors")
    FIRE(atoms, logfile=None).run(fmax=0.2, steps=200)
    MaxwellBoltzmannDistribution(atoms, temperature_K=300, rng=rng)
    Langevin(atoms, 0.5 * units.fs, temperature_K=300, friction=0.02, rng=rng).run(2000)
    atoms.wrap()
    ase.io.write(
        args.out,
        atoms,
        format="lammps-data",
        atom_style="atomic",
        masses=True,
        specorder=["O", "H"],
    )
    print(f"wrote {args.out}: {len(atoms)} atoms, T = {atoms.get_temperature():.0f} K")


if __name__ == "__main__":
    main()
