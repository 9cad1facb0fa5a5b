"""The price of a committee: one committee call against its members called one by one.

A committee of 4 members (``tests/data/committee/seed1..4``, the bundled water
architecture trained with four seeds) on liquid water of 192 and 1,536 atoms,
float32, energy + forces + stress and each member's forces and virials (what
i-PI's ``<ffcommittee>`` reads). Every call starts from a ``Structure`` (neighbour
list included), as a server call does. Cases are timed in rounds, each round
calling every case once in turn, so that all of them see the same machine load;
the table gives medians and the ratios the issue asks for:

- committee / sum of 4 member calls (4 servers, or 4 models in one process)
- committee / 1 member call (the price of uncertainty)
- the member loop inside one committee call (``Committee(shared=False)``), and the
  shared pass with the member axis a GPU uses (on the CPU it is slower; see
  ``cace_server/model/stacked.py``).

    python benchmarks/committee.py
    python benchmarks/committee.py --against 405108a   # also REV's code, fresh processes
    python benchmarks/committee.py --device cuda        # on a GPU (member axis by default)
"""

from __future__ import annotations

import argparse
import json
import runpy
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parents[1]
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
revisions = SimpleNamespace(**runpy.run_path(str(Path(__file__).with_name("_revisions.py"))))

MEMBERS = [REPO / "tests" / "data" / "committee" / f"seed{i}.safetensors" for i in range(1, 5)]
WATER = REPO / "data" / "water_gfn2_test.extxyz.gz"
# 96-atom test frames repeated to these sizes
SIZES = {192: (2, 1, 1), 1536: (4, 2, 2)}
ROUNDS = {192: 15, 1536: 4}
COMMITTEE_OUTPUTS = ["energy", "forces", "stress", "committee_forces", "committee_virials"]


def run_size(tree: str, atoms: int, threads: int, rounds: int, device: str) -> dict[str, float]:
    """Median seconds per call of each case, in this process, with ``tree``'s code."""
    revisions.use_tree(tree)
    import ase.io
    import torch

    from cace_server.model import load_model
    from cace_server.model.committee import Committee
    from cace_server.structures import Structure

    torch.set_num_threads(threads)
    frame = ase.io.read(str(WATER), index=0)
    structure = Structure.from_ase(frame.repeat(SIZES[atoms]))
    members = [load_model(p, dtype="float32", device=device) for p in MEMBERS]
    shared = Committee(members, names=[p.stem for p in MEMBERS])
    loop = Committee(members, names=[p.stem for p in MEMBERS], shared=False)
    stacked = Committee(members, names=[p.stem for p in MEMBERS])
    if stacked.shared is not None:  # the member axis a GPU uses, forced on the CPU
        stacked.shared.stack = True
    cases = {
        "committee": lambda: shared.predict([structure], COMMITTEE_OUTPUTS),
        "member axis": lambda: stacked.predict([structure], COMMITTEE_OUTPUTS),
        "member loop": lambda: loop.predict([structure], COMMITTEE_OUTPUTS),
        "4 members": lambda: [
            m.predict([structure], ["energy", "forces", "stress"]) for m in members
        ],
        "1 member": lambda: members[0].predict([structure], ["energy", "forces", "stress"]),
    }
    for call in cases.values():  # warm-up
        call()
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(rounds):
        for name, call in cases.items():
            start = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--against", metavar="REV", help="also run REV, alternating processes")
    parser.add_argument("--sizes", default="192,1536", help=f"of {','.join(map(str, SIZES))}")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, help="timed rounds (default 15 at 192, 4 at 1536)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--worker", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        tree, atoms, threads, rounds, device = args.worker
        print(json.dumps(run_size(tree, int(atoms), int(threads), int(rounds), device)))
        return
    sizes = [int(s) for s in args.sizes.split(",")]
    tmp = tempfile.mkdtemp(prefix="cace-bench-", dir="/tmp")
    trees = [("tree", str(REPO))]
    try:
        if args.against:
            path = revisions.add_worktree(REPO, args.against, str(Path(tmp) / "rev"))
            trees.insert(0, (args.against, path))
        rows = []
        for atoms in sizes:
            rounds = args.rounds or ROUNDS[atoms]
            for label, path in trees:
                worker = [path, str(atoms), str(args.threads), str(rounds), args.device]
                result, error = revisions.child(__file__, ["--worker", *worker])
                rows.append((label, atoms, result, error))
                print(f"done {label} {atoms} atoms", file=sys.stderr, flush=True)
    finally:
        if args.against:
            revisions.remove_worktree(REPO, trees[0][1])
        shutil.rmtree(tmp, ignore_errors=True)
    print(
        f"\nCommittee of 4 CACE water members, float32, E+F+S + per-member forces/virials, "
        f"{args.threads} threads, torch on {args.device} (medians, ms per call)\n"
    )
    print(
        "| code | atoms | committee | member axis | member loop | 4 members | 1 member "
        "| committee / 4 members | committee / 1 member |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for label, atoms, r, error in rows:
        if r is None:
            print(f"| {label} | {atoms} | failed: {error} |")
            continue
        ms = {k: f"{1e3 * v:,.1f}" for k, v in r.items()}
        print(
            f"| {label} | {atoms} | {ms['committee']} | {ms['member axis']} | {ms['member loop']} "
            f"| {ms['4 members']} "
            f"| {ms['1 member']} | {r['committee'] / r['4 members']:.2f} "
            f"| {r['committee'] / r['1 member']:.2f} |"
        )


if __name__ == "__main__":
    main()
