"""The water model that ships with the package: present, traceable, and sound."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cace_server.model import load_model
from cace_server.model.io import file_digest, read_metadata
from cace_server.server import default_model_path
from cace_server.structures import Structure
from cace_server.train import DataKeys, read_labelled
from cace_server.train.report import dataset_errors

REPO = Path(__file__).resolve().parents[1]
TRAIN = REPO / "data" / "water_gfn2_train.extxyz.gz"
TEST = REPO / "data" / "water_gfn2_test.extxyz.gz"


def test_bundled_model_is_installed_and_records_its_training():
    path = default_model_path()
    assert path.is_file(), "cace_server/data/water.safetensors is missing from the package"
    meta = read_metadata(path)
    assert meta["config"]["elements"] == [1, 8]
    training = meta["extra"]["training"]
    # The model names the exact data it was fitted to: the committed training file.
    assert training["data_sha256"] == file_digest(TRAIN)
    assert training["train_files"] == ["data/water_gfn2_train.extxyz.gz"]
    assert training["errors"]["valid"]["forces_rmse"] < 80.0


def test_bundled_model_on_held_out_boxes():
    """A quick look at a few held-out boxes (the full table: benchmarks/default_model.py)."""
    model = load_model(default_model_path(), dtype="float64")
    data = read_labelled([TEST], DataKeys())[::8]
    summary = dataset_errors(model, data).summary()
    assert summary["energy_rmse"] < 3.0  # meV/atom
    assert summary["forces_rmse"] < 80.0  # meV/Å


def test_bundled_model_refuses_other_elements():
    model = load_model(default_model_path())
    methane = Structure.create([6, 1, 1, 1, 1], np.zeros((5, 3)) + np.arange(5)[:, None])
    with pytest.raises(ValueError, match=r"C \(Z=6\) not supported by this model \(it knows H, O"):
        model.predict([methane])
