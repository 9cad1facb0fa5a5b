"""Shared fixtures: the reference data of ../shared/reference and converted models."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

REFERENCE_DIR = Path(
    os.environ.get(
        "CACE_REFERENCE_DIR", Path(__file__).resolve().parents[2] / "shared" / "reference"
    )
)

torch.set_num_threads(min(2, torch.get_num_threads()))


def reference_file(name: str) -> Path:
    path = REFERENCE_DIR / name
    if not path.exists():
        pytest.skip(f"reference data {path} not present (set CACE_REFERENCE_DIR)")
    return path


def converted_published(name: str, directory: Path) -> Path:
    """A checkpoint of ``published/`` converted to our format (float64) by our importer.

    Skips when the reference data is absent, or while the importer refuses the file.
    """
    from cace_server.model import convert_original, save_model
    from cace_server.model.checkpoint import UnsupportedCheckpointError

    path = reference_file(f"published/{name}")
    try:
        model = convert_original(path, dtype="float64")
    except UnsupportedCheckpointError as exc:
        pytest.skip(f"{name}: the importer refuses it: {exc}")
    return save_model(model, directory / f"{Path(name).stem}.safetensors")


@pytest.fixture(scope="session")
def water_model_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The reference water CACE-LR model converted to our native format (float64)."""
    from cace_server.model import convert_original, save_model

    model = convert_original(reference_file("best_model.pth"), dtype="float64")
    return save_model(model, tmp_path_factory.mktemp("models") / "water.safetensors")


@pytest.fixture(scope="session")
def water_model(water_model_file: Path):
    from cace_server.model import load_model

    return load_model(water_model_file, dtype="float64")


@pytest.fixture(scope="session")
def liquid_water():
    """liquid-64: 64 water molecules, periodic cubic box (ase.Atoms)."""
    import ase.io

    atoms = ase.io.read(reference_file("liquid-64.xyz"))
    atoms.pbc = True
    return atoms


@pytest.fixture(scope="session")
def inductor_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Inductor's on-disk cache for every compile of a test session (a graph compiled
    twice is reloaded the second time). An already set TORCHINDUCTOR_CACHE_DIR is
    kept, so a developer can reuse one cache across runs."""
    key = "TORCHINDUCTOR_CACHE_DIR"
    before = os.environ.get(key)
    if before is None:
        os.environ[key] = str(tmp_path_factory.mktemp("inductor"))
    try:
        yield os.environ[key]
    finally:
        if before is None:
            os.environ.pop(key, None)


@pytest.fixture
def socket_dir() -> Iterator[str]:
    """A short private directory for UNIX sockets (sun_path holds only 108 bytes)."""
    path = tempfile.mkdtemp(prefix="ipi", dir="/tmp")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def ipi_runs() -> Iterator[list[Any]]:
    """Every i-PI started through this list is stopped (and its socket removed) afterwards."""
    runs: list[Any] = []
    yield runs
    for run in runs:
        run.stop()
