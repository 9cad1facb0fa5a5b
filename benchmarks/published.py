"""Coverage of the published CACE models, and a CombinePotential next to its parts.

    python benchmarks/published.py              # coverage table (float64), ~5 min
    python benchmarks/published.py --float32    # and the float32 comparison
    python benchmarks/published.py --speed-only

Coverage: every checkpoint in ../shared/reference/published is converted and
evaluated on the original's two test structures; the table gives per family the
number of files, how many convert, how many match within issue 10's tolerances,
and the largest deviation of each quantity. Each checkpoint of
../shared/reference/synthetic (corners no published file covers: a cutoff float32
cannot represent, a head reading a per-atom input) adds a row of its own.

Speed: a CombinePotential long-range model computes its one representation once
for both sub-models; next to it, the same heads split into two models that each
compute the representation (what evaluating the original's sub-models separately
costs). Energy + forces + stress of liquid water, warm calls, median.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# This folder's http.py / ipi.py would shadow the real packages.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from cace_server.model import convert_original  # noqa: E402
from cace_server.model.convert import finalize  # noqa: E402
from cace_server.model.potential import CACEPotential  # noqa: E402
from cace_server.structures import Structure  # noqa: E402
from tests.conftest import REFERENCE_DIR  # noqa: E402
from tests.published_support import compare_checkpoint, model_names, summary_table  # noqa: E402

PUBLISHED = REFERENCE_DIR / "published"
SYNTHETIC = REFERENCE_DIR / "synthetic"
COMBINE = "BingqingCheng_cace-lr-fit_fit-water_fit-water-mp1_best_model.pth"


def coverage(float32: bool) -> None:
    results = []
    for name in model_names(PUBLISHED):
        r = compare_checkpoint(PUBLISHED, name, float32=float32)
        results.append(r)
        if not r.ok:
            print(f"  not matching: {name}: {r.error or r.deviations}", flush=True)
    if SYNTHETIC.is_dir():
        for name in model_names(SYNTHETIC):
            r = compare_checkpoint(SYNTHETIC, name, float32=float32)
            r.family = f"synthetic: {name.removesuffix('.pth')} ({r.family})"
            results.append(r)
            if not r.ok:
                print(f"  not matching: synthetic {name}: {r.error or r.deviations}", flush=True)
    label = "float32 (tolerance 2e-3)" if float32 else "float64"
    print(f"\n{label}: {sum(r.ok for r in results)}/{len(results)} match\n")
    print(summary_table(results))


def part(model: CACEPotential, keep_long_range: bool) -> CACEPotential:
    """The model with only its short-range heads, or only its long-range head."""
    config = copy.deepcopy(model.config)
    if keep_long_range:
        config.readouts = [r for r in config.readouts if r.kind == "charge"]
    else:
        config.readouts = [r for r in config.readouts if r.kind == "energy"]
        config.ewald = None
    piece = CACEPotential(config).to(model.dtype)
    piece.load_state_dict(model.state_dict(), strict=False)
    return finalize(piece, dtype=None, device=model.device)


def timed(fn, repeats: int) -> float:
    fn()
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def speed(repeats: int) -> None:
    from ase.io import read

    atoms = read(REFERENCE_DIR / "liquid-64.xyz")
    print(
        "\n| model | dtype | atoms | combined ms | SR part ms | LR part ms | parts sum ms "
        "| combined / sum |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for dtype in ("float32", "float64"):
        model = convert_original(PUBLISHED / COMBINE, dtype=dtype)
        short, long = part(model, False), part(model, True)
        for reps in ((1, 1, 1), (2, 2, 2)):
            structure = Structure.from_ase(atoms.repeat(reps))
            t = [
                timed(lambda m=m, s=structure: m.predict([s]), repeats) * 1e3
                for m in (model, short, long)
            ]
            print(
                f"| fit-water-mp1 (CombinePotential) | {dtype} | {len(structure)} | {t[0]:.0f} | "
                f"{t[1]:.0f} | {t[2]:.0f} | {t[1] + t[2]:.0f} | {t[0] / (t[1] + t[2]):.2f} |"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--float32", action="store_true", help="also compare in float32")
    parser.add_argument("--speed-only", action="store_true")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if not (PUBLISHED / "manifest.json").exists():
        sys.exit(f"published models not found at {PUBLISHED}")
    if not args.speed_only:
        coverage(False)
        if args.float32:
            coverage(True)
    if (PUBLISHED / COMBINE).exists():
        speed(args.repeats)


if __name__ == "__main__":
    main()
