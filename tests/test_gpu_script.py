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


def test_compiled_rows_use_real_serve_flags() -> None:
    """The flags that give benchmarks/ipi.py's (and so gpu.py's) servers a compiled
    model are flags of ``cace-server serve``, with values it takes."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("cace_ipi_bench", REPO / "benchmarks/ipi.py")
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    template = Path("/tmp/water.extxyz")
    flags = bench.compile_flags(Path("/tmp/cache"), template, 32, "reduce-overhead")
    assert bench.compile_flags(None, template, 32) == []
    assert flags[flags.index("--compile-warmup") + 1] == f"{template}:32"
    usage = subprocess.run(
        [sys.executable, "-m", "cace_server.cli", "serve", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    for flag in [f for f in flags if f.startswith("--")]:
        assert f"{flag} " in usage, flag
    assert "reduce-overhead" in usage
    command = bench.server_command(
        "m.safetensors", "float32", template, 1, 4, "unix", compile=flags
    )
    assert command[-len(flags) :] == flags
