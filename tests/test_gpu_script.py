"""benchmarks/gpu.sh refuses to run, loudly, where torch sees no GPU."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_gpu_script_fails_without_a_gpu() -> None:
    proc = subprocess.run(
        ["bash", str(REPO / "benchmarks" / "gpu.sh")],
        capture_output=True,
        text=True,
        timeout=120,
        env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable},
    )
    assert proc.returncode == 1
    assert "error: torch sees no CUDA device" in proc.stderr
