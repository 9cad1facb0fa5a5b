"""How good is the bundled water model? Held-out errors and a 10 ps NVT MD.

    python benchmarks/default_model.py            # full: 10 ps, about 10 minutes
    python benchmarks/default_model.py --ps 1     # quicker look

Prints the held-out errors against GFN2-xTB (data/water_gfn2_test.extxyz.gz),
then runs Langevin MD (ASE, 0.5 fs, 300 K) of a 64-molecule box taken from the
test data and reports: broken O-H bonds (an H more than 1.25 Å from its own O),
the closest pair of atoms ever seen, the temperature, and the first peak of the
O-O radial distribution function over the second half of the run.  The RDF is
saved as a PNG in benchmarks/out/.
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
if sys.path and Path(sys.path[0]).resolve() == HERE:
    sys.path.pop(0)  # this folder's ipi.py / http.py would shadow the real packages

import argparse  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

REPO = HERE.parent
TEST_DATA = REPO / "data" / "water_gfn2_test.extxyz.gz"


def held_out_errors(model_path: Path) -> dict[str, float]:
    from cace_server.model import load_model
    from cace_server.train import DataKeys, read_labelled
    from cace_server.train.report import dataset_errors

    model = load_model(model_path, dtype="float64")
    data = read_labelled([TEST_DATA], DataKeys())
    summary = dataset_errors(model, data).summary()
    summary["structures"] = len(data)
    summary["atoms"] = sum(d.n_atoms for d in data)
    return summary


def starting_box() -> object:
    from ase.io import read

    for atoms in read(TEST_DATA, index=":"):
        if len(atoms) == 192:
            atoms.calc = None
            return atoms
    raise SystemExit("no 64-molecule box in the test data")


def rdf_oo(
    frames: list[np.ndarray], cell: np.ndarray, r_max: float, bins: int = 120
) -> tuple[np.ndarray, np.ndarray]:
    """g_OO(r) by minimum image in a cubic box, averaged over frames."""
    length = float(cell[0, 0])
    edges = np.linspace(0.0, r_max, bins + 1)
    counts = np.zeros(bins)
    n_o = frames[0].shape[0]
    for o in frames:
        d = o[:, None, :] - o[None, :, :]
        d -= length * np.round(d / length)
        r = np.linalg.norm(d, axis=-1)[np.triu_indices(n_o, 1)]
        counts += np.histogram(r, bins=edges)[0]
    shell = 4.0 / 3.0 * np.pi * (edges[1:] ** 3 - edges[:-1] ** 3)
    density = n_o / length**3
    g = 2.0 * counts / (len(frames) * n_o * density * shell)
    return 0.5 * (edges[1:] + edges[:-1]), g


def run_md(model_path: Path, picoseconds: float, seed: int) -> dict[str, float | str]:
    from ase import units
    from ase.md.langevin import Langevin
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution

    from cace_server.calculator import CACECalculator

    atoms = starting_box()
    atoms.calc = CACECalculator(model_path, dtype="float32")
    rng = np.random.default_rng(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # renamed in newer ASE
        MaxwellBoltzmannDistribution(atoms, temperature_K=300, rng=rng)
    md = Langevin(
        atoms, 0.5 * units.fs, temperature_K=300, friction=0.01 / units.fs, fixcm=False, rng=rng
    )

    oxygens = np.flatnonzero(atoms.numbers == 8)
    hydrogens = np.flatnonzero(atoms.numbers == 1)
    pos = atoms.positions
    # Each H belongs to the O nearest to it at the start.
    d = pos[hydrogens][:, None, :] - pos[oxygens][None, :, :]
    length = float(atoms.cell[0, 0])
    d -= length * np.round(d / length)
    owner = oxygens[np.argmin(np.linalg.norm(d, axis=-1), axis=1)]

    steps = round(picoseconds * 1000 / 0.5)
    every = 20
    stats = {"max_oh": 0.0, "min_pair": np.inf, "broken": 0}
    o_frames: list[np.ndarray] = []
    temperatures: list[float] = []
    i_upper = np.triu_indices(len(atoms), 1)

    def observe() -> None:
        p = atoms.positions
        oh = p[hydrogens] - p[owner]
        oh -= length * np.round(oh / length)
        r_oh = np.linalg.norm(oh, axis=1)
        stats["max_oh"] = max(stats["max_oh"], float(r_oh.max()))
        stats["broken"] = max(stats["broken"], int((r_oh > 1.25).sum()))
        all_d = p[:, None, :] - p[None, :, :]
        all_d -= length * np.round(all_d / length)
        stats["min_pair"] = min(
            stats["min_pair"], float(np.linalg.norm(all_d, axis=-1)[i_upper].min())
        )
        temperatures.append(atoms.get_temperature())
        if md.nsteps >= steps // 2:
            o_frames.append(p[oxygens].copy())

    md.attach(observe, interval=every)
    start = time.perf_counter()
    md.run(steps)
    seconds = time.perf_counter() - start

    r, g = rdf_oo(o_frames, np.asarray(atoms.cell), r_max=length / 2)
    peak = float(r[np.argmax(g)])
    out = REPO / "benchmarks" / "out"
    out.mkdir(parents=True, exist_ok=True)
    plot = out / "default_model_rdf_oo.png"
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5, 3.5))
        ax.plot(r, g)
        ax.axvline(peak, color="0.6", lw=0.8)
        ax.set_xlabel("r (Å)")
        ax.set_ylabel("g_OO(r)")
        ax.set_title(f"default model, 64 H2O, 300 K, last {picoseconds / 2:g} ps")
        fig.tight_layout()
        fig.savefig(plot, dpi=120)
        plt.close(fig)
    except ImportError:
        plot = Path("(matplotlib not installed)")
    return {
        "ps": picoseconds,
        "steps": steps,
        "ms_per_step": 1e3 * seconds / steps,
        "mean_T": float(np.mean(temperatures[len(temperatures) // 2 :])),
        "max_oh": stats["max_oh"],
        "broken": stats["broken"],
        "min_pair": stats["min_pair"],
        "rdf_peak": peak,
        "rdf_peak_height": float(g.max()),
        "plot": str(plot),
    }


def main() -> None:
    from cace_server.server import default_model_path

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=default_model_path())
    parser.add_argument("--ps", type=float, default=10.0, help="length of the MD run")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    e = held_out_errors(args.model)
    print(f"model: {args.model}")
    print(f"held-out test set: {e['structures']} structures, {e['atoms']} atoms (GFN2-xTB labels)")
    print("| quantity | value | target |")
    print("|---|---|---|")
    print(f"| energy RMSE | {e['energy_rmse']:.2f} meV/atom | <= 2 |")
    print(f"| energy MAE | {e['energy_mae']:.2f} meV/atom | |")
    print(f"| force RMSE | {e['forces_rmse']:.1f} meV/Å | <= 60 |")
    print(f"| force MAE | {e['forces_mae']:.1f} meV/Å | |")
    print(f"| stress RMSE | {e['stress_rmse']:.2f} meV/Å^3 | |")
    sys.stdout.flush()

    md = run_md(args.model, args.ps, args.seed)
    print(
        f"\nNVT MD, 64 H2O, Langevin 300 K, 0.5 fs, {md['ps']:g} ps ({md['steps']} steps), "
        f"float32, {args.threads} threads"
    )
    print("| quantity | value | target |")
    print("|---|---|---|")
    print(f"| time per step | {md['ms_per_step']:.1f} ms | |")
    print(f"| mean temperature, 2nd half | {md['mean_T']:.0f} K | 300 |")
    print(f"| most O-H bonds broken at once (> 1.25 Å) | {md['broken']} | 0 |")
    print(f"| longest O-H seen | {md['max_oh']:.3f} Å | |")
    print(f"| closest pair seen | {md['min_pair']:.3f} Å | >= 0.8 |")
    print(
        f"| g_OO first peak | {md['rdf_peak']:.2f} Å "
        f"(height {md['rdf_peak_height']:.2f}) | 2.6-3.0 |"
    )
    print(f"RDF plot: {md['plot']}")


if __name__ == "__main__":
    main()
