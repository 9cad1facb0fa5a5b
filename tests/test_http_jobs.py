"""``/v1/jobs`` over a real server on 127.0.0.1: life cycle, streams, limits, bad input.

The job's numbers are tested against ASE in ``test_jobs.py`` and through the Python
client in ``test_client_jobs.py``; here the HTTP contract: 202 at once, results as
structures finish (NDJSON or msgpack, resumable), a job that outlives its client,
cancellation that frees the engine at once, refusals that name the limit or field,
expiry, metrics, and a server killed mid-job that restarts clean.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import msgpack
import pytest

from cace_server.engine import Engine, EngineSettings
from cace_server.http import BackgroundServer, HttpSettings, create_app
from cace_server.jobs import JobSettings
from scripts.water_clusters import water_boxes, water_clusters
from tests.test_serve_http import ServerProcess

WATER = "cace_server/data/water.safetensors"


def structures(images: list[Any]) -> list[dict[str, Any]]:
    out = []
    for a in images:
        s: dict[str, Any] = {"numbers": a.numbers.tolist(), "positions": a.positions.tolist()}
        if a.pbc.any():
            s["cell"] = a.cell.array.tolist()
            s["pbc"] = True
        out.append(s)
    return out


SMALL = structures(water_clusters(3, seed=1, smallest=2, largest=3))
BIG = structures(water_clusters(6, seed=2, smallest=15, largest=20))


@pytest.fixture(scope="module")
def engine() -> Iterator[Engine]:
    with Engine(WATER, settings=EngineSettings(dtype="float64")) as engine:
        yield engine


@pytest.fixture(scope="module")
def server(engine: Engine) -> Iterator[BackgroundServer]:
    jobs = JobSettings(max_jobs=4, max_jobs_per_client=3, max_job_structures=50, job_ttl_s=600)
    with BackgroundServer(create_app(engine, settings=HttpSettings(), jobs=jobs)) as srv:
        yield srv


def start(server: BackgroundServer, body: dict[str, Any]) -> dict[str, Any]:
    r = httpx.post(server.url + "/v1/jobs", json=body, timeout=30)
    assert r.status_code == 202, r.text
    assert r.headers["location"] == f"/v1/jobs/{r.json()['id']}"
    return r.json()


def ndjson(server: BackgroundServer, job_id: str, **params: Any) -> list[dict[str, Any]]:
    url = f"{server.url}/v1/jobs/{job_id}/results"
    with httpx.stream("GET", url, params=params, timeout=120) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("application/x-ndjson")
        return [json.loads(line) for line in r.iter_lines() if line]


def wait_state(server: BackgroundServer, job_id: str, *states: str, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = httpx.get(f"{server.url}/v1/jobs/{job_id}").json()
        if status["state"] in states:
            return status
        time.sleep(0.05)
    raise TimeoutError(status)


def cancel(server: BackgroundServer, job_id: str) -> dict[str, Any]:
    return httpx.delete(f"{server.url}/v1/jobs/{job_id}", timeout=30).json()


def test_a_job_streams_its_results_and_ends_with_its_state(server: BackgroundServer) -> None:
    job = start(server, {"kind": "relax", "structures": SMALL, "relax": {"steps": 300}})
    assert job["state"] in ("queued", "running") and job["n_structures"] == 3
    lines = ndjson(server, job["id"])
    results, end = lines[:-1], lines[-1]
    assert end == {"end": True, "state": "done", "error": None}
    assert sorted(r["index"] for r in results) == [0, 1, 2]
    for r in results:
        assert r["status"] in ("converged", "not_converged")
        assert len(r["positions"]) == len(SMALL[r["index"]]["numbers"])
    status = httpx.get(f"{server.url}/v1/jobs/{job['id']}").json()
    assert status["finished_structures"] == 3 and status["model_sha"]
    assert status["model_calls"] == status["iterations"] == max(r["steps"] for r in results) + 1
    # read again from a later position, in msgpack, and without waiting
    with httpx.stream(
        "GET",
        f"{server.url}/v1/jobs/{job['id']}/results",
        params={"start": 2},
        headers={"accept": "application/msgpack"},
    ) as r:
        unpacker = msgpack.Unpacker(raw=False)
        for chunk in r.iter_bytes():
            unpacker.feed(chunk)
        packed = list(unpacker)
    assert len(packed) == 2 and packed[0]["index"] == results[2]["index"]
    assert packed[0]["positions"]["dtype"] == "<f8"  # arrays packed, as /v1/calculate does
    assert ndjson(server, job["id"], start=3, wait="false") == [end]
    assert any(j["id"] == job["id"] for j in httpx.get(server.url + "/v1/jobs").json()["jobs"])


def test_a_job_survives_its_client_leaving_and_is_read_later(server: BackgroundServer) -> None:
    job = start(server, {"kind": "relax", "structures": SMALL, "relax": {"steps": 200}})
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as sock:  # a reader that vanishes
        sock.sendall(
            f"GET /v1/jobs/{job['id']}/results HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode()
        )
        assert sock.recv(100).startswith(b"HTTP/1.1 200")
    assert wait_state(server, job["id"], "done")["finished_structures"] == 3
    assert len(ndjson(server, job["id"])) == 4


def test_cancel_frees_the_engine_at_once(server: BackgroundServer, engine: Engine) -> None:
    job = start(server, {"kind": "relax", "structures": BIG, "relax": {"steps": 5000}})
    wait_state(server, job["id"], "running")
    while httpx.get(f"{server.url}/v1/jobs/{job['id']}").json()["iterations"] < 2:
        time.sleep(0.05)
    t0 = time.monotonic()
    status = cancel(server, job["id"])
    assert status["state"] == "cancelled", status
    assert time.monotonic() - t0 < 3
    assert engine.snapshot().queue_depth == 0
    r = httpx.post(server.url + "/v1/calculate", json={**SMALL[0], "properties": ["energy"]})
    assert r.status_code == 200
    lines = ndjson(server, job["id"])
    assert lines[-1]["state"] == "cancelled"


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"relax": {"fmax": -1}}, "relax.fmax"),
        ({"relax": {"optimizer": "SteepestDescent"}}, "relax.optimizer"),
        ({"relax": {"optimizer": "LBFGS", "optimizer_args": {"dt": 0.1}}}, "relax.optimizer_args"),
        ({"relax": {"cell": True}}, "structures.0.pbc"),
        ({"md": {"integrator": "langevin"}, "kind": "md"}, "md.temperature_K"),
        ({"md": {"timestep_fs": 0}, "kind": "md"}, "md.timestep_fs"),
        ({"md": {"steps": 10}}, "md"),
        ({"kind": "anneal"}, "kind"),
        ({"structures": [{**SMALL[0], "fixed": [0, 99]}]}, "structures.0.fixed"),
        (
            {"structures": [{**SMALL[0], "velocities": [[0, 0, 0]]}], "kind": "md"},
            "structures.0.velocities",
        ),
        ({"structures": [{**SMALL[0], "numbers": [6, 1, 1, 8, 1, 1]}]}, "structures.0.numbers.0"),
        ({"structures": []}, "structures"),
        ({"model": "nope"}, "model"),
    ],
)
def test_bad_jobs_are_refused_naming_the_field(
    server: BackgroundServer, change: dict[str, Any], field: str
) -> None:
    body = {"kind": "relax", "structures": SMALL[:1], **change}
    r = httpx.post(server.url + "/v1/jobs", json=body)
    assert 400 <= r.status_code < 500, r.text
    assert r.json()["field"] == field, r.json()


def test_limits_are_413_and_429_with_the_reason(server: BackgroundServer) -> None:
    r = httpx.post(server.url + "/v1/jobs", json={"kind": "relax", "structures": SMALL * 17})
    assert r.status_code == 413 and "max_job_structures" in r.json()["message"]
    r = httpx.post(
        server.url + "/v1/jobs",
        json={"kind": "relax", "structures": SMALL, "relax": {"steps": 10**6}},
    )
    assert r.status_code == 413 and r.json()["field"] == "relax.steps"
    long = {"kind": "relax", "structures": BIG[:1], "relax": {"steps": 100_000, "fmax": 1e-6}}
    started = [start(server, long) for _ in range(3)]
    try:
        r = httpx.post(server.url + "/v1/jobs", json=long)
        assert r.status_code == 429, r.text
        assert "max_jobs_per_client" in r.json()["message"] and "retry-after" in r.headers
    finally:
        for job in started:
            cancel(server, job["id"])


def test_a_forgotten_job_is_gone_and_unknown_ids_are_404(server: BackgroundServer) -> None:
    job = start(server, {"kind": "relax", "structures": SMALL[:1], "relax": {"steps": 5}})
    wait_state(server, job["id"], "done")
    r = httpx.delete(f"{server.url}/v1/jobs/{job['id']}", params={"forget": "true"})
    assert r.status_code == 200
    r = httpx.get(f"{server.url}/v1/jobs/{job['id']}")
    assert r.status_code == 404 and r.json()["error"] == "unknown_job"


def test_finished_jobs_expire(engine: Engine) -> None:
    app = create_app(engine, settings=HttpSettings(), jobs=JobSettings(job_ttl_s=0.5))
    with BackgroundServer(app) as srv:
        job = start(srv, {"kind": "md", "structures": SMALL[:1], "md": {"steps": 2}})
        wait_state(srv, job["id"], "done")
        time.sleep(0.7)
        assert httpx.get(f"{srv.url}/v1/jobs/{job['id']}").status_code == 404


def test_jobs_need_the_token_and_show_in_metrics(engine: Engine) -> None:
    app = create_app(engine, settings=HttpSettings(token="s3cret"))
    with BackgroundServer(app) as srv:
        body = {"kind": "md", "structures": SMALL[:1], "md": {"steps": 3, "stride": 1}}
        assert httpx.post(srv.url + "/v1/jobs", json=body).status_code == 401
        auth = {"authorization": "Bearer s3cret"}
        r = httpx.post(srv.url + "/v1/jobs", json=body, headers=auth)
        assert r.status_code == 202
        job_id = r.json()["id"]
        assert httpx.get(f"{srv.url}/v1/jobs/{job_id}").status_code == 401
        deadline = time.monotonic() + 30
        while httpx.get(f"{srv.url}/v1/jobs/{job_id}", headers=auth).json()["state"] != "done":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        metrics = httpx.get(srv.url + "/metrics", headers=auth).text
        assert 'cace_jobs{state="done"} 1.0' in metrics
        assert "cace_job_iterations_total 4.0" in metrics
        assert 'cace_job_structures_total{kind="md",status="done"} 1.0' in metrics


def test_an_md_job_returns_frames_at_its_stride(server: BackgroundServer) -> None:
    boxes = structures(water_boxes(2, 8, seed=3))
    body = {
        "kind": "md",
        "structures": boxes,
        "md": {
            "steps": 6,
            "stride": 3,
            "initial_temperature_K": 300,
            "frame_fields": ["velocities"],
        },
    }
    job = start(server, body)
    lines = ndjson(server, job["id"])
    assert lines[-1]["state"] == "done"
    for r in lines[:-1]:
        assert [f["step"] for f in r["frames"]] == [0, 3, 6]
        assert "velocities" in r["frames"][0] and "positions" not in r["frames"][0]
        assert r["steps"] == 6 and r["temperature_K"] > 0
    assert httpx.get(f"{server.url}/v1/jobs/{job['id']}").json()["model_calls"] == 7


def test_a_server_killed_mid_job_restarts_clean(tmp_path: Path) -> None:
    """Jobs live in memory: a killed server loses the job it ran and nothing else."""
    servers = [ServerProcess(tmp_path)]
    try:
        first = servers[0]
        first.wait_ready()
        body = {"kind": "relax", "structures": BIG, "relax": {"steps": 10_000}}
        r = httpx.post(first.url + "/v1/jobs", json=body, timeout=30)
        assert r.status_code == 202
        job_id = r.json()["id"]
        while httpx.get(f"{first.url}/v1/jobs/{job_id}").json()["iterations"] < 1:
            time.sleep(0.05)
        first.proc.kill()
        first.proc.wait(10)
        servers.append(ServerProcess(tmp_path))
        again = servers[1]
        again.wait_ready()
        assert httpx.get(again.url + "/readyz").status_code == 200
        r = httpx.get(f"{again.url}/v1/jobs/{job_id}")
        assert r.status_code == 404 and "restarted" in r.json()["message"]
        assert httpx.get(again.url + "/v1/jobs").json() == {"jobs": []}
        small = {"kind": "relax", "structures": SMALL[:1], "relax": {"steps": 3}}
        assert httpx.post(again.url + "/v1/jobs", json=small).status_code == 202
    finally:
        for server in servers:
            server.stop()
