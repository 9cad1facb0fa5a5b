"""Training speed on the bundled water data set: seconds per epoch.

    python benchmarks/train.py [--epochs 2] [--threads 2]
    python benchmarks/train.py --against 19a9087 --mp 1 --structures 16

Uses the settings of data/water_train.toml (the bundled model's), a few epochs
each, and prints one row per variant: dtype, structures per step, seconds per
epoch (training + validation), and milliseconds per training structure. ``--mp N``
trains a model with N message-passing layers instead; ``--structures N`` takes the
first N training structures (and a quarter as many for validation) so that a slow
revision still finishes.

With ``--against REV``, REV is checked out into a temporary git worktree under /tmp
(removed afterwards) and each variant is trained in fresh processes, first with
REV's code and then with the working tree's; the table gives both and the ratio.
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
if sys.path and Path(sys.path[0]).resolve() == HERE:
    sys.path.pop(0)  # this folder's ipi.py / http.py would shadow the real packages

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import runpy  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from types import SimpleNamespace  # noqa: E402

REPO = HERE.parent

# Helpers of --against (benchmarks/_revisions.py), by path: this folder is not on sys.path.
revisions = SimpleNamespace(**runpy.run_path(str(Path(__file__).with_name("_revisions.py"))))


def train_variant(
    tree: str, dtype: str, batch: int, args: argparse.Namespace, tmp: str
) -> dict[str, float]:
    revisions.use_tree(tree)
    import torch

    from cace_server.train import DataKeys, TrainConfig, Trainer, read_labelled, split

    torch.set_num_threads(args.threads)
    os.chdir(tree)
    toml = Path(tree) / "data" / "water_train.toml"
    base = TrainConfig.load(toml, threads=args.threads)
    data = read_labelled(base.train_files, DataKeys())
    train, valid = split(data, base.valid_fraction, base.seed)
    if args.structures:
        train, valid = train[: args.structures], valid[: max(1, args.structures // 4)]
    cfg = TrainConfig.load(
        toml,
        threads=args.threads,
        dtype=dtype,
        batch_size=batch,
        epochs=args.epochs,
        early_stopping=0,
        num_message_passing=args.mp,
        output=f"{tmp}/m.safetensors",
        checkpoint=f"{tmp}/m.pt",
    )
    trainer = Trainer(cfg, train, valid, log=lambda _: None)
    start = time.perf_counter()
    trainer.run()
    per_epoch = (time.perf_counter() - start) / args.epochs
    return {
        "s_per_epoch": per_epoch,
        "structures": len(train),
        "atoms": sum(d.n_atoms for d in train),
        "valid": len(valid),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--mp", type=int, default=0, help="message-passing layers")
    parser.add_argument("--structures", type=int, default=0, help="first N (0: all)")
    parser.add_argument("--variants", default="", help="dtype:batch,... (default: a set)")
    parser.add_argument("--against", metavar="REV", help="also run REV, alternating processes")
    parser.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        tree, dtype, batch = args.worker
        with tempfile.TemporaryDirectory() as tmp:
            print(json.dumps(train_variant(tree, dtype, int(batch), args, tmp)))
        return

    if args.variants:
        variants = [(v.split(":")[0], int(v.split(":")[1])) for v in args.variants.split(",")]
    elif args.against:
        variants = [("float32", 2)]
    else:
        variants = [("float32", 2), ("float32", 1), ("float32", 8), ("float64", 2)]
    common = ["--epochs", str(args.epochs), "--threads", str(args.threads), "--mp", str(args.mp)]
    common += ["--structures", str(args.structures)]
    tmp = tempfile.mkdtemp(prefix="cace-train-bench-", dir="/tmp")
    trees = [("tree", str(REPO))]
    try:
        if args.against:
            path = str(Path(tmp) / "rev")
            revisions.add_worktree(REPO, args.against, path)
            trees.insert(0, (args.against, path))
        rows = []
        for dtype, batch in variants:
            row: dict = {"dtype": dtype, "batch": batch}
            for label, path in trees:
                result, error = revisions.child(
                    __file__, ["--worker", path, dtype, str(batch), *common]
                )
                row[label] = result if result is not None else {"error": error}
            rows.append(row)
            print(f"done {dtype} batch {batch}", file=sys.stderr, flush=True)
    finally:
        if args.against:
            revisions.remove_worktree(REPO, trees[0][1])
        shutil.rmtree(tmp, ignore_errors=True)

    labels = [label for label, _ in trees]
    first = next((r[labels[-1]] for r in rows if "error" not in r[labels[-1]]), None)
    if first:
        print(
            f"\ndata: {first['structures']} training structures ({first['atoms']} atoms), "
            f"{first['valid']} validation; {args.mp} message-passing layer(s); "
            f"{args.threads} threads, {args.epochs} epoch(s) each\n"
        )
    head = ["dtype", "batch"]
    for label in labels:
        head += [f"{label} s/epoch", f"{label} ms per structure"]
    if len(labels) == 2:
        head.append("speed-up")
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for row in rows:
        cells = [row["dtype"], str(row["batch"])]
        for label in labels:
            r = row[label]
            if "error" in r:
                cells += [f"failed: {r['error']}", "-"]
            else:
                cells += [
                    f"{r['s_per_epoch']:.1f}",
                    f"{1e3 * r['s_per_epoch'] / r['structures']:.0f}",
                ]
        if len(labels) == 2:
            old, new = row[labels[0]], row[labels[1]]
            ok = "error" not in old and "error" not in new
            cells.append(f"{old['s_per_epoch'] / new['s_per_epoch']:.2f}x" if ok else "-")
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
