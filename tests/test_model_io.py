"""Native model files: round trip, metadata, and refusal of bad files."""

from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors.torch import load_file, save_file

from cace_server.model import ModelFileError, load_model, random_model, read_metadata, save_model
from cace_server.structures import Structure


@pytest.fixture
def structure():
    rng = np.random.default_rng(0)
    return Structure.create([8, 1, 1, 8, 1, 1], rng.random((6, 3)) * 4, np.eye(3) * 4.5, True)


def test_roundtrip_is_exact(tmp_path, structure):
    model = random_model(seed=7, long_range=True, num_message_passing=1)
    path = save_model(model, tmp_path / "m.safetensors", {"note": "test"})
    loaded = load_model(path)
    a, b = model.predict([structure])[0], loaded.predict([structure])[0]
    assert a.energy == b.energy
    np.testing.assert_array_equal(a.forces, b.forces)
    meta = read_metadata(path)
    assert meta["format"] == "cace-server-model" and meta["format_version"] == "1"
    assert meta["config"]["elements"] == [1, 8]
    assert meta["extra"] == {"note": "test"}


def test_dtype_and_device_are_load_options(tmp_path, structure):
    path = save_model(random_model(seed=1), tmp_path / "m.safetensors")
    m32 = load_model(path, dtype="float32", device="cpu")
    assert str(m32.dtype) == "torch.float32"
    assert np.isfinite(m32.predict([structure])[0].energy)


def test_edited_weights_are_refused(tmp_path):
    path = save_model(random_model(seed=1), tmp_path / "m.safetensors")
    tensors = load_file(str(path))
    meta = dict(read_metadata(path))
    tensors["representation.radial_mixing"] = tensors["representation.radial_mixing"] * 1.01
    raw_meta = {k: (json.dumps(v) if isinstance(v, dict) else v) for k, v in meta.items()}
    save_file(tensors, str(path), metadata=raw_meta)
    with pytest.raises(ModelFileError, match="checksum"):
        load_model(path)


def test_foreign_and_future_files_are_refused(tmp_path):
    other = tmp_path / "other.safetensors"
    import torch

    save_file({"x": torch.zeros(2)}, str(other), metadata={"format": "pt"})
    with pytest.raises(ModelFileError, match="not a cace-server model"):
        load_model(other)
    future = tmp_path / "future.safetensors"
    save_file(
        {"x": torch.zeros(2)},
        str(future),
        metadata={"format": "cace-server-model", "format_version": "99", "config": "{}"},
    )
    with pytest.raises(ModelFileError, match="newer"):
        load_model(future)
    with pytest.raises(ModelFileError, match="does not exist"):
        load_model(tmp_path / "missing.safetensors")
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 100)
    with pytest.raises(ModelFileError, match="not a readable"):
        load_model(garbage)


def test_saved_model_is_readable_by_others(tmp_path):
    """safetensors writes 0600; model files must be shareable (containers, volumes)."""
    import os
    import stat

    from cace_server.model import save_model
    from cace_server.model.build import random_model

    old = os.umask(0o022)
    try:
        path = save_model(random_model(), tmp_path / "m.safetensors")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
