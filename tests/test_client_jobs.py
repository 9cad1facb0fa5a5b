"""The client of server-side jobs (``cace_client.jobs``) against a real server on 127.0.0.1.

A relaxation job must equal ASE's FIRE run through ``RemoteCACE`` on the same images
(same steps, same positions), MD trajectories come back frame by frame with the
velocities they started from, futures gather several jobs, and a cancelled job keeps
what finished.
"""

from __future__ import annotations

import asyncio
import select
import socket
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import wait
from pathlib import Path

import ase
import numpy as np
import pytest
from ase.constraints import FixAtoms
from ase.md.verlet import VelocityVerlet
from ase.optimize import FIRE

from cace_server.engine import Engine, EngineSettings
from cace_server.http import BackgroundServer, HttpSettings, create_app
from scripts.water_clusters import water_clusters

CLIENTS = Path(__file__).resolve().parents[1] / "clients"
WATER = Path(__file__).resolve().parents[1] / "cace_server" / "data" / "water.safetensors"
try:
    import cace_client
except ImportError:  # not installed: use the source tree
    sys.path.insert(0, str(CLIENTS))
    import cace_client  # noqa: F401

from cace_client import AsyncCACEClient, CACEClient, CACEServerError, RemoteCACE  # noqa: E402


class DroppingProxy:
    """A TCP relay to the server that cuts the first results stream after two chunks
    of its reply (its headers, then the first record): a dropped connection."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.drops = 0
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while True:
            try:
                downstream, _ = self.listener.accept()
            except OSError:
                return  # closed
            threading.Thread(target=self._relay, args=(downstream,), daemon=True).start()

    def _relay(self, down: socket.socket) -> None:
        up = socket.create_connection(("127.0.0.1", self.port))
        chunks, cut = 0, False
        with down, up:
            while True:
                ready, _, _ = select.select([down, up], [], [], 5.0)
                if not ready:
                    return
                for sock in ready:
                    data = sock.recv(65536)
                    if not data:
                        return
                    if sock is down:
                        if not cut and b"/results" in data and self.drops == 0:
                            cut, chunks = True, 0  # count this stream's chunks only
                        up.sendall(data)
                        continue
                    down.sendall(data)
                    chunks += 1
                    if cut and chunks == 2:
                        self.drops += 1
                        return

    def close(self) -> None:
        self.listener.close()


@pytest.fixture(scope="module")
def server() -> Iterator[BackgroundServer]:
    with (
        Engine(WATER, settings=EngineSettings(dtype="float64")) as engine,
        BackgroundServer(create_app(engine, settings=HttpSettings())) as srv,
    ):
        yield srv


@pytest.fixture(scope="module")
def client(server: BackgroundServer) -> Iterator[CACEClient]:
    with CACEClient(server.url, binary=True) as c:
        yield c


@pytest.fixture(scope="module")
def clusters() -> list[ase.Atoms]:
    images = water_clusters(4, smallest=2, largest=5)
    images[1].set_constraint(FixAtoms(indices=[0, 1]))
    return images


@pytest.fixture(scope="module")
def relaxed(client: CACEClient, clusters: list[ase.Atoms]) -> list[ase.Atoms]:
    return client.relax(clusters, fmax=0.05, steps=300)


def test_relax_equals_ase_fire_through_remote_calculator(
    client: CACEClient, clusters: list[ase.Atoms], relaxed: list[ase.Atoms]
) -> None:
    assert len(relaxed) == len(clusters)
    for image, out in zip(clusters, relaxed, strict=True):
        atoms = image.copy()
        atoms.calc = RemoteCACE(client.url, client=client)
        optimizer = FIRE(atoms, logfile=None)
        converged = optimizer.run(fmax=0.05, steps=300)
        assert out.info["steps"] == optimizer.nsteps
        assert out.info["converged"] is bool(converged)
        assert np.abs(out.get_positions() - atoms.get_positions()).max() < 1e-6
        # what comes back: the final state in a single-point calculator
        assert out.get_potential_energy() == pytest.approx(atoms.get_potential_energy(), abs=1e-6)
        assert np.abs(out.get_forces() - atoms.get_forces()).max() < 1e-6
        assert out.info["fmax"] == pytest.approx(
            np.linalg.norm(atoms.get_forces(), axis=1).max(), abs=1e-6
        )
        assert len(out.constraints) == len(image.constraints)  # a copy of the input image


def test_fixed_atoms_do_not_move(clusters: list[ase.Atoms], relaxed: list[ase.Atoms]) -> None:
    before, after = clusters[1].get_positions(), relaxed[1].get_positions()
    assert np.array_equal(after[:2], before[:2])
    assert np.abs(after[2:] - before[2:]).max() > 1e-3


def test_md_trajectories_start_from_the_images_velocities(
    client: CACEClient, clusters: list[ase.Atoms]
) -> None:
    moving = clusters[0].copy()
    moving.set_masses(np.full(len(moving), 4.0))  # custom masses travel too
    moving.set_velocities(np.random.default_rng(3).normal(0.0, 0.02, (len(moving), 3)))
    resting = clusters[2].copy()
    steps, stride = 20, 5
    trajectories = client.md(
        [moving, resting],
        steps=steps,
        stride=stride,
        timestep_fs=0.5,
        frame_fields=("positions", "velocities"),
    )
    assert [len(t) for t in trajectories] == [steps // stride + 1] * 2
    first = trajectories[0][0]
    assert first.info["step"] == 0
    assert first.info["kinetic_energy"] == pytest.approx(moving.get_kinetic_energy(), rel=1e-12)
    assert np.allclose(first.get_velocities(), moving.get_velocities(), rtol=0, atol=1e-12)
    assert trajectories[1][0].info["kinetic_energy"] == 0.0
    assert [a.info["step"] for a in trajectories[0]] == list(range(0, steps + 1, stride))

    # the same run with ASE's VelocityVerlet through RemoteCACE
    reference = moving.copy()
    reference.calc = RemoteCACE(client.url, client=client)
    VelocityVerlet(reference, timestep=0.5 * ase.units.fs).run(steps)
    last = trajectories[0][-1]
    assert np.abs(last.get_positions() - reference.get_positions()).max() < 1e-6
    assert last.get_potential_energy() == pytest.approx(reference.get_potential_energy(), abs=1e-6)


def test_futures_of_two_jobs_and_a_progress_bar(
    client: CACEClient,
    clusters: list[ase.Atoms],
    relaxed: list[ase.Atoms],
    capsys: pytest.CaptureFixture[str],
) -> None:
    first = client.submit_relax(clusters[:2], fmax=0.05, steps=300)
    second = client.submit_relax(clusters[2:], fmax=0.05, steps=300)
    futures = [first.future(), second.future()]
    done, _ = wait(futures, timeout=120)
    assert len(done) == 2
    gathered = futures[0].result() + futures[1].result()
    for out, ref in zip(gathered, relaxed, strict=True):
        assert np.abs(out.get_positions() - ref.get_positions()).max() < 1e-9

    capsys.readouterr()
    with_bar = client.relax(clusters, fmax=0.05, steps=300, progress=True)
    err = capsys.readouterr().err
    assert f"{len(clusters)}/{len(clusters)}" in err
    assert "relax" in err
    assert [a.info["steps"] for a in with_bar] == [a.info["steps"] for a in relaxed]


def test_a_job_outlives_its_client(server: BackgroundServer, clusters: list[ase.Atoms]) -> None:
    with CACEClient(server.url) as gone:  # JSON and NDJSON this time
        job_id = gone.submit_relax(clusters[:2], fmax=0.05, steps=300).id
    with CACEClient(server.url) as later:
        handle = later.job(job_id, clusters[:2])
        records = handle.results()
        assert [r["index"] for r in records] == [0, 1]
        assert handle.status()["state"] == "done"
        assert len(handle.atoms()) == 2
        assert handle.forget()["id"] == job_id
        with pytest.raises(CACEServerError) as info:
            later.job(job_id)
        assert info.value.status == 404


def test_a_dropped_stream_resumes_and_the_job_goes_on(
    server: BackgroundServer, clusters: list[ase.Atoms], relaxed: list[ase.Atoms]
) -> None:
    port = int(server.url.rsplit(":", 1)[1])
    proxy = DroppingProxy(port)
    try:
        with CACEClient(proxy.url, binary=True, backoff=0.05) as through:
            handle = through.submit_relax(clusters, fmax=0.05, steps=300)
            records = handle.results()
            out = handle.atoms()
    finally:
        proxy.close()
    assert proxy.drops == 1
    assert [r["index"] for r in records] == list(range(len(clusters)))  # none twice
    for a, b in zip(out, relaxed, strict=True):
        assert a.info["steps"] == b.info["steps"]
        assert np.abs(a.get_positions() - b.get_positions()).max() < 1e-9


def test_cancel_keeps_what_finished(client: CACEClient, clusters: list[ase.Atoms]) -> None:
    lone = ase.Atoms("O", positions=[[0.0, 0.0, 0.0]])  # no forces: converged at once
    handle = client.submit_relax([clusters[3], lone], fmax=1e-12, steps=100_000)
    first = next(iter(handle.iter_results()))
    assert first["index"] == 1 and first["status"] == "converged"
    assert handle.cancel()["state"] == "cancelled"
    records = handle.results()
    assert [r["index"] for r in records] == [1]
    kept = handle.atoms(errors="keep")
    assert kept[0] is None and kept[1] is not None and kept[1].info["converged"]
    with pytest.raises(CACEServerError, match="no result"):
        handle.atoms()


def test_bad_parameters_name_the_field(client: CACEClient, clusters: list[ase.Atoms]) -> None:
    with pytest.raises(CACEServerError) as info:
        client.relax(clusters[:1], fmax=-1)
    assert info.value.field == "relax.fmax"
    with pytest.raises(CACEServerError) as info:
        client.submit_md(clusters[:1], steps=1, no_such_setting=1)
    assert info.value.field is not None and "no_such_setting" in info.value.field


def test_async_client_starts_watches_and_cancels(
    server: BackgroundServer, clusters: list[ase.Atoms]
) -> None:
    async def run() -> tuple[dict, dict]:
        async with AsyncCACEClient(server.url) as c:
            started = await c.submit_job("md", clusters[:1], {"steps": 100_000, "stride": 0})
            assert (await c.job(started["id"]))["kind"] == "md"
            return started, await c.cancel_job(started["id"], forget=True)

    started, cancelled = asyncio.run(run())
    assert cancelled["id"] == started["id"]
    assert cancelled["state"] == "cancelled"
