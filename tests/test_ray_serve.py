"""The Ray Serve application on a local Ray cluster of two nodes (CPU only, loopback).

Two replicas behind Ray's HTTP proxy: the Python client and the ASE calculator work
unchanged and give what a plain in-process server gives; requests spread over both
replicas (their counters, as Ray exports them with the replica as a label); a
replica killed mid-request is replaced, the requests it held fail with a status the
client retries, and requests after it succeed. Needs the extra (``cace-server[ray]``);
ray is imported only by these tests, which are in the slow suite.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from cace_server.engine import Engine, EngineSettings
from cace_server.http import BackgroundServer, create_app
from cace_server.server import default_model_path
from scripts.water_clusters import water_boxes

CLIENTS = Path(__file__).resolve().parents[1] / "clients"
try:
    import cace_client
except ImportError:  # not installed: use the source tree
    sys.path.insert(0, str(CLIENTS))
    import cace_client  # noqa: F401

from cace_client import CACEClient, RemoteCACE  # noqa: E402
from cace_client.client import retryable  # noqa: E402

pytestmark = pytest.mark.slow

REASON = "Ray Serve is not installed: pip install 'cace-server[ray]'"


def ray_serve() -> Any:
    pytest.importorskip("ray", reason=REASON)
    pytest.importorskip("ray.serve", reason=REASON)
    import cace_server.ray_serve as module

    return module


@pytest.fixture(scope="module")
def fleet() -> Iterator[Any]:
    module = ray_serve()
    with module.local_fleet(
        {"num_replicas": 2, "torch_threads": 1, "dtype": "float64", "metrics_interval_s": 0.5},
        nodes=2,
        cpus_per_node=1,
    ) as running:
        yield running


@pytest.fixture(scope="module")
def plain() -> Iterator[BackgroundServer]:
    settings = EngineSettings(dtype="float64", torch_threads=1)
    with (
        Engine({"default": str(default_model_path())}, settings=settings) as engine,
        BackgroundServer(create_app(engine)) as server,
    ):
        yield server


def boxes(count: int = 4) -> list[Any]:
    return water_boxes(count, molecules=16, seed=3)


def test_client_and_calculator_match_a_plain_server(fleet: Any, plain: BackgroundServer) -> None:
    images = boxes()
    with CACEClient(fleet.url) as through_ray, CACEClient(plain.url) as direct:
        assert through_ray.models() == direct.models()
        for atoms in images:
            got, want = through_ray.calculate(atoms), direct.calculate(atoms)
            assert got["energy"] == pytest.approx(want["energy"], abs=1e-10, rel=0)
            np.testing.assert_allclose(got["forces"], want["forces"], atol=1e-10, rtol=0)
            np.testing.assert_allclose(got["stress"], want["stress"], atol=1e-10, rtol=0)
        batch = through_ray.calculate_batch(images)
        for got, want in zip(batch, direct.calculate_batch(images), strict=True):
            assert got["energy"] == pytest.approx(want["energy"], abs=1e-10, rel=0)
    for atoms in images[:2]:
        ray_atoms, plain_atoms = atoms.copy(), atoms.copy()
        ray_atoms.calc, plain_atoms.calc = RemoteCACE(fleet.url), RemoteCACE(plain.url)
        assert ray_atoms.get_potential_energy() == pytest.approx(
            plain_atoms.get_potential_energy(), abs=1e-10, rel=0
        )
        np.testing.assert_allclose(ray_atoms.get_forces(), plain_atoms.get_forces(), atol=1e-10)
    for path in ("/healthz", "/readyz", "/v1/models"):
        assert httpx.get(fleet.url + path, timeout=30).status_code == 200
    assert "cace_engine_requests" in httpx.get(fleet.url + "/metrics", timeout=30).text


def test_requests_spread_over_both_replicas(fleet: Any) -> None:
    """Concurrent requests reach both replicas: their counters, labelled by replica."""
    time.sleep(3.0)  # what came before is exported (copied every 0.5 s, reported every 1 s)
    before = fleet.per_replica("cace_engine_structures_total")
    images = boxes(2)
    n = 48

    def send(k: int) -> None:
        with CACEClient(fleet.url) as client:
            for _ in range(n // 8):
                client.calculate(images[k % 2])

    threads = [threading.Thread(target=send, args=(k,)) for k in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(300)
    deadline = time.monotonic() + 60
    while True:
        after = fleet.per_replica("cace_engine_structures_total")
        added = {r: v - before.get(r, 0.0) for r, v in after.items()}
        if sum(added.values()) >= n or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert sum(added.values()) == n, added
    assert len([r for r, v in added.items() if v > 0]) == 2, added
    # every copied metric carries the replica, deployment and application labels
    text = httpx.get(fleet.metrics_urls[0], timeout=10).text + "".join(
        httpx.get(url, timeout=10).text for url in fleet.metrics_urls[1:]
    )
    lines = [line for line in text.splitlines() if line.startswith("ray_cace_http_requests_total{")]
    assert lines and all('replica="' in line and 'application="cace"' in line for line in lines)


def test_a_killed_replica_is_replaced_and_its_requests_retried(fleet: Any) -> None:
    import ray
    from ray import serve

    images = boxes(4)
    stop = threading.Event()
    retried: list[str] = []
    raw: list[tuple[int, bool]] = []
    errors: list[BaseException] = []

    def with_retries() -> None:
        try:
            with CACEClient(fleet.url, retries=5, backoff=0.2) as client:
                while not stop.is_set():
                    out = client.calculate_batch(images)
                    retried.append("ok" if len(out) == len(images) else "short")
        except BaseException as exc:
            errors.append(exc)

    def without_retries() -> None:
        with CACEClient(fleet.url, retries=0) as client:
            body = client._batch_body(images, None, None)
        with httpx.Client(base_url=fleet.url, timeout=120) as http:
            while not stop.is_set():
                response = http.post("/v1/calculate/batch", json=body)
                raw.append((response.status_code, retryable(response)))

    def replicas() -> list[dict[str, str]]:
        return [
            actor
            for actor in ray.util.list_named_actors(all_namespaces=True)
            if actor["name"].startswith("SERVE_REPLICA::cace#")
        ]

    victim = replicas()[0]
    threads = [threading.Thread(target=with_retries) for _ in range(3)]
    threads += [threading.Thread(target=without_retries) for _ in range(8)]
    for thread in threads:
        thread.start()
    try:
        time.sleep(3.0)  # both replicas busy
        ray.kill(ray.get_actor(victim["name"], namespace=victim["namespace"]), no_restart=True)
        time.sleep(3.0)
    finally:
        stop.set()
        for thread in threads:
            thread.join(300)
    assert not errors, errors
    assert retried and set(retried) == {"ok"}
    failed = [(status, ok) for status, ok in raw if status != 200]
    # Ray's proxy answers 500 (text, not our error body) for a replica that died
    # mid-request: the client retries it like a dropped connection.
    assert failed, "no request was in flight on the killed replica"
    assert all(ok for _, ok in failed), failed

    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        names = {actor["name"] for actor in replicas()}
        status = serve.status().applications["cace"].deployments["CACE"]
        # (the status lags the kill: two replicas named, the victim not among them)
        if len(names - {victim["name"]}) == 2 and status.replica_states.get("RUNNING") == 2:
            break
        time.sleep(1.0)
    assert victim["name"] not in names and len(names) == 2, (names, status)
    with CACEClient(fleet.url, retries=0) as client:
        for atoms in images:
            assert np.isfinite(client.calculate(atoms)["energy"])


def test_builder_arguments(tmp_path: Path) -> None:
    module = ray_serve()
    options = module.deployment_options({**module.RAY_ARGS, "max_replicas": "3"})
    auto = options["autoscaling_config"]
    assert (auto.min_replicas, auto.max_replicas, auto.target_ongoing_requests) == (1, 3, 32)
    assert options["max_ongoing_requests"] == 64
    fixed = module.deployment_options({**module.RAY_ARGS, "num_replicas": "2", "num_gpus": "1"})
    assert fixed["num_replicas"] == 2 and "autoscaling_config" not in fixed
    assert fixed["ray_actor_options"] == {"num_cpus": 1.0, "num_gpus": 1.0}
    assert module.replica_device([]) == "cpu"
    assert module.replica_device(["3"]) == "cuda:0"
    assert module.replica_device(["0", "1"]) == "cuda:0,cuda:1"

    settings = module.replica_settings({"dtype": "float32"}, num_cpus=2, environ={})
    assert settings.engine.torch_threads == 2 and settings.engine.dtype == "float32"
    settings = module.replica_settings({"torch_threads": "3"}, num_cpus=1, environ={})
    assert settings.engine.torch_threads == 3
    with pytest.raises(ValueError, match="num_gpus"):
        module.replica_settings({"device": "cuda"}, num_cpus=1, environ={})
    template = tmp_path / "water.xyz"
    boxes(1)[0].write(template)
    with pytest.raises(ValueError, match="inet"):
        module.replica_settings(
            {"ipi": "inet:localhost:31415", "ipi_template": str(template)}, num_cpus=1, environ={}
        )
    with pytest.raises(ValueError, match="unknown setting"):
        module.replica_settings({"no_such": "1"}, num_cpus=1, environ={})
    with pytest.raises(ValueError, match="max_ongoing_requests"):
        module.deployment_options({**module.RAY_ARGS, "max_ongoing_requests": "many"})


def test_the_serve_config_file_builds() -> None:
    """deploy/ray/serve_config.yaml passes Ray's schema and builds the application."""
    import yaml

    module = ray_serve()
    from ray.serve.schema import ServeDeploySchema

    path = Path(__file__).resolve().parents[1] / "deploy" / "ray" / "serve_config.yaml"
    config = yaml.safe_load(path.read_text())
    ServeDeploySchema.model_validate(config)
    (app,) = config["applications"]
    built = module.app_builder(app["args"])
    options = built._bound_deployment
    assert options.ray_actor_options["num_gpus"] == app["args"]["num_gpus"]
    assert options.max_ongoing_requests == app["args"]["max_ongoing_requests"]
