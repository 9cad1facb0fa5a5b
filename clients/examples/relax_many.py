"""Relax many structures on a cace-server in one job (or run a short MD of each).

    python clients/examples/relax_many.py --url http://127.0.0.1:8000 \\
        --input clusters.xyz --output relaxed.xyz --fmax 0.05
    python clients/examples/relax_many.py --url http://127.0.0.1:8000 --count 32
    python clients/examples/relax_many.py --url http://127.0.0.1:8000 --md --steps 200

Without ``--input`` it relaxes ``--count`` small water clusters made here (molecules
of ``ase.build.molecule("H2O")``, randomly rotated on a loose grid). The server runs
ASE's own optimiser for every structure in lockstep; this script sends the job once,
shows a progress bar and writes the results as extended XYZ.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from ase import Atoms
from ase.build import molecule
from ase.io import read, write
from cace_client import CACEClient


def water_clusters(count: int, seed: int = 0, largest: int = 8) -> list[Atoms]:
    """``count`` clusters of 2 to ``largest`` water molecules, 3 Å apart, randomly turned."""
    rng = np.random.default_rng(seed)
    clusters = []
    for _ in range(count):
        n = int(rng.integers(2, largest + 1))
        side = int(np.ceil(n ** (1 / 3)))
        grid = np.array([(i, j, k) for i in range(side) for j in range(side) for k in range(side)])
        cluster = Atoms()
        for centre in grid[rng.permutation(len(grid))[:n]] * 3.0:
            water = molecule("H2O")
            water.rotate(float(rng.uniform(0, 360)), rng.normal(size=3), center="COP")
            water.translate(centre + rng.normal(0.0, 0.1, 3))
            cluster += water
        clusters.append(cluster)
    return clusters


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--token", default=None, help="bearer token, if the server wants one")
    parser.add_argument("--input", help="structures to relax (any ASE format; all frames)")
    parser.add_argument("--count", type=int, default=16, help="generated clusters (no --input)")
    parser.add_argument("--output", default="relaxed.xyz", help="where to write the results")
    parser.add_argument("--fmax", type=float, default=0.05, help="eV/Å")
    parser.add_argument("--steps", type=int, default=None, help="most steps (relax 1000, md 100)")
    parser.add_argument("--optimizer", default="FIRE")
    parser.add_argument("--md", action="store_true", help="run NVE MD instead of relaxing")
    parser.add_argument("--temperature", type=float, default=300.0, help="MD start (K)")
    parser.add_argument("--stride", type=int, default=10, help="MD: a frame every N steps")
    args = parser.parse_args()

    images = read(args.input, index=":") if args.input else water_clusters(args.count)
    n_atoms = sum(len(a) for a in images)
    print(f"{len(images)} structures, {n_atoms} atoms -> {args.url}")
    with CACEClient(args.url, args.token, binary=True) as client:
        start = time.perf_counter()
        if args.md:
            trajectories = client.md(
                images,
                steps=args.steps or 100,
                initial_temperature_K=args.temperature,
                stride=args.stride,
                frame_fields=("positions", "velocities"),
                progress=True,
            )
            elapsed = time.perf_counter() - start
            frames = [atoms for trajectory in trajectories for atoms in trajectory]
            write(args.output, frames, format="extxyz")
            drifts = [
                abs(t[-1].get_total_energy() - t[0].get_total_energy()) / len(t[0])
                for t in trajectories
            ]
            print(f"{len(frames)} frames in {elapsed:.1f} s -> {args.output}")
            print(f"largest energy drift {max(drifts):.2e} eV/atom")
            return
        relaxed = client.relax(
            images,
            fmax=args.fmax,
            steps=args.steps or 1000,
            optimizer=args.optimizer,
            progress=True,
        )
        elapsed = time.perf_counter() - start
    write(args.output, relaxed, format="extxyz")
    steps = [a.info["steps"] for a in relaxed]
    converged = sum(bool(a.info["converged"]) for a in relaxed)
    energies = np.array([a.get_potential_energy() for a in relaxed])
    print(f"{converged}/{len(relaxed)} converged (fmax {args.fmax} eV/Å) in {elapsed:.1f} s")
    print(f"steps: mean {np.mean(steps):.0f}, longest {max(steps)}")
    print(f"energy per atom: {np.mean(energies / [len(a) for a in relaxed]):.4f} eV")
    print(f"-> {args.output}")


if __name__ == "__main__":
    main()
