"""Charges, dipole and Born effective charges over HTTP and through the Python client,
with the published LES-BEC water model (converted by our importer, float64)."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ase
import httpx
import msgpack
import numpy as np
import pytest
from ase.calculators.calculator import PropertyNotImplementedError

from cace_server.engine import Engine, EngineSettings
from cace_server.http import BackgroundServer, HttpSettings, create_app
from cace_server.model import load_model
from cace_server.structures import Structure
from tests.conftest import converted_published
from tests.test_http import body_of, unpack, water_cluster

CLIENTS = Path(__file__).resolve().parents[1] / "clients"
try:
    import cace_client
except ImportError:  # not installed: use the source tree
    sys.path.insert(0, str(CLIENTS))
    import cace_client  # noqa: F401

from cace_client import CACEClient, RemoteCACE  # noqa: E402

LES_BEC_WATER = "BingqingCheng_LES-BEC_water_fit_fit_version_3_best_model.pth"
TOL = 1e-10


@pytest.fixture(scope="module")
def model_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return converted_published(LES_BEC_WATER, tmp_path_factory.mktemp("les-bec"))


@pytest.fixture(scope="module")
def model(model_file: Path) -> Any:
    return load_model(model_file, dtype="float64")


@pytest.fixture(scope="module")
def server(model_file: Path) -> Iterator[BackgroundServer]:
    settings = EngineSettings(dtype="float64", batch_wait_ms=2.0)
    with (
        Engine({"les-bec": model_file}, settings=settings) as engine,
        BackgroundServer(create_app(engine, settings=HttpSettings())) as srv,
    ):
        yield srv


@pytest.fixture
def client(server: BackgroundServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def box() -> Structure:
    return water_cluster(8, seed=21, box=6.4)


def test_models_says_what_it_offers(client: httpx.Client) -> None:
    (info,) = client.get("/v1/models").json()["models"]
    assert {"energy", "forces", "stress", "charges", "dipole", "bec"} <= set(info["outputs"])
    assert "energies" not in info["outputs"]
    assert info["long_range"] is True and "polarization" in info["family"]
    assert info["required_inputs"] == []


def test_dipole_bec_charges_json(client: httpx.Client, model: Any, box: Structure) -> None:
    want = model.predict([box], model.default_outputs | {"bec"})[0]
    props = ["energy", "forces", "charges", "dipole", "bec"]
    r = client.post("/v1/calculate", json=body_of(box, properties=props))
    assert r.status_code == 200, r.text
    got = r.json()
    assert got["energy"] == pytest.approx(want.energy, rel=TOL)
    np.testing.assert_allclose(got["forces"], want.forces, rtol=TOL, atol=TOL)
    np.testing.assert_allclose(got["charges"], want.charges, rtol=TOL, atol=TOL)
    np.testing.assert_allclose(got["dipole"], want.dipole, rtol=TOL, atol=TOL)
    assert np.shape(got["bec"]) == (len(box), 3, 3)
    np.testing.assert_allclose(got["bec"], want.bec, rtol=TOL, atol=TOL)


def test_bec_only_when_asked_and_msgpack(client: httpx.Client, model: Any, box: Structure) -> None:
    want = model.predict([box], model.default_outputs | {"bec"})[0]
    headers = {"content-type": "application/msgpack", "accept": "application/msgpack"}
    body = msgpack.packb(body_of(box, properties=["energy", "dipole"]))
    got = msgpack.unpackb(client.post("/v1/calculate", content=body, headers=headers).content)
    assert "bec" not in got and got["dipole"] == pytest.approx(list(want.dipole), rel=TOL)
    body = msgpack.packb(body_of(box, properties=["energy", "bec"]))
    got = msgpack.unpackb(client.post("/v1/calculate", content=body, headers=headers).content)
    np.testing.assert_allclose(unpack(got["bec"]), want.bec, rtol=TOL, atol=TOL)


def test_batch_mixes_bec_and_no_bec(client: httpx.Client, model: Any, box: Structure) -> None:
    other = water_cluster(8, seed=22, box=6.4)
    want = model.predict([box, other], model.default_outputs | {"bec"})
    r = client.post(
        "/v1/calculate/batch",
        json={"structures": [body_of(box), body_of(other)], "properties": ["bec", "dipole"]},
    )
    assert r.status_code == 200, r.text
    for got, w in zip(r.json()["results"], want, strict=True):
        np.testing.assert_allclose(got["bec"], w.bec, rtol=TOL, atol=TOL)
        np.testing.assert_allclose(got["dipole"], w.dipole, rtol=TOL, atol=TOL)


def test_per_atom_energies_refused(client: httpx.Client, box: Structure) -> None:
    r = client.post("/v1/calculate", json=body_of(box, properties=["energies"]))
    assert r.status_code == 422
    assert r.json()["error"] == "unsupported_property"
    assert r.json()["field"] == "properties.0"


def test_ase_calculator_dipole_charges_bec(
    server: BackgroundServer, model: Any, box: Structure
) -> None:
    want = model.predict([box], model.default_outputs | {"bec"})[0]
    atoms = ase.Atoms(numbers=box.numbers, positions=box.positions, cell=box.cell, pbc=True)
    atoms.calc = RemoteCACE(server.url)
    np.testing.assert_allclose(atoms.get_dipole_moment(), want.dipole, rtol=TOL, atol=TOL)
    np.testing.assert_allclose(atoms.get_charges(), want.charges, rtol=TOL, atol=TOL)
    bec = atoms.calc.get_property("bec", atoms)
    np.testing.assert_allclose(bec, want.bec, rtol=TOL, atol=TOL)
    np.testing.assert_allclose(atoms.calc.results["bec"], want.bec, rtol=TOL, atol=TOL)
    with pytest.raises(PropertyNotImplementedError, match="energies"):
        atoms.get_potential_energies()
    with CACEClient(server.url, binary=True) as c:
        got = c.calculate(atoms, properties=["dipole", "bec"])
        np.testing.assert_allclose(got["bec"], want.bec, rtol=TOL, atol=TOL)
        np.testing.assert_allclose(got["dipole"], want.dipole, rtol=TOL, atol=TOL)


def test_info_says_what_the_model_offers(model_file: Path) -> None:
    from typer.testing import CliRunner

    from cace_server.cli import app

    result = CliRunner().invoke(app, ["info", str(model_file), "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert {"charges", "dipole", "bec"} <= set(info["outputs"])
    assert "polarization" in info["family"] and info["long_range"] is True
    assert info["required_inputs"] == []
    text = CliRunner().invoke(app, ["info", str(model_file)]).output
    assert "outputs" in text and "bec" in text
