"""The Python client (``clients/cace_client``) against a real server on 127.0.0.1.

ASE molecular dynamics with ``RemoteCACE`` must follow the same trajectory as the
model evaluated in this process; the client retries while the server is down or
not ready, and never imports torch.
"""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import ase
import numpy as np
import pytest
from ase import units
from ase.calculators.calculator import Calculator, PropertyNotImplementedError, all_changes
from ase.md.velocitydistribution import MaxwellBoltzmannDistribution
from ase.md.verlet import VelocityVerlet

from cace_server.engine import Engine, EngineSettings
from cace_server.http import BackgroundServer, HttpSettings, create_app
from cace_server.model import load_model, random_model, save_model
from cace_server.structures import Structure

CLIENTS = Path(__file__).resolve().parents[1] / "clients"
try:
    import cace_client
except ImportError:  # not installed: use the source tree
    sys.path.insert(0, str(CLIENTS))
    import cace_client  # noqa: F401

from cace_client import AsyncCACEClient, CACEClient, CACEServerError, RemoteCACE  # noqa: E402


class InProcess(Calculator):
    """The model evaluated directly, as an ASE calculator (the reference)."""

    implemented_properties: ClassVar[list[str]] = ["energy", "free_energy", "forces", "stress"]

    def __init__(self, model: Any) -> None:
        super().__init__()
        self.model = model

    def calculate(
        self, atoms: Any = None, properties: Any = ("energy",), system_changes: Any = all_changes
    ) -> None:
        super().calculate(atoms, properties, system_changes)
        p = self.model.predict([Structure.from_ase(self.atoms)])[0]
        self.results = {"energy": p.energy, "free_energy": p.energy, "forces": p.forces}
        if p.stress is not None:
            s = p.stress
            self.results["stress"] = np.array(
                [s[0, 0], s[1, 1], s[2, 2], s[1, 2], s[0, 2], s[0, 1]]
            )


def water_box(n_side: int = 2, spacing: float = 3.2, seed: int = 0) -> ase.Atoms:
    rng = np.random.default_rng(seed)
    local = np.array([[0.0, 0.0, 0.0], [0.96, 0.0, 0.0], [-0.24, 0.93, 0.0]])
    positions = []
    for i in range(n_side):
        for j in range(n_side):
            for k in range(n_side):
                centre = np.array([i, j, k]) * spacing + 0.6
                positions.extend(centre + local + rng.normal(0, 0.05, (3, 3)))
    n = n_side**3
    box = n_side * spacing
    return ase.Atoms("OHH" * n, positions=positions, cell=[box] * 3, pbc=True)


@pytest.fixture(scope="module")
def model_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("client") / "water-test.safetensors"
    return save_model(random_model((1, 8), seed=11), path)


@pytest.fixture(scope="module")
def model(model_file: Path) -> Any:
    return load_model(model_file, dtype="float64")


@pytest.fixture(scope="module")
def server(model_file: Path) -> Iterator[BackgroundServer]:
    with (
        Engine(model_file, settings=EngineSettings(dtype="float64")) as engine,
        BackgroundServer(create_app(engine, settings=HttpSettings())) as srv,
    ):
        yield srv


def run_md(atoms: ase.Atoms, calc: Calculator, steps: int) -> list[np.ndarray]:
    """Velocity Verlet; heavy atoms keep the random model's forces (a few eV/Å) from
    colliding them within the run."""
    atoms = atoms.copy()
    atoms.set_masses(np.full(len(atoms), 20.0))
    MaxwellBoltzmannDistribution(atoms, temperature_K=300, rng=np.random.default_rng(1))
    atoms.calc = calc
    frames = [atoms.get_positions()]
    dyn = VelocityVerlet(atoms, timestep=0.2 * units.fs)
    for _ in range(steps):
        dyn.run(1)
        frames.append(atoms.get_positions())
    frames.append(atoms.get_stress())
    return frames


@pytest.mark.parametrize("binary", [True, False], ids=["msgpack", "json"])
def test_md_with_remote_calculator_matches_in_process(
    server: BackgroundServer, model: Any, binary: bool
) -> None:
    atoms = water_box()
    reference = run_md(atoms, InProcess(model), steps=20)
    remote = RemoteCACE(server.url, binary=binary)
    assert remote.client.binary is binary
    trajectory = run_md(atoms, remote, steps=20)
    remote.close()
    for want, got in zip(reference[:-1], trajectory[:-1], strict=True):
        assert np.abs(got - want).max() < 1e-8
    np.testing.assert_allclose(trajectory[-1], reference[-1], rtol=1e-8, atol=1e-12)
    # the atoms moved: the comparison is not trivially between identical frames
    assert np.abs(reference[-2] - reference[0]).max() > 1e-3


def test_remote_calculator_properties(server: BackgroundServer, model: Any) -> None:
    atoms = water_box(seed=3)
    atoms.calc = RemoteCACE(server.url, model="water-test")
    want = model.predict([Structure.from_ase(atoms)])[0]
    assert atoms.get_potential_energy() == pytest.approx(want.energy, rel=1e-12)
    assert atoms.get_potential_energy(force_consistent=True) == pytest.approx(want.energy)
    np.testing.assert_allclose(atoms.get_forces(), want.forces, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(
        atoms.get_potential_energies(), want.energies, rtol=1e-10, atol=1e-12
    )
    molecule = ase.Atoms("OHH", positions=[[0, 0, 0], [0.96, 0, 0], [-0.24, 0.93, 0]])
    molecule.calc = RemoteCACE(server.url)
    assert np.isfinite(molecule.get_potential_energy())
    with pytest.raises(PropertyNotImplementedError):
        molecule.get_stress()


def test_client_calls(server: BackgroundServer, model: Any) -> None:
    atoms = [water_box(seed=s) for s in range(3)]
    with CACEClient(server.url) as client:
        assert client.health() == {"alive": True, "ready": True}
        models = client.models()
        assert models["default"] == "water-test"
        results = client.calculate_batch(atoms, properties=["energy", "forces"])
        for a, got in zip(atoms, results, strict=True):
            want = model.predict([Structure.from_ase(a)])[0]
            assert got["energy"] == pytest.approx(want.energy, rel=1e-12)
            assert isinstance(got["forces"], np.ndarray)
            np.testing.assert_allclose(got["forces"], want.forces, rtol=1e-10, atol=1e-12)
        one = client.calculate(
            {"symbols": ["O", "H", "H"], "positions": [[0, 0, 0], [1, 0, 0], [0, 1, 0]]}
        )
        assert one["n_atoms"] == 3
        with pytest.raises(CACEServerError) as info:
            client.calculate({"symbols": ["O", "C"], "positions": [[0, 0, 0], [1, 0, 0]]})
        assert info.value.status == 422 and info.value.field == "symbols.1"
        assert info.value.kind == "unknown_element"


def test_async_client(server: BackgroundServer, model: Any) -> None:
    atoms = [water_box(seed=s) for s in range(8)]

    async def main() -> list[dict[str, Any]]:
        async with AsyncCACEClient(server.url, binary=True) as client:
            return await asyncio.gather(*(client.calculate(a) for a in atoms))

    for a, got in zip(atoms, asyncio.run(main()), strict=True):
        want = model.predict([Structure.from_ase(a)])[0]
        np.testing.assert_allclose(got["forces"], want.forces, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(got["stress"][:3], np.diag(want.stress), rtol=1e-10)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_retries_until_the_server_is_up_and_ready(model_file: Path) -> None:
    """Connection refused, then 503 (engine warming up), then the answer."""
    port = free_port()
    engine = Engine(model_file)
    holder: dict[str, BackgroundServer] = {}

    def start_late() -> None:
        time.sleep(0.4)
        holder["server"] = BackgroundServer(create_app(engine), port=port).start()
        time.sleep(0.4)
        engine.start(wait=False)

    thread = threading.Thread(target=start_late)
    thread.start()
    try:
        with CACEClient(f"http://127.0.0.1:{port}", retries=8, backoff=0.1) as client:
            out = client.calculate(water_box(seed=5))
        assert np.isfinite(out["energy"])
    finally:
        thread.join(30)
        if "server" in holder:
            holder["server"].stop()
        engine.close()
    with CACEClient(f"http://127.0.0.1:{port}", retries=1, backoff=0.01) as client:
        assert client.health() == {"alive": False, "ready": False}
        with pytest.raises(Exception, match="onnect"):
            client.models()


def test_token(model_file: Path) -> None:
    with (
        Engine(model_file) as engine,
        BackgroundServer(create_app(engine, settings=HttpSettings(token="tok"))) as srv,
    ):
        with CACEClient(srv.url, token="tok") as ok:
            assert ok.models()["models"]
        with CACEClient(srv.url) as anonymous, pytest.raises(CACEServerError) as info:
            anonymous.models()
        assert info.value.status == 401
        atoms = water_box()
        atoms.calc = RemoteCACE(srv.url, token="tok")
        assert np.isfinite(atoms.get_potential_energy())


def test_client_does_not_import_torch() -> None:
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); import cace_client, cace_client.wire; "
        "assert 'torch' not in sys.modules, 'torch imported'; print('ok')"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(CLIENTS)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_examples(server: BackgroundServer) -> None:
    script = CLIENTS / "examples" / "curl.sh"
    out = subprocess.run(
        ["bash", str(script), server.url], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert '"energy"' in out.stdout and "HTTP 422" in out.stdout


COMMITTEE = Path(__file__).resolve().parent / "data" / "committee"


@pytest.fixture(scope="module")
def committee_server(model_file: Path) -> Iterator[BackgroundServer]:
    """A committee of the four seed members next to a plain model."""
    members = ",".join(str(COMMITTEE / f"seed{i}.safetensors") for i in range(1, 5))
    sources = {"water": members, "plain": str(model_file)}
    with (
        Engine(sources, settings=EngineSettings(dtype="float64")) as engine,
        BackgroundServer(create_app(engine, settings=HttpSettings())) as srv,
    ):
        yield srv


@pytest.fixture(scope="module")
def committee() -> Any:
    from cace_server.model import load_served

    members = ",".join(str(COMMITTEE / f"seed{i}.safetensors") for i in range(1, 5))
    return load_served(members, dtype="float64")


@pytest.mark.parametrize("binary", [True, False], ids=["msgpack", "json"])
def test_remote_calculator_gives_a_committees_uncertainties(
    committee_server: BackgroundServer, committee: Any, binary: bool
) -> None:
    atoms = water_box(seed=5)
    atoms.calc = RemoteCACE(committee_server.url, model="water", binary=binary)
    want = committee.predict(
        [Structure.from_ase(atoms)],
        ["energy", "forces", "energy_uncertainty", "forces_uncertainty"],
    )[0]
    assert atoms.get_potential_energy() == pytest.approx(want.energy, rel=1e-12)
    results = atoms.calc.results
    assert results["energy_uncertainty"] == pytest.approx(want.energy_uncertainty, rel=1e-10)
    assert results["forces_uncertainty"].shape == (len(atoms),)
    np.testing.assert_allclose(results["forces_uncertainty"], want.forces_uncertainty, rtol=1e-10)
    assert atoms.calc.get_property("energy_uncertainty", atoms) == results["energy_uncertainty"]
    # a plain model is not asked for them, and has none to give
    atoms.calc = RemoteCACE(committee_server.url, model="plain", binary=binary)
    atoms.get_potential_energy()
    assert "energy_uncertainty" not in atoms.calc.results
    with pytest.raises(PropertyNotImplementedError, match="not a committee"):
        atoms.calc.get_property("energy_uncertainty", atoms)


@pytest.mark.parametrize("binary", [True, False], ids=["msgpack", "json"])
def test_client_returns_committee_properties(
    committee_server: BackgroundServer, committee: Any, binary: bool
) -> None:
    atoms = water_box(seed=6)
    everything = [
        "energy",
        "forces",
        "stress",
        "energy_uncertainty",
        "forces_uncertainty",
        "committee_energies",
        "committee_forces",
        "committee_virials",
    ]
    want = committee.predict([Structure.from_ase(atoms)], everything)[0]
    n = len(atoms)
    with CACEClient(committee_server.url, binary=binary) as client:
        out = client.calculate(atoms, properties=everything, model="water")
        np.testing.assert_allclose(out["committee_energies"], want.committee_energies, rtol=1e-12)
        assert out["committee_forces"].shape == (4, n, 3)
        np.testing.assert_allclose(out["committee_forces"], want.committee_forces, atol=1e-12)
        assert out["committee_virials"].shape == (4, 3, 3)
        np.testing.assert_allclose(out["committee_virials"], want.committee_virials, atol=1e-12)
        assert out["forces_uncertainty"].shape == (n,)
        assert out["energy_uncertainty"] == pytest.approx(want.energy_uncertainty, rel=1e-10)

        listing = {m["name"]: m for m in client.models()["models"]}
        entry = listing["water"]["committee"]
        assert entry["size"] == 4 and entry["alpha"] == 1.0
        assert [m["name"] for m in entry["members"]] == [f"seed{i}" for i in range(1, 5)]
        assert all(m["family"] == ["cace"] and m["n_parameters"] > 0 for m in entry["members"])
        assert listing["water"]["family"] == ["committee"]
        assert listing["plain"]["committee"] is None

        # committee outputs of a plain model: a 422 naming the property; the server stays up
        for k, name in enumerate(["committee_forces", "energy_uncertainty"]):
            with pytest.raises(CACEServerError) as info:
                client.calculate(atoms, properties=["energy", name], model="plain")
            assert info.value.status == 422 and info.value.kind == "unsupported_property"
            assert info.value.field == "properties.1" and name in info.value.message, k
        assert client.calculate(atoms, model="plain")["energy"] is not None


def test_openapi_documents_the_committee(committee_server: BackgroundServer) -> None:
    import httpx

    schema = httpx.get(f"{committee_server.url}/openapi.json").json()["components"]["schemas"]
    assert {"size", "alpha", "calibration", "members"} <= set(schema["CommitteeOut"]["properties"])
    assert {"name", "family", "n_parameters"} <= set(schema["CommitteeMember"]["properties"])
    assert "committee" in schema["ModelOut"]["properties"]
