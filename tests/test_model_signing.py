"""Model files: format version 1 refused unless allowed, and HMAC signatures.

Through the real interfaces: ``cace-server serve`` as a process (a version-1 file
stops it with the advice to re-save, ``--allow-legacy-model-files`` serves it),
``cace-server resave`` and ``info`` as processes, and model updates over HTTP
(a real uvicorn server on 127.0.0.1) with and without a signing key.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from cace_server.engine import Engine, EngineError, EngineSettings
from cace_server.http import BackgroundServer, HttpSettings, create_app
from cace_server.model import ModelFileError, load_model, random_model, save_model
from cace_server.model.io import (
    CONTENT_KEY,
    SIGNATURE_KEY,
    ModelFilePolicy,
    check_integrity,
    metadata_digest,
    read_metadata,
    reseal,
)
from cace_server.structures import Structure
from tests.test_model_io import make_legacy, rewrite_metadata, set_config
from tests.test_serve_http import ServerProcess, free_port

CLI = [sys.executable, "-m", "cace_server.cli"]
ROOT = Path(__file__).resolve().parents[1]
WATER = ROOT / "cace_server" / "data" / "water.safetensors"
SEED1 = ROOT / "tests" / "data" / "committee" / "seed1.safetensors"
KEY = b"0123456789abcdef0123456789abcdef"
FORGED_CUTOFF = 3.75
TOKEN = "signing-token"
AUTH = {"authorization": f"Bearer {TOKEN}"}


def water() -> Structure:
    return Structure.create([8, 1, 1], [[0.0, 0.0, 0.0], [0.96, 0.0, 0.0], [-0.24, 0.93, 0.0]])


def body(s: Structure) -> dict[str, Any]:
    return {"numbers": s.numbers.tolist(), "positions": s.positions.tolist()}


def forge(meta: dict[str, str]) -> None:
    """An edited cutoff with its checksum recomputed: what a tamperer would do."""
    set_config("cutoff", FORGED_CUTOFF)(meta)
    meta[CONTENT_KEY] = metadata_digest(meta)


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=180)


def test_version_1_is_refused_unless_allowed(tmp_path: Path) -> None:
    model = random_model(seed=3)
    path = save_model(model, tmp_path / "old.safetensors")
    rewrite_metadata(path, make_legacy)
    with pytest.raises(ModelFileError) as refused:
        load_model(path)
    message = str(refused.value)
    assert "format version 1" in message and "not covered" in message
    assert f"cace-server resave {path}" in message and "--allow-legacy-model-files" in message
    loaded = load_model(path, policy=ModelFilePolicy(allow_legacy=True))
    s = water()
    assert loaded.predict([s])[0].energy == model.predict([s])[0].energy
    # signing on: a version-1 file cannot carry a signature, allowed or not
    with pytest.raises(ModelFileError, match="cannot carry a signature"):
        load_model(path, policy=ModelFilePolicy(allow_legacy=True, signing_key=KEY))


def test_serve_refuses_version_1_and_resave_fixes_it(tmp_path: Path) -> None:
    path = tmp_path / "old.safetensors"
    shutil.copy(SEED1, path)
    rewrite_metadata(path, make_legacy)
    # cace-server serve stops with the advice, before serving anything
    proc = subprocess.run(
        [*CLI, "serve", "--port", str(free_port()), "--model", str(path)],
        capture_output=True,
        text=True,
        timeout=180,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "format version 1" in proc.stderr and f"cace-server resave {path}" in proc.stderr
    assert "--allow-legacy-model-files" in proc.stderr
    # ... and serves it when told to
    server = ServerProcess(tmp_path, "--model", str(path), "--allow-legacy-model-files")
    try:
        server.wait_ready()
        r = httpx.post(server.url + "/v1/calculate", json=body(water()), timeout=60)
        assert r.status_code == 200, r.text
        legacy_energy = r.json()["energy"]
    finally:
        server.stop()
    # cace-server resave makes it a version-2 file, the same model
    done = cli("resave", str(path))
    assert done.returncode == 0, done.stderr
    assert read_metadata(path)["format_version"] == "2"
    assert check_integrity(path).status == "verified"
    resaved = load_model(path, dtype="float64")
    assert resaved.predict([water()])[0].energy == pytest.approx(legacy_energy, abs=1e-8)
    # resave refuses a file whose checksums fail: it never launders an edit
    rewrite_metadata(path, set_config("cutoff", 4.5))
    done = cli("resave", str(path))
    assert done.returncode == 2 and "metadata checksum mismatch" in done.stderr


def test_signature_round_trip(tmp_path: Path) -> None:
    model = random_model(seed=4)
    signed = save_model(model, tmp_path / "signed.safetensors", signing_key=KEY)
    unsigned = save_model(model, tmp_path / "unsigned.safetensors")
    on = ModelFilePolicy(signing_key=KEY)
    assert check_integrity(signed, policy=on).signed
    s = water()
    assert load_model(signed, policy=on).predict([s])[0].energy == model.predict([s])[0].energy
    # without a key a signed file loads like any other
    assert check_integrity(signed).status == "verified"
    with pytest.raises(ModelFileError, match="not signed"):
        load_model(unsigned, policy=on)
    with pytest.raises(ModelFileError, match="signature does not verify"):
        load_model(signed, policy=ModelFilePolicy(signing_key=b"another key, 16+ bytes"))
    # reseal signs an unsigned file in place; the weights and config stay as they were
    reseal(unsigned, signing_key=KEY)
    assert check_integrity(unsigned, policy=on).signed
    assert read_metadata(unsigned)["config"] == read_metadata(signed)["config"]
    # a forged config (checksum recomputed) loads without a key, not with one
    rewrite_metadata(signed, forge)
    assert SIGNATURE_KEY in read_metadata(signed)
    assert check_integrity(signed).status == "verified"
    with pytest.raises(ModelFileError, match="signature does not verify"):
        load_model(signed, policy=on)


def test_cli_signs_and_checks(tmp_path: Path) -> None:
    key_file = tmp_path / "model.key"
    key_file.write_bytes(KEY + b"\n")
    path = tmp_path / "m.safetensors"
    shutil.copy(SEED1, path)
    out = tmp_path / "signed.safetensors"
    done = cli("resave", str(path), "--output", str(out), "--signing-key-file", str(key_file))
    assert done.returncode == 0 and "signed" in done.stdout, done.stderr
    info = cli("info", str(out), "--json", "--signing-key-file", str(key_file))
    assert info.returncode == 0, info.stderr
    shown = json.loads(info.stdout)
    assert shown["signed"] is True and "signature verified" in shown["verifies"]
    rewrite_metadata(out, forge)
    info = cli("info", str(out), "--json", "--signing-key-file", str(key_file))
    assert (
        info.returncode == 1 and "signature does not verify" in json.loads(info.stdout)["verifies"]
    )
    short = tmp_path / "short.key"
    short.write_bytes(b"abc")
    done = cli("resave", str(path), "--signing-key-file", str(short))
    assert done.returncode == 2 and "at least 16" in done.stderr


@pytest.fixture
def update_dir(tmp_path: Path) -> Path:
    d = tmp_path / "models"
    d.mkdir()
    shutil.copy(WATER, d / "water.safetensors")
    shutil.copy(SEED1, d / "unsigned.safetensors")
    shutil.copy(SEED1, d / "forged.safetensors")
    rewrite_metadata(d / "forged.safetensors", forge)
    shutil.copy(SEED1, d / "signed.safetensors")
    reseal(d / "signed.safetensors", signing_key=KEY)
    shutil.copy(d / "signed.safetensors", d / "signed-forged.safetensors")
    rewrite_metadata(d / "signed-forged.safetensors", forge)
    reseal(d / "water.safetensors", d / "water-signed.safetensors", signing_key=KEY)
    return d


def swaps(engine: Engine, update_dir: Path, names: list[str]) -> Iterator[tuple[str, int, str]]:
    options = dict(allow_model_updates=True, model_update_dir=str(update_dir), token=TOKEN)
    app = create_app(engine, settings=HttpSettings(**options))
    with BackgroundServer(app) as srv, httpx.Client(base_url=srv.url, timeout=120) as c:
        for name in names:
            r = c.put("/v1/models/water", json={"path": str(update_dir / name)}, headers=AUTH)
            yield name, r.status_code, r.text
            calc = c.post("/v1/calculate", json=body(water()), headers=AUTH)
            assert calc.status_code == 200 and np.isfinite(calc.json()["energy"])


def test_model_updates_without_signing_take_a_forged_config(update_dir: Path) -> None:
    """What the checksum cannot catch: a config edited with its checksum recomputed."""
    settings = EngineSettings(dtype="float64")
    with Engine({"water": update_dir / "water.safetensors"}, settings=settings) as engine:
        got = {
            name: status for name, status, _ in swaps(engine, update_dir, ["forged.safetensors"])
        }
        assert got == {"forged.safetensors": 200}
        assert engine.model_info("water").cutoff == FORGED_CUTOFF


def test_model_updates_with_signing(update_dir: Path, tmp_path: Path) -> None:
    key_file = tmp_path / "model.key"
    key_file.write_bytes(KEY)
    settings = EngineSettings(dtype="float64", model_signing_key_file=str(key_file))
    # the unsigned bundled model does not start ...
    unsigned = Engine({"water": update_dir / "water.safetensors"}, settings=settings)
    try:
        with pytest.raises(EngineError, match="not signed"):
            unsigned.start()
    finally:
        unsigned.close()
    # ... a signed one does, and every update must be signed with the key too
    with Engine({"water": update_dir / "water-signed.safetensors"}, settings=settings) as engine:
        names = [
            "unsigned.safetensors",
            "forged.safetensors",
            "signed-forged.safetensors",
            "signed.safetensors",
        ]
        got = {name: (status, text) for name, status, text in swaps(engine, update_dir, names)}
    for name in names[:3]:
        status, text = got[name]
        assert status == 422 and json.loads(text)["error"] == "bad_model", (name, text)
    assert "not signed" in got["unsigned.safetensors"][1]
    assert "signature does not verify" in got["signed-forged.safetensors"][1]
    assert got["signed.safetensors"][0] == 200, got["signed.safetensors"][1]
