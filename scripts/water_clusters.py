"""Water clusters and boxes for the jobs tests and benchmark (``benchmarks/jobs.py``).

``water_clusters(64)``: clusters of 2 to 20 molecules, each molecule rigidly rotated
at random, oxygens at least ``min_oo`` apart inside a sphere of about liquid density.
``water_boxes(8, 16)``: periodic cubic boxes of ``molecules`` molecules at liquid
density, built the same way. Deterministic for a seed.

    python scripts/water_clusters.py --count 64 --output clusters.xyz
"""

from __future__ import annotations

import argparse

import numpy as np
from ase import Atoms
from scipy.spatial.transform import Rotation

# the experimental gas-phase geometry: O-H 0.9572 Å, H-O-H 104.52 degrees
_HALF_ANGLE = np.deg2rad(104.52) / 2
_MOLECULE = np.array(
    [
        [0.0, 0.0, 0.0],
        [0.9572 * np.sin(_HALF_ANGLE), 0.0, 0.9572 * np.cos(_HALF_ANGLE)],
        [-0.9572 * np.sin(_HALF_ANGLE), 0.0, 0.9572 * np.cos(_HALF_ANGLE)],
    ]
)
_VOLUME_PER_MOLECULE = 29.9  # Å^3 at 1 g/cm^3


def _molecules(centres: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    rotations = Rotation.random(len(centres), random_state=rng)
    return np.concatenate([c + r.apply(_MOLECULE) for c, r in zip(centres, rotations, strict=True)])


def _place(n: int, inside, min_oo: float, rng: np.random.Generator, cell=None) -> np.ndarray:
    """``n`` oxygen positions drawn by ``inside()`` at least ``min_oo`` apart."""
    centres: list[np.ndarray] = []
    for _ in range(100_000):
        if len(centres) == n:
            break
        trial = inside()
        if centres:
            delta = np.asarray(centres) - trial
            if cell is not None:
                delta -= np.round(delta / cell) * cell
            if np.min(np.linalg.norm(delta, axis=1)) < min_oo:
                continue
        centres.append(trial)
    if len(centres) < n:
        raise RuntimeError(f"could not place {n} molecules {min_oo} Å apart")
    return np.asarray(centres)


def water_cluster(molecules: int, rng: np.random.Generator, min_oo: float = 2.7) -> Atoms:
    """One non-periodic cluster of ``molecules`` water molecules."""
    radius = (3 * molecules * _VOLUME_PER_MOLECULE / (4 * np.pi)) ** (1 / 3) + 1.0

    def inside() -> np.ndarray:
        while True:
            p = rng.uniform(-radius, radius, 3)
            if np.linalg.norm(p) <= radius:
                return p

    centres = _place(molecules, inside, min_oo, rng)
    return Atoms("OH2" * molecules, positions=_molecules(centres, rng))


def water_clusters(
    count: int = 64, seed: int = 0, smallest: int = 2, largest: int = 20
) -> list[Atoms]:
    """``count`` clusters whose sizes run evenly from ``smallest`` to ``largest`` molecules."""
    rng = np.random.default_rng(seed)
    sizes = np.linspace(smallest, largest, count).round().astype(int)
    return [water_cluster(int(n), rng) for n in sizes]


def water_box(
    molecules: int, rng: np.random.Generator, min_oo: float = 2.5, min_contact: float = 1.5
) -> Atoms:
    """One periodic cubic box of ``molecules`` molecules at liquid density; atoms of
    different molecules at least ``min_contact`` apart (periodic images included)."""
    side = (molecules * _VOLUME_PER_MOLECULE) ** (1 / 3)
    for _ in range(1000):
        centres = _place(molecules, lambda: rng.uniform(0, side, 3), min_oo, rng, cell=side)
        positions = _molecules(centres, rng)
        atoms = Atoms("OH2" * molecules, positions=positions, cell=[side] * 3, pbc=True)
        distances = atoms.get_all_distances(mic=True)
        molecule = np.arange(len(atoms)) // 3
        between = distances[molecule[:, None] != molecule[None, :]]
        if between.min() >= min_contact:
            atoms.wrap()
            return atoms
    raise RuntimeError(f"could not place {molecules} molecules {min_contact} Å apart")


def water_boxes(count: int = 8, molecules: int = 16, seed: int = 0) -> list[Atoms]:
    rng = np.random.default_rng(seed)
    return [water_box(molecules, rng) for _ in range(count)]


def main() -> None:
    import ase.io

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--boxes",
        type=int,
        default=0,
        help="molecules per periodic box (default: clusters of 2 to 20 molecules)",
    )
    parser.add_argument("--output", default="-", help="extended XYZ file (default: stdout)")
    args = parser.parse_args()
    if args.boxes:
        images = water_boxes(args.count, args.boxes, args.seed)
    else:
        images = water_clusters(args.count, args.seed)
    ase.io.write(args.output if args.output != "-" else "/dev/stdout", images, format="extxyz")


if __name__ == "__main__":
    main()
