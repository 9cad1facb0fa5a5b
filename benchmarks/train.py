"""Training speed on the default water data set: seconds per epoch.

    python benchmarks/train.py [--epochs 2] [--threads 2]

Uses the settings of data/water_train.toml (the bundled model's), a few epochs
each, and prints one row per variant: dtype, structures per step, seconds per
epoch (training + validation), and milliseconds per training structure.
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
if sys.path and Path(sys.path[0]).resolve() == HERE:
    sys.path.pop(0)  # this folder's ipi.py / http.py would shadow the real packages

import argparse  # noqa: E402
import os  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

from cace_server.train import DataKeys, TrainConfig, Trainer, read_labelled, split  # noqa: E402

REPO = HERE.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.chdir(REPO)

    base = TrainConfig.load(REPO / "data" / "water_train.toml", threads=args.threads)
    data = read_labelled(base.train_files, DataKeys())
    train, valid = split(data, base.valid_fraction, base.seed)
    atoms = sum(d.n_atoms for d in train)
    print(f"data: {len(train)} training structures ({atoms} atoms), {len(valid)} validation")
    print(f"torch {torch.__version__}, {args.threads} threads, {args.epochs} epochs each")
    print("| dtype | batch | s/epoch | ms per structure | ms per 1000 atoms |")
    print("|---|---|---|---|---|")
    variants = [
        ("float32", base.batch_size),
        ("float32", 1),
        ("float32", 8),
        ("float64", base.batch_size),
    ]
    with tempfile.TemporaryDirectory() as tmp:
        for dtype, batch in variants:
            cfg = TrainConfig.load(
                REPO / "data" / "water_train.toml",
                threads=args.threads,
                dtype=dtype,
                batch_size=batch,
                epochs=args.epochs,
                early_stopping=0,
                output=f"{tmp}/m.safetensors",
                checkpoint=f"{tmp}/m.pt",
            )
            trainer = Trainer(cfg, train, valid, log=lambda _: None)
            start = time.perf_counter()
            trainer.run()
            per_epoch = (time.perf_counter() - start) / args.epochs
            print(
                f"| {dtype} | {batch} | {per_epoch:.1f} | {1e3 * per_epoch / len(train):.0f} "
                f"| {1e6 * per_epoch / atoms:.0f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
