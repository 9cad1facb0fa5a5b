"""The real i-PI at constant pressure through ``cace-server serve``: the conserved
quantity jumps where the original's k-set changes (parity mode), never in smooth mode.

Both runs start from liquid-64 relaxed in a cell just below the side where 36 vectors
enter the k-set; the box expands through it within the run (at step ~70 of 0.25 fs).
``benchmarks/npt.py`` runs the same for 600 steps and prints drift and step changes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.npt_support import NptRun, near_crossing, parity_k_count, relaxed_water

pytestmark = pytest.mark.slow

STEPS = 120
SPIKE = 4.0  # a step's change over the median change around it that counts as a jump


def test_npt_conserved_quantity_jumps_only_in_parity_mode(
    tmp_path: Path, socket_dir: str, water_model_file: Path, liquid_water
) -> None:
    atoms = relaxed_water(near_crossing(liquid_water, -0.002), water_model_file)
    runs = [
        NptRun(tmp_path / mode, socket_dir, atoms, water_model_file, mode, steps=STEPS)
        for mode in ("parity", "smooth")
    ]
    try:
        for run in runs:
            run.start()
        parity, smooth = (run.result(timeout=3600) for run in runs)
    finally:
        for run in runs:
            run.stop()
    assert parity.steps == smooth.steps == STEPS
    # the parity run crossed the k-set change, and its conserved quantity jumped there
    counts = [parity_k_count(v ** (1 / 3)) for v in parity.volume]
    crossings = np.nonzero(np.diff(counts))[0]
    assert len(crossings) >= 1, parity.volume
    assert max(parity.spikes()[crossings]) > SPIKE, parity.spikes()[crossings]
    # smooth mode: no step far above its neighbours anywhere
    assert smooth.spikes().max() < SPIKE, smooth.spikes()
