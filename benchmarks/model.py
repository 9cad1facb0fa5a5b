"""Speed and memory of the CACE model on liquid water supercells.

Prints a markdown table: atoms, dtype, ms per energy+forces+stress call (median of
warm calls, neighbour list included), the neighbour-list share, the first (cold)
call, and the peak resident memory of a process that did only that case.

    python benchmarks/model.py        # 1x1x1, 2x2x2, 4x4x4, 8x8x8 in float32 and float64
    python benchmarks/model.py --sizes 1,2 --dtypes float32 --threads 2

By default the model is the reference water CACE-LR model (../shared/reference/
best_model.pth), converted on the fly; --model takes a native model file instead.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Benchmarks are named after what they measure (ipi.py, http.py); their folder must
# not be on sys.path, or those names would shadow the packages they measure.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
REFERENCE = Path(os.environ.get("CACE_REFERENCE_DIR", REPO.parent / "shared" / "reference"))

# The original implementation on this machine (2 threads, torch 2.13), from
# ../shared/reference/README.md: seconds per call and peak RSS (GB), float32.
ORIGINAL = {
    (192, "float32"): (0.126, 0.85),
    (1536, "float32"): (1.92, 2.9),
    (12288, "float32"): (50.4, 21.0),
    (192, "float64"): (0.306, None),
    (1536, "float64"): (2.52, None),
    (12288, "float64"): (None, None),  # out of memory at 24 GB
}


def run_case(model_path: str, repeat: int, dtype: str, threads: int, calls: int) -> dict:
    import ase.io
    import torch

    torch.set_num_threads(threads)
    from cace_server.model import load_model
    from cace_server.structures import Structure

    model = load_model(model_path, dtype=dtype)
    atoms = ase.io.read(REFERENCE / "liquid-64.xyz")
    atoms.pbc = True
    structure = Structure.from_ase(atoms.repeat((repeat, repeat, repeat)))

    t0 = time.perf_counter()
    first = model.predict([structure])[0]
    first_s = time.perf_counter() - t0
    times, nl_times = [], []
    for _ in range(calls):
        t0 = time.perf_counter()
        prepared = model.prepare(structure)
        t1 = time.perf_counter()
        model.predict([prepared])
        times.append(time.perf_counter() - t0)
        nl_times.append(t1 - t0)
    # The same call without the long-range term, to show what scales how: the
    # short-range part is linear in atoms, the reciprocal-space sum is not.
    sr_s = float("nan")
    if model.ewald is not None and calls:
        model.ewald = None
        sr_times = []
        for _ in range(calls):
            t0 = time.perf_counter()
            model.predict([prepared])
            sr_times.append(time.perf_counter() - t0)
        sr_s = statistics.median(sr_times)
    return {
        "sr_s": sr_s,
        "atoms": len(structure),
        "pairs": model.prepare(structure).n_pairs if calls == 0 else prepared.n_pairs,
        "dtype": dtype,
        "first_s": first_s,
        "median_s": statistics.median(times) if times else first_s,
        "nl_s": statistics.median(nl_times) if nl_times else float("nan"),
        "calls": len(times),
        "energy": first.energy,
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6,
    }


def default_model(tmp: str) -> str:
    from cace_server.model import convert_original, save_model

    path = Path(tmp) / "water.safetensors"
    save_model(convert_original(REFERENCE / "best_model.pth"), path)
    return str(path)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model", help="native model file (default: converted reference water model)"
    )
    parser.add_argument("--sizes", default="1,2,4,8", help="supercell repeats of liquid-64")
    parser.add_argument("--dtypes", default="float32,float64")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--one", nargs=3, metavar=("REPEAT", "DTYPE", "CALLS"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()

    if args.one:
        repeat, dtype, calls = int(args.one[0]), args.one[1], int(args.one[2])
        print(json.dumps(run_case(args.model, repeat, dtype, args.threads, calls)))
        return

    with tempfile.TemporaryDirectory() as tmp:
        model_path = args.model or default_model(tmp)
        rows = []
        for dtype in args.dtypes.split(","):
            for repeat in (int(s) for s in args.sizes.split(",")):
                # Fewer warm calls for the big cases; 8x8x8 is timed on its first call.
                calls = {1: 10, 2: 5, 4: 2}.get(repeat, 0)
                cmd = [
                    sys.executable,
                    __file__,
                    "--model",
                    model_path,
                    "--threads",
                    str(args.threads),
                    "--one",
                    str(repeat),
                    dtype,
                    str(calls),
                ]
                proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
                if proc.returncode != 0:
                    rows.append(
                        {
                            "atoms": 192 * repeat**3,
                            "dtype": dtype,
                            "error": proc.stderr.strip().splitlines()[-1],
                        }
                    )
                else:
                    rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
                print(f"done {dtype} {repeat}x{repeat}x{repeat}", file=sys.stderr, flush=True)

    print(f"\nCACE water model (liquid-64 supercells), {args.threads} threads, torch CPU\n")
    print(
        "| atoms | pairs | dtype | ms/call (E+F+S) | of which neighbour list | without Ewald ms "
        "| first call ms | us/atom | peak RSS GB | original s/call | speed-up |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['atoms']:,} | | {r['dtype']} | failed: {r['error']} | | | | | | | |")
            continue
        orig = ORIGINAL.get((r["atoms"], r["dtype"]), (None, None))[0]
        speed = f"{orig / r['median_s']:.1f}x" if orig else "-"
        timed = "(first call)" if r["calls"] == 0 else ""
        per_atom_us = 1e6 * r["median_s"] / r["atoms"]
        print(
            f"| {r['atoms']:,} | {r['pairs']:,} | {r['dtype']} | {1e3 * r['median_s']:.0f} {timed}"
            f"| {1e3 * r['nl_s']:.0f} | {1e3 * r['sr_s']:.0f} | {1e3 * r['first_s']:.0f} "
            f"| {per_atom_us:.0f} "
            f"| {r['peak_rss_gb']:.2f} | {orig if orig else '-'} | {speed} |"
        )


if __name__ == "__main__":
    main()
