"""Per-atom model inputs (``arrays``) through a real server: JSON, msgpack, the client.

The model is a real CACE model that also reads a per-atom input ``charge_states``
(as the original's ``forward_features`` models do): its energy gains
``0.5 eV * sum(charge_states * (atom index + 1))``, so a value that arrives out of
order, or for the wrong structure, changes the answer.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import ase
import ase.io
import httpx
import msgpack
import numpy as np
import pytest

from cace_server.engine import Engine, EngineSettings, InvalidStructure
from cace_server.engine.models import ModelWrapper
from cace_server.http import BackgroundServer, HttpSettings, create_app
from cace_server.model import random_model
from cace_server.outputs import Outputs
from cace_server.server import species_template
from cace_server.structures import Prediction, Structure
from cace_server.units import HARTREE_PER_EV

CLIENTS = Path(__file__).resolve().parents[1] / "clients"
try:
    import cace_client
except ImportError:  # not installed: use the source tree
    sys.path.insert(0, str(CLIENTS))
    import cace_client  # noqa: F401

from cace_client import CACEClient, RemoteCACE  # noqa: E402

from tests.ipi_support import IPI_SCRIPT, start_ipi  # noqa: E402

KEY = "charge_states"


class ReadsChargeStates(ModelWrapper):
    """A real model that also reads the per-atom input ``charge_states``."""

    @property
    def required_inputs(self) -> tuple[str, ...]:
        return (KEY,)

    @staticmethod
    def shift(structure: Structure) -> float:
        states = structure.arrays[KEY]
        return 0.5 * float(np.dot(states, np.arange(1, len(states) + 1)))

    def predict(self, structures: Sequence[Any], outputs: Outputs) -> list[Prediction]:
        out = self.inner.predict(structures, outputs)
        for p, prediction in zip(structures, out, strict=True):
            prediction.energy += self.shift(getattr(p, "structure", p))
        return out


def water(n: int, seed: int) -> Structure:
    rng = np.random.default_rng(seed)
    centres = np.array([[3.1 * i, 0.0, 0.0] for i in range(n)])
    local = np.array([[0.0, 0.0, 0.0], [0.96, 0.0, 0.0], [-0.24, 0.93, 0.0]])
    positions = (centres[:, None] + local[None]).reshape(-1, 3) + rng.normal(0, 0.02, (3 * n, 3))
    states = rng.integers(-1, 2, 3 * n).astype(float)
    return Structure.create(np.tile([8, 1, 1], n), positions, arrays={KEY: states})


def body(s: Structure, **extra: Any) -> dict[str, Any]:
    out: dict[str, Any] = {
        "numbers": s.numbers.tolist(),
        "positions": s.positions.tolist(),
        "arrays": {KEY: s.arrays[KEY].tolist()},
    }
    out.update(extra)
    return out


@pytest.fixture(scope="module")
def model() -> ReadsChargeStates:
    return ReadsChargeStates(random_model((1, 8), seed=11))


@pytest.fixture(scope="module")
def engine(model: ReadsChargeStates) -> Iterator[Engine]:
    with Engine(model, settings=EngineSettings(dtype="float64", batch_wait_ms=2.0)) as eng:
        yield eng


@pytest.fixture(scope="module")
def server(engine: Engine) -> Iterator[BackgroundServer]:
    # The i-PI attach route is off by default; one test attaches to its own socket dir.
    settings = HttpSettings(allow_ipi_control=True, ipi_socket_prefix="/tmp/ipi")
    with BackgroundServer(create_app(engine, settings=settings)) as srv:
        yield srv


@pytest.fixture
def client(server: BackgroundServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


def expected(model: ReadsChargeStates, s: Structure) -> float:
    return model.predict([model.prepare(s)], Outputs(["energy"]))[0].energy


def test_models_lists_required_inputs(client: httpx.Client) -> None:
    (info,) = client.get("/v1/models").json()["models"]
    assert info["required_inputs"] == [KEY]
    assert info["outputs"] == ["energy", "forces", "stress", "energies"]
    assert info["family"] == ["cace"] and info["long_range"] is False


def test_inputs_arrive_in_order_json_and_msgpack(
    client: httpx.Client, model: ReadsChargeStates
) -> None:
    s = water(3, seed=1)
    r = client.post("/v1/calculate", json=body(s))
    assert r.status_code == 200, r.text
    assert r.json()["energy"] == pytest.approx(expected(model, s), rel=1e-12)
    packed = body(s)
    states = np.ascontiguousarray(s.arrays[KEY], dtype="<f8")
    packed["arrays"] = {KEY: {"shape": [len(s)], "dtype": "<f8", "data": states.tobytes()}}
    headers = {"content-type": "application/msgpack", "accept": "application/msgpack"}
    r = client.post("/v1/calculate", content=msgpack.packb(packed), headers=headers)
    assert r.status_code == 200, r.text
    assert msgpack.unpackb(r.content)["energy"] == pytest.approx(expected(model, s), rel=1e-12)


def test_batch_inputs_belong_to_their_structure(
    client: httpx.Client, model: ReadsChargeStates
) -> None:
    structures = [water(n, seed=10 + n) for n in (1, 2, 3)]
    r = client.post(
        "/v1/calculate/batch",
        json={"structures": [body(s) for s in structures], "properties": ["energy"]},
    )
    assert r.status_code == 200, r.text
    got = [x["energy"] for x in r.json()["results"]]
    assert got == pytest.approx([expected(model, s) for s in structures], rel=1e-12)


@pytest.mark.parametrize(
    ("arrays", "kind", "field"),
    [
        (None, "missing_input", "arrays.charge_states"),
        ({}, "missing_input", "arrays.charge_states"),
        ({KEY: [0, 1]}, "invalid_input", "arrays.charge_states"),
        ({KEY: [[0, 1, 2]]}, "invalid_input", "arrays.charge_states"),
        ({KEY: ["a", "b", "c"]}, "invalid_input", "arrays.charge_states"),
        ({KEY: [0, 0, 0], "spin": [0, 0, 0]}, "invalid_input", "arrays.spin"),
    ],
    ids=["absent", "empty", "short", "wrong rows", "strings", "unknown name"],
)
def test_bad_inputs_are_a_clear_422(
    client: httpx.Client, arrays: Any, kind: str, field: str
) -> None:
    s = water(1, seed=3)
    request = body(s)
    if arrays is None:
        del request["arrays"]
    else:
        request["arrays"] = arrays
    r = client.post(
        "/v1/calculate",
        content=json.dumps(request),
        headers={"content-type": "application/json"},
    )
    assert r.status_code == 422, r.text
    reply = r.json()
    assert (reply["error"], reply["field"]) == (kind, field), reply
    assert reply["message"]


def test_non_finite_input_is_refused(client: httpx.Client) -> None:
    s = water(1, seed=4)
    request = body(s)
    bad = np.array([0.0, np.nan, 0.0], dtype="<f8")
    request["arrays"] = {KEY: {"shape": [3], "dtype": "<f8", "data": bad.tobytes()}}
    r = client.post(
        "/v1/calculate",
        content=msgpack.packb(request),
        headers={"content-type": "application/msgpack"},
    )
    assert r.status_code == 422, r.text
    assert r.json()["field"] == "arrays.charge_states.1"


def test_engine_refuses_a_structure_without_the_input(engine: Engine) -> None:
    """What the i-PI path relies on: a structure without the input fails alone."""
    s = water(1, seed=5)
    bare = Structure.create(s.numbers, s.positions)
    got = engine.evaluate_sync([s, bare], return_exceptions=True)
    assert isinstance(got[0], Prediction)
    assert isinstance(got[1], InvalidStructure) and KEY in str(got[1])


def test_client_and_ase_calculator_send_atoms_arrays(
    server: BackgroundServer, model: ReadsChargeStates
) -> None:
    s = water(2, seed=6)
    atoms = ase.Atoms(numbers=s.numbers, positions=s.positions)
    atoms.arrays[KEY] = s.arrays[KEY].copy()
    want = expected(model, s)
    with CACEClient(server.url, binary=True) as c:
        assert c.calculate(atoms, inputs=(KEY,))["energy"] == pytest.approx(want, rel=1e-12)
    calc = RemoteCACE(server.url)  # asks the server which inputs the model reads
    atoms.calc = calc
    assert atoms.get_potential_energy() == pytest.approx(want, rel=1e-12)
    assert calc.inputs == (KEY,)
    del atoms.arrays[KEY]
    with pytest.raises(ValueError, match=r"atoms\.arrays"):
        RemoteCACE(server.url, inputs=(KEY,)).get_potential_energy(atoms)
    calc.close()


def test_ipi_template_arrays(tmp_path: Path) -> None:
    """--ipi-template: the model's per-atom inputs are columns of the structure file."""
    s = water(2, seed=7)
    atoms = ase.Atoms(numbers=s.numbers, positions=s.positions)
    atoms.arrays[KEY] = s.arrays[KEY].copy()
    path = tmp_path / "template.extxyz"
    ase.io.write(path, atoms, format="extxyz")
    numbers, arrays = species_template(str(path), (KEY,))
    np.testing.assert_array_equal(numbers, s.numbers)
    np.testing.assert_array_equal(arrays[KEY], s.arrays[KEY])
    with pytest.raises(ValueError, match="no per-atom array 'spin'"):
        species_template(str(path), ("spin",))


@pytest.mark.ipi
@pytest.mark.skipif(not IPI_SCRIPT.exists(), reason="the i-pi program is not installed")
def test_ipi_run_attached_over_http_gets_the_inputs(
    client: httpx.Client,
    model: ReadsChargeStates,
    tmp_path: Path,
    socket_dir: str,
    ipi_runs: list,
) -> None:
    s = water(2, seed=8)
    atoms = ase.Atoms(numbers=s.numbers, positions=s.positions, cell=[9.0, 9.0, 9.0], pbc=True)
    run = start_ipi(ipi_runs, tmp_path / "ipi", socket_dir, atoms, nbeads=2, steps=2)
    run.wait_for_socket()
    request = {"address": f"unix:{run.socket_path}", "clients": 2, "numbers": s.numbers.tolist()}
    r = client.post("/v1/ipi/connections", json=request)
    assert r.status_code == 422 and r.json()["field"] == "arrays.charge_states", r.text
    request["arrays"] = {KEY: s.arrays[KEY].tolist()}
    r = client.post("/v1/ipi/connections", json=request)
    assert r.status_code == 201, r.text
    assert run.wait() == 0, run.log()
    props = run.properties()
    for bead in range(2):
        for step, frame in enumerate(run.frames("pos", bead)):
            structure = Structure.create(
                s.numbers, frame.positions, frame.cell, True, {KEY: s.arrays[KEY]}
            )
            want = expected(model, structure) * HARTREE_PER_EV
            # i-PI's ASE trajectory has 8 decimals (Å): the energy agrees to ~1e-7
            assert props[step, 2 + bead] == pytest.approx(want, rel=1e-6)
