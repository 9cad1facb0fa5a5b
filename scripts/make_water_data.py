"""Generate the liquid-water training data of the default model.

How the data is made, so anyone can make it again:

1. Boxes of 32 and 64 water molecules at densities of 0.92 to 1.08 g/cm^3 are
   equilibrated at 250 to 400 K by Langevin MD (0.5 fs steps) with a flexible
   TIP3P: ASE's TIP3P between molecules plus harmonic O-H stretch and H-O-H
   bend with SPC/Fw force constants (Wu, Tepper, Voth, JCP 124, 024503 (2006)).
2. Snapshots every 0.25 ps get extra Gaussian noise on every atom (sigma
   between 0 and 0.04 Å), so that geometries a little off the classical
   model's distribution are covered as well.
3. Each snapshot is labelled with GFN2-xTB energy, forces and stress from
   ``tblite`` (electronic temperature 300 K).

Whole trajectories are held out for the test file, so no test snapshot has a
correlated twin in the training file.  The result is deterministic for a seed
(up to the last digits of the SCF).  On 2 CPU cores the default sizes take about
20 minutes; almost all of it is GFN2-xTB.

    python scripts/make_water_data.py --out-dir data
"""

from __future__ import annotations

import argparse
import gzip
import os
import sys
import time
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import ClassVar

import numpy as np
from ase import Atoms, units
from ase.calculators.calculator import Calculator, all_changes
from ase.calculators.singlepoint import SinglePointCalculator
from ase.calculators.tip3p import TIP3P, angleHOH, rOH
from ase.io import write
from ase.md.langevin import Langevin
from ase.md.velocitydistribution import MaxwellBoltzmannDistribution

WATER_MASS_G = 18.015
AVOGADRO = 6.02214076e23
KCAL_MOL = units.kcal / units.mol
BOND_K = 1059.162 * KCAL_MOL  # eV/Å^2, SPC/Fw
ANGLE_K = 75.90 * KCAL_MOL  # eV/rad^2, SPC/Fw


class FlexibleTIP3P(Calculator):
    """TIP3P between molecules (ASE) plus harmonic bonds and angles within them.

    Atoms come as O, H, H per molecule; molecules are never wrapped apart
    during the MD, so intramolecular vectors need no minimum image.
    """

    implemented_properties: ClassVar[list[str]] = ["energy", "forces"]

    def __init__(self, rc: float) -> None:
        super().__init__()
        self.intermolecular = TIP3P(rc=rc, width=0.5)

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):  # type: ignore[no-untyped-def]
        super().calculate(atoms, properties, system_changes)
        assert self.atoms is not None
        inter = self.atoms.copy()
        inter.calc = self.intermolecular
        energy = inter.get_potential_energy()
        forces = inter.get_forces().copy()

        r = self.atoms.positions.reshape(-1, 3, 3)
        r1, r2 = r[:, 1] - r[:, 0], r[:, 2] - r[:, 0]
        d1, d2 = np.linalg.norm(r1, axis=1), np.linalg.norm(r2, axis=1)
        cos = np.einsum("ij,ij->i", r1, r2) / (d1 * d2)
        theta = np.arccos(np.clip(cos, -1.0, 1.0))
        theta0 = np.radians(angleHOH)
        energy += 0.5 * BOND_K * (((d1 - rOH) ** 2).sum() + ((d2 - rOH) ** 2).sum())
        energy += 0.5 * ANGLE_K * ((theta - theta0) ** 2).sum()

        f1 = -BOND_K * ((d1 - rOH) / d1)[:, None] * r1
        f2 = -BOND_K * ((d2 - rOH) / d2)[:, None] * r2
        scale = (ANGLE_K * (theta - theta0) / np.sin(theta))[:, None]
        f1 += scale * (r2 / (d1 * d2)[:, None] - cos[:, None] * r1 / (d1**2)[:, None])
        f2 += scale * (r1 / (d1 * d2)[:, None] - cos[:, None] * r2 / (d2**2)[:, None])
        intra = np.stack([-(f1 + f2), f1, f2], axis=1).reshape(-1, 3)
        self.results = {"energy": float(energy), "forces": forces + intra}


@dataclass(frozen=True)
class Trajectory:
    index: int
    n_molecules: int
    density: float  # g/cm^3
    temperature: float  # K
    split: str  # "train" or "test"


def box_length(n_molecules: int, density: float) -> float:
    """Edge (Å) of the cubic box holding ``n_molecules`` at ``density`` g/cm^3."""
    volume_cm3 = n_molecules * WATER_MASS_G / AVOGADRO / density
    return float((volume_cm3 * 1e24) ** (1.0 / 3.0))


def rigid_water() -> np.ndarray:
    """O, H, H positions of a TIP3P molecule, O at the origin."""
    half = np.radians(angleHOH) / 2.0
    return np.array(
        [
            [0.0, 0.0, 0.0],
            [rOH * np.sin(half), rOH * np.cos(half), 0.0],
            [-rOH * np.sin(half), rOH * np.cos(half), 0.0],
        ]
    )


def random_rotation(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q *= np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] *= -1
    return q


def packed_box(n_molecules: int, length: float, rng: np.random.Generator) -> Atoms:
    """Randomly oriented molecules inserted with O-O distances of at least 2.5 Å."""
    oxygens: list[np.ndarray] = []
    while len(oxygens) < n_molecules:
        trial = rng.uniform(0.0, length, size=3)
        ok = True
        for o in oxygens:
            d = trial - o
            d -= length * np.round(d / length)
            if np.dot(d, d) < 2.5**2:
                ok = False
                break
        if ok:
            oxygens.append(trial)
    positions = np.concatenate([o + rigid_water() @ random_rotation(rng).T for o in oxygens])
    return Atoms("OHH" * n_molecules, positions=positions, cell=[length] * 3, pbc=True)


def sample_trajectory(traj: Trajectory, snapshots: int, seed: int) -> list[Atoms]:
    """Equilibrate a flexible TIP3P box and return noisy snapshots (unlabelled)."""
    rng = np.random.default_rng([seed, traj.index])
    length = box_length(traj.n_molecules, traj.density)
    atoms = packed_box(traj.n_molecules, length, rng)
    atoms.calc = FlexibleTIP3P(rc=min(4.5, length / 2 - 0.01))
    MaxwellBoltzmannDistribution(atoms, temperature_K=traj.temperature, rng=rng)
    # Random insertion leaves close contacts: start with short, strongly damped steps.
    damped = Langevin(
        atoms, 0.1 * units.fs, temperature_K=traj.temperature, friction=1.0, fixcm=False, rng=rng
    )
    damped.run(500)
    md = Langevin(
        atoms, 0.5 * units.fs, temperature_K=traj.temperature, friction=0.01, fixcm=False, rng=rng
    )
    md.run(4000)
    frames = []
    for k in range(snapshots):
        md.run(500)
        frame = Atoms(atoms.numbers, positions=atoms.positions, cell=atoms.cell, pbc=True)
        frame.wrap()
        sigma = float(rng.uniform(0.0, 0.04))
        frame.positions += rng.normal(scale=sigma, size=frame.positions.shape)
        frame.info.update(
            trajectory=traj.index,
            snapshot=k,
            n_molecules=traj.n_molecules,
            density=traj.density,
            temperature=traj.temperature,
            noise=round(sigma, 4),
            split=traj.split,
        )
        frames.append(frame)
    return frames


def label(frame: Atoms) -> Atoms | None:
    """GFN2-xTB energy, forces and stress; ``None`` when the SCF does not converge."""
    from tblite.ase import TBLite

    frame.calc = TBLite(method="GFN2-xTB", electronic_temperature=300.0, verbosity=0)
    try:
        energy = frame.get_potential_energy()
        forces = frame.get_forces()
        stress = frame.get_stress(voigt=False)
    except Exception as error:  # tblite raises a bare exception on SCF failure
        print(f"skipped snapshot {frame.info}: {error}", file=sys.stderr)
        return None
    frame.calc = SinglePointCalculator(frame, energy=energy, forces=forces, stress=stress)
    return frame


def _work(args: tuple[Trajectory, int, int]) -> list[Atoms]:
    traj, snapshots, seed = args
    frames = sample_trajectory(traj, snapshots, seed)
    return [f for f in map(label, frames) if f is not None]


def plan(n_small: int, n_large: int, test_fraction: float, seed: int) -> list[Trajectory]:
    rng = np.random.default_rng(seed)
    trajectories = []
    for count, n_molecules in ((n_small, 32), (n_large, 64)):
        for _ in range(count):
            trajectories.append(
                Trajectory(
                    index=len(trajectories),
                    n_molecules=n_molecules,
                    density=round(float(rng.uniform(0.92, 1.08)), 3),
                    temperature=round(float(rng.uniform(250.0, 400.0)), 1),
                    split="test" if rng.uniform() < test_fraction else "train",
                )
            )
    return trajectories


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", type=Path, default=Path("data"))
    parser.add_argument("--small", type=int, default=40, help="trajectories of 32 molecules")
    parser.add_argument("--large", type=int, default=10, help="trajectories of 64 molecules")
    parser.add_argument("--snapshots", type=int, default=6, help="snapshots per trajectory")
    parser.add_argument("--test-fraction", type=float, default=0.15)
    parser.add_argument("--seed", type=int, default=2024)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    trajectories = plan(args.small, args.large, args.test_fraction, args.seed)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    frames: dict[str, list[Atoms]] = {"train": [], "test": []}
    start = time.perf_counter()
    jobs = [(t, args.snapshots, args.seed) for t in trajectories]
    with get_context("spawn").Pool(args.workers) as pool:
        for done, result in enumerate(pool.imap(_work, jobs), start=1):
            for frame in result:
                frames[frame.info["split"]].append(frame)
            print(
                f"[{done}/{len(jobs)}] {time.perf_counter() - start:7.0f} s  "
                f"train {len(frames['train'])}  test {len(frames['test'])}",
                flush=True,
            )
    for split, items in frames.items():
        path = args.out_dir / f"water_gfn2_{split}.extxyz.gz"
        with gzip.open(path, "wt") as handle:
            write(handle, items, format="extxyz")
        print(f"wrote {path}: {len(items)} structures, {sum(len(a) for a in items)} atoms")


if __name__ == "__main__":
    main()
