"""Speed and memory of CACE models on liquid water supercells, optionally side by side
with another revision of this repository.

Prints a markdown table: model, atoms, dtype, ms per energy+forces+stress call
(median of warm calls, neighbour list included; the biggest size is timed on its
first call), the same without the long-range term where the model has one, and the
peak resident memory of a fresh process that did only that case.

    python benchmarks/model.py                       # this tree, every case
    python benchmarks/model.py --against 19a9087     # 19a9087 and this tree, alternating
    python benchmarks/model.py --against main --cases cacefit --sizes 1,2 --dtypes float32

With ``--against REV``, REV is checked out into a temporary git worktree under /tmp
(removed afterwards) and every case runs in fresh processes, first with REV's code,
then with the working tree's, so both see the same machine load; the table gives
both times and their ratio. Each tree converts the original checkpoint with its own
importer; a case whose model one of them cannot convert is skipped with the reason.

With ``--compile``, a tree that has ``cace_server.model.compiled`` loads its models
with ``load_model(..., compile=True)``; a tree without it (a revision from before the
compiled call) runs them eagerly, and the table's mode column says which. ms/call
is still the median of the warm calls after the first. A compiled case runs in two
fresh processes on one fresh Inductor cache (TORCHINDUCTOR_CACHE_DIR): the first
process's first call compiles with a COLD cache; the second process's first call
finds it WARM (what a restarted server pays), and its warm calls are the ones timed.
Each of the two also evaluates its first structure with an eager model: |dE| (eV)
and |dF| (eV/A, largest component) are the larger of the two differences. A
compiled case is not timed without its long-range term (that is another shape to
compile); its peak RSS is the larger of its two processes'.

    python benchmarks/model.py --against ed084ff --compile --cases lr,cacefit,mp1 \
        --sizes 1,2 --dtypes float32 --calls 5

Cases (``--cases``): ``lr`` the reference CACE-LR water model (../shared/reference/
best_model.pth), ``cacefit`` the published cacefit water model (1 message-passing
layer), ``mp1`` the published cace-lr-fit water mp1 model (a CombinePotential of a
message-passing short-range model and a long-range one).
"""

from __future__ import annotations

import argparse
import json
import os
import runpy
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

REPO = Path(__file__).resolve().parents[1]
# Benchmarks are named after what they measure (ipi.py, http.py); their folder must
# not be on sys.path, or those names would shadow the packages they measure.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
REFERENCE = Path(os.environ.get("CACE_REFERENCE_DIR", REPO.parent / "shared" / "reference"))
if not REFERENCE.exists():
    REFERENCE = Path("/work/shared/reference")
PUBLISHED = REFERENCE / "published"

# Helpers of --against (benchmarks/_revisions.py), by path: this folder is not on sys.path.
revisions = SimpleNamespace(**runpy.run_path(str(Path(__file__).with_name("_revisions.py"))))

CASES = {
    "lr": REFERENCE / "best_model.pth",
    "cacefit": PUBLISHED / "BingqingCheng_cacefit_fit-water_best_model.pth",
    "mp1": PUBLISHED / "BingqingCheng_cace-lr-fit_fit-water_fit-water-mp1_best_model.pth",
}
# Warm calls per supercell repeat (many for small cells: one call is ~20 ms and the
# machine is noisy); larger ones are timed on their first call.
CALLS = {1: 30, 2: 8, 4: 2}


def convert_case(tree: str, case: str, out: str) -> None:
    revisions.use_tree(tree)
    import torch

    from cace_server.model import convert_original, save_model

    torch.set_num_threads(1)
    save_model(convert_original(CASES[case]), out)


def run_case(
    tree: str,
    model_path: str,
    repeat: int,
    dtype: str,
    threads: int,
    calls: int,
    long_range: str | None = None,
    compile: bool = False,
    first_only: bool = False,
) -> dict:
    revisions.use_tree(tree)
    import importlib.util
    import resource

    import ase
    import ase.io
    import numpy as np
    import torch

    torch.set_num_threads(threads)
    from cace_server.model import load_model
    from cace_server.structures import Structure

    # A tree from before the compiled call runs eagerly, and says so.
    compiled = compile and importlib.util.find_spec("cace_server.model.compiled") is not None

    def loaded(compiled: bool) -> Any:
        model = load_model(model_path, dtype=dtype, **({"compile": True} if compiled else {}))
        if long_range and hasattr(model, "configure_long_range"):
            model.configure_long_range(method=long_range)
        return model

    model = loaded(compiled)
    if compiled and first_only:
        calls = 0
    atoms = ase.io.read(REFERENCE / "liquid-64.xyz")
    assert isinstance(atoms, ase.Atoms)
    atoms.pbc = True
    structure = Structure.from_ase(atoms.repeat((repeat, repeat, repeat)))

    t0 = time.perf_counter()
    first = model.predict([structure])[0]
    first_s = time.perf_counter() - t0
    extra: dict = {"compiled": compiled}
    if compiled:
        from cace_server.model.compiled import total_stats

        stats = total_stats([m.compiled for m in model.modules() if getattr(m, "compiled", None)])
        reference = loaded(False).predict([structure])[0]
        extra.update(
            dE=abs(first.energy - reference.energy),
            dF=float(np.max(np.abs(np.asarray(first.forces) - np.asarray(reference.forces)))),
            compiles=stats.compiles,
            fallbacks=stats.fallbacks,
        )
    times, cpu = [], []
    prepared = model.prepare(structure)
    for _ in range(calls):
        t0, c0 = time.perf_counter(), time.process_time()
        prepared = model.prepare(structure)
        model.predict([prepared])
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    # The same call without the long-range term, to show what scales how: the
    # short-range part is linear in atoms, the reciprocal-space sum is not.
    sr_s = float("nan")
    if not compiled and getattr(model, "ewald", None) is not None:
        model.ewald = None
        sr_times = []
        for _ in range(max(calls, 1)):
            t0 = time.perf_counter()
            model.predict([prepared])
            sr_times.append(time.perf_counter() - t0)
        sr_s = statistics.median(sr_times)
    return {
        "atoms": len(structure),
        "pairs": prepared.n_pairs,
        "first_s": first_s,
        "median_s": statistics.median(times) if times else first_s,
        "cpu_s": statistics.median(cpu) if cpu else float("nan"),
        "sr_s": sr_s,
        "calls": len(times),
        "energy": first.energy,
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6,
        **extra,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--against", metavar="REV", help="also run REV, alternating processes")
    parser.add_argument("--cases", default="lr,cacefit,mp1", help=f"of {','.join(CASES)}")
    parser.add_argument("--sizes", default="1,2,4,8", help="supercell repeats of liquid-64")
    parser.add_argument("--dtypes", default="float32,float64")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--calls", type=int, help="warm calls per case (default: 30, 8, 2 by size, then 0)"
    )
    parser.add_argument(
        "--long-range",
        choices=("auto", "direct", "mesh"),
        help="Ewald back end of this tree's models (default: the model's, auto)",
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="compile the models of every tree that can (cold and warm Inductor cache)",
    )
    parser.add_argument("--worker", nargs=6, help=argparse.SUPPRESS)
    parser.add_argument("--first-only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--convert", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.convert:
        convert_case(*args.convert)
        print(json.dumps({"ok": True}))
        return
    if args.worker:
        tree, path, repeat, dtype, threads, calls = args.worker
        result = run_case(
            tree,
            path,
            int(repeat),
            dtype,
            int(threads),
            int(calls),
            args.long_range,
            args.compile,
            args.first_only,
        )
        print(json.dumps(result))
        return

    cases = args.cases.split(",")
    unknown = set(cases) - set(CASES)
    if unknown:
        parser.error(f"unknown cases {sorted(unknown)}; choose from {sorted(CASES)}")
    tmp = tempfile.mkdtemp(prefix="cace-bench-", dir="/tmp")
    try:
        trees = [("tree", str(REPO))]
        if args.against:
            path = str(Path(tmp) / "rev")
            trees.insert(0, (args.against, revisions.add_worktree(REPO, args.against, path)))
        rows = _measure(args, cases, trees, tmp)
    finally:
        if args.against:
            for _, path in trees[:1]:
                revisions.remove_worktree(REPO, path)
        shutil.rmtree(tmp, ignore_errors=True)
    _print(args, trees, rows)


def _measure(
    args: argparse.Namespace, cases: list[str], trees: list[tuple[str, str]], tmp: str
) -> list[dict]:
    rows = []
    for case in cases:
        models: dict[str, str] = {}
        skip = ""
        for label, path in trees:
            out = str(Path(tmp) / f"{case}-{len(models)}.safetensors")
            _, error = revisions.child(__file__, ["--convert", path, case, out])
            if error:
                skip = f"{label} cannot convert {CASES[case].name}: {error}"
                break
            models[label] = out
        if skip:
            print(f"skip {case}: {skip}", file=sys.stderr, flush=True)
            rows.append({"case": case, "skip": skip})
            continue
        for dtype in args.dtypes.split(","):
            for repeat in (int(s) for s in args.sizes.split(",")):
                row: dict = {"case": case, "dtype": dtype, "atoms": 192 * repeat**3}
                calls = CALLS.get(repeat, 0) if args.calls is None else args.calls
                for label, path in trees:
                    worker = [path, models[label], str(repeat), dtype, str(args.threads)]
                    row[label] = _run_worker(args, worker, calls, tmp)
                rows.append(row)
                print(
                    f"done {case} {dtype} {repeat}x{repeat}x{repeat}", file=sys.stderr, flush=True
                )
    return rows


def _run_worker(args: argparse.Namespace, worker: list[str], calls: int, tmp: str) -> dict:
    """One case of one tree in fresh processes: one eager; compiled, a first one on a
    fresh Inductor cache (the cold first call only) and a second on the same cache
    (the warm first call, then the timed calls)."""
    flags = ["--long-range", args.long_range] if args.long_range else []
    flags += ["--compile"] if args.compile else []
    cache = tempfile.mkdtemp(prefix="inductor-", dir=tmp)
    env = {"TORCHINDUCTOR_CACHE_DIR": cache}
    # A compiled first process stops after its first call; an eager one is the case.
    first, error = revisions.child(
        __file__, [*flags, "--first-only", "--worker", *worker, str(calls)], env
    )
    if first is None or not first.get("compiled"):
        return first if first is not None else {"error": error}
    warm, error = revisions.child(__file__, [*flags, "--worker", *worker, str(calls)], env)
    if warm is None:
        return {"error": f"warm cache: {error}"}
    return {
        **warm,
        "cold_first_s": first["first_s"],
        "dE": max(first["dE"], warm["dE"]),
        "dF": max(first["dF"], warm["dF"]),
        "cold_compiles": first["compiles"],
        "fallbacks": max(first["fallbacks"], warm["fallbacks"]),
        "peak_rss_gb": max(first["peak_rss_gb"], warm["peak_rss_gb"]),
    }


def _ms(r: dict, key: str = "median_s") -> str:
    if "error" in r:
        return f"failed: {r['error']}"
    v = r[key]
    if v != v:  # nan
        return "-"
    return f"{1e3 * v:,.0f}" + (" (first call)" if key == "median_s" and r["calls"] == 0 else "")


def _compile_cells(r: dict) -> list[str]:
    """Mode, cold and warm first call, |dE| and |dF| (an eager tree: its first call)."""
    if "error" in r:
        return ["-"] * 5
    if not r.get("compiled"):
        return ["eager", _ms(r, "first_s"), "-", "-", "-"]
    shapes = r["cold_compiles"]
    mode = f"compiled ({shapes} shape{'' if shapes == 1 else 's'})"
    if r["fallbacks"]:
        mode += f", {r['fallbacks']} served eagerly"
    return [mode, _ms(r, "cold_first_s"), _ms(r, "first_s"), f"{r['dE']:.1e}", f"{r['dF']:.1e}"]


def _print(args: argparse.Namespace, trees: list[tuple[str, str]], rows: list[dict]) -> None:
    print(f"\nCACE water models (liquid-64 supercells), E+F+S, {args.threads} threads, torch CPU\n")
    labels = [label for label, _ in trees]
    head = ["model", "atoms", "dtype"]
    for label in labels:
        if args.compile:
            head += [
                f"{label} mode",
                f"{label} first call, cold cache ms",
                f"{label} first call, warm cache ms",
                f"{label} max abs dE eV",
                f"{label} max abs dF eV/A",
            ]
        head += [f"{label} ms/call", f"{label} w/o long range ms", f"{label} peak RSS GB"]
    if len(labels) == 2:
        head += ["speed-up", "CPU-time speed-up"]
    head += ["us/atom (tree)"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for row in rows:
        if "skip" in row:
            print(f"| {row['case']} | skipped: {row['skip']} |" + " |" * (len(head) - 2))
            continue
        cells = [row["case"], f"{row['atoms']:,}", row["dtype"]]
        for label in labels:
            r = row[label]
            if args.compile:
                cells += _compile_cells(r)
            rss = f"{r['peak_rss_gb']:.2f}" if "error" not in r else "-"
            cells += [_ms(r), _ms(r, "sr_s") if "error" not in r else "-", rss]
        if len(labels) == 2:
            old, new = row[labels[0]], row[labels[1]]
            if "error" in old or "error" in new:
                cells += ["-", "-"]
            else:
                cells.append(f"{old['median_s'] / new['median_s']:.2f}x")
                ok = old["cpu_s"] == old["cpu_s"] and new["cpu_s"] == new["cpu_s"]
                cells.append(f"{old['cpu_s'] / new['cpu_s']:.2f}x" if ok else "-")
        new = row[labels[-1]]
        cells.append(f"{1e6 * new['median_s'] / row['atoms']:.0f}" if "error" not in new else "-")
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
