"""Native model files: round trip, metadata, and refusal of bad files."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from cace_server.model import ModelFileError, load_model, random_model, read_metadata, save_model
from cace_server.model.io import CONTENT_KEY, ModelFilePolicy, check_integrity
from cace_server.structures import Structure

CLI = [sys.executable, "-m", "cace_server.cli"]


def rewrite_metadata(path: Path, edit: Callable[[dict[str, str]], None]) -> None:
    """Edit a model file's metadata strings in place, keeping its weights."""
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
    tensors = load_file(str(path))
    edit(meta)
    save_file(tensors, str(path), metadata=meta)


def set_config(key: str, value: object) -> Callable[[dict[str, str]], None]:
    def edit(meta: dict[str, str]) -> None:
        config = json.loads(meta["config"])
        config[key] = value
        meta["config"] = json.dumps(config, sort_keys=True)

    return edit


def make_legacy(meta: dict[str, str]) -> None:
    """What format version 1 wrote: no checksum over the metadata."""
    meta["format_version"] = "1"
    del meta[CONTENT_KEY]


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
    assert meta["format"] == "cace-server-model" and meta["format_version"] == "2"
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


@pytest.mark.parametrize(
    "edit",
    [set_config("cutoff", 4.5), set_config("elements", [1, 6])],
    ids=["cutoff", "elements"],
)
def test_edited_config_is_refused(tmp_path, edit):
    path = save_model(random_model(seed=1), tmp_path / "m.safetensors")
    assert check_integrity(path).status == "verified"
    rewrite_metadata(path, edit)
    with pytest.raises(ModelFileError, match="metadata checksum mismatch: the config"):
        load_model(path)


def test_version_2_without_its_checksum_is_refused(tmp_path):
    path = save_model(random_model(seed=1), tmp_path / "m.safetensors")
    rewrite_metadata(path, lambda meta: meta.pop(CONTENT_KEY))
    with pytest.raises(ModelFileError, match=f"no {CONTENT_KEY}"):
        load_model(path)


def test_legacy_files_load_with_their_weights_verified(tmp_path, structure, caplog):
    """When allowed (refused by default: tests/test_model_signing.py)."""
    allowed = ModelFilePolicy(allow_legacy=True)
    model = random_model(seed=3)
    path = save_model(model, tmp_path / "m.safetensors")
    rewrite_metadata(path, make_legacy)
    integrity = check_integrity(path, policy=allowed)
    assert (integrity.status, integrity.format_version) == ("legacy", 1)
    assert "config not covered" in integrity.detail
    with caplog.at_level("WARNING", logger="cace_server.model"):
        loaded = load_model(path, policy=allowed)
    assert "config not covered" in caplog.text
    assert loaded.predict([structure])[0].energy == model.predict([structure])[0].energy
    # ... but their weights are still checked
    tensors = load_file(str(path))
    tensors["representation.radial_mixing"] += 1.0
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
    save_file(tensors, str(path), metadata=meta)
    with pytest.raises(ModelFileError, match="weights checksum"):
        load_model(path, policy=allowed)


def test_bundled_model_verifies():
    from cace_server.server import default_model_path

    assert check_integrity(default_model_path()).status == "verified"


def test_info_says_whether_the_file_verifies(tmp_path):
    good = save_model(random_model(seed=1), tmp_path / "good.safetensors")
    legacy = save_model(random_model(seed=1), tmp_path / "legacy.safetensors")
    rewrite_metadata(legacy, make_legacy)
    edited = save_model(random_model(seed=1), tmp_path / "edited.safetensors")
    rewrite_metadata(edited, set_config("elements", [1, 6]))

    def info(path: Path) -> tuple[int, dict]:
        proc = subprocess.run(
            [*CLI, "info", str(path), "--json"], capture_output=True, text=True, timeout=120
        )
        return proc.returncode, json.loads(proc.stdout)

    code, out = info(good)
    assert code == 0 and out["verifies"].startswith("verified")
    code, out = info(legacy)
    assert code == 0 and out["verifies"].startswith("legacy") and "not covered" in out["verifies"]
    code, out = info(edited)
    assert code == 1 and out["verifies"].startswith("FAILED: ")
    assert out["elements"] == [1, 6] and out["parameters"] is None
