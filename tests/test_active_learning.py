"""The active-learning loop of clients/examples/active_learning.py, two short rounds.

Real processes throughout: i-PI (2 beads), ``cace-server serve`` with the seed
committee, capture, ``cace-server label`` (GFN2-xTB through tblite), fine-tuning
with ``cace-server train --init-from --committee`` and a hot swap per round, on a
small subset of the bundled water data so that it takes a few minutes.
"""

from __future__ import annotations

import gzip
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "clients" / "examples" / "active_learning.py"


def _subset(source: Path, target: Path, frames: int) -> Path:
    """The first ``frames`` frames of an extended XYZ file."""
    with gzip.open(source, "rt") as f:
        lines = f.read().splitlines()
    out, k, taken = [], 0, 0
    while k < len(lines) and taken < frames:
        n = int(lines[k])
        out += lines[k : k + n + 2]
        k += n + 2
        taken += 1
    target.write_text("\n".join(out) + "\n")
    return target


@pytest.mark.slow
def test_two_rounds_of_the_loop_swap_in_fine_tuned_committees(tmp_path: Path) -> None:
    train = _subset(REPO / "data" / "water_gfn2_train.extxyz.gz", tmp_path / "train.extxyz", 12)
    valid = _subset(REPO / "data" / "water_gfn2_test.extxyz.gz", tmp_path / "valid.extxyz", 4)
    work = tmp_path / "al"
    proc = subprocess.run(
        [
            sys.executable, str(SCRIPT), "--workdir", str(work), "--rounds", "2",
            "--steps", "3", "--beads", "2", "--label", "1", "--epochs", "1",
            "--threshold", "0", "--train", str(train), "--valid", str(valid),
        ],
        capture_output=True, text=True, timeout=1200,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [
        line
        for line in proc.stdout.splitlines()
        if line.startswith("| 1 ") or line.startswith("| 2 ")
    ]
    assert len(rows) == 2, proc.stdout
    shas = [row.rstrip(" |").split("|")[-1].strip() for row in rows]
    assert len(set(shas)) == 2 and all(len(sha) == 12 for sha in shas), rows
    # every round labelled one more structure and wrote a calibrated committee
    labelled = [int(row.split("|")[4]) for row in rows]
    assert labelled == [1, 2], rows
    for r in (1, 2):
        committee = (work / f"round{r}" / "water.toml").read_text()
        assert "alpha" in committee and "[calibration]" in committee
