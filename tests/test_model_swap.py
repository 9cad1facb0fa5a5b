"""Hot model swaps over HTTP: a real uvicorn server on 127.0.0.1, real model files.

Load from 16 clients during a swap (no failed request, every reply computed by the
version it names, old-version replies all sent before the swap ended) and the
refused swaps (each a clear 4xx; the old version keeps serving, the gauge unchanged).
"""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from cace_server.engine import Engine, EngineSettings
from cace_server.engine.models import model_sha
from cace_server.http import BackgroundServer, HttpSettings, create_app
from cace_server.model import load_model, random_model, save_model
from cace_server.structures import Structure

ROOT = Path(__file__).resolve().parents[1]
WATER = ROOT / "cace_server" / "data" / "water.safetensors"
SEED1 = ROOT / "tests" / "data" / "committee" / "seed1.safetensors"
SEED2 = ROOT / "tests" / "data" / "committee" / "seed2.safetensors"
TOKEN = "swap-token"
AUTH = {"authorization": f"Bearer {TOKEN}"}


def water(seed: int) -> Structure:
    rng = np.random.default_rng(seed)
    base = np.array([[0.0, 0.0, 0.0], [0.96, 0.0, 0.0], [-0.24, 0.93, 0.0]])
    return Structure.create([8, 1, 1], base + rng.normal(0, 0.03, base.shape))


def body(s: Structure) -> dict[str, Any]:
    return {"numbers": s.numbers.tolist(), "positions": s.positions.tolist()}


@pytest.fixture
def update_dir(tmp_path: Path) -> Path:
    d = tmp_path / "models"
    d.mkdir()
    for src in (WATER, SEED1, SEED2):
        shutil.copy(src, d / src.name)
    save_model(random_model((1,), seed=3), d / "hydrogen.safetensors")
    damaged = bytearray((d / "seed2.safetensors").read_bytes())
    damaged[-100] ^= 0xFF  # a weight byte: the checksum no longer holds
    (d / "damaged.safetensors").write_bytes(bytes(damaged))
    return d


@pytest.fixture
def engine(update_dir: Path) -> Iterator[Engine]:
    settings = EngineSettings(dtype="float64", batch_wait_ms=2.0)
    with Engine({"water": update_dir / "water.safetensors"}, settings=settings) as eng:
        yield eng


def serve(engine: Engine, **options: Any) -> BackgroundServer:
    return BackgroundServer(create_app(engine, settings=HttpSettings(**options)))


def version_gauge(client: httpx.Client) -> dict[str, str]:
    out = {}
    for family in text_string_to_metric_families(client.get("/metrics", headers=AUTH).text):
        for sample in family.samples:
            if sample.name == "cace_model_version_info" and sample.value == 1:
                out[sample.labels["model"]] = sample.labels["sha"]
    return out


def test_swap_under_load_from_16_clients(engine: Engine, update_dir: Path) -> None:
    old_sha = model_sha(WATER)
    new_sha = model_sha(SEED1)
    reference = {
        sha: load_model(path, dtype="float64") for sha, path in ((old_sha, WATER), (new_sha, SEED1))
    }
    structures = [water(k) for k in range(8)]
    expected = {
        sha: [m.predict([s], ["energy"])[0].energy for s in structures]
        for sha, m in reference.items()
    }
    replies: list[tuple[float, str, int, float]] = []  # (sent, sha, structure, energy)
    failures: list[str] = []
    lock = threading.Lock()
    swapped = threading.Event()
    opts = dict(allow_model_updates=True, model_update_dir=str(update_dir), token=TOKEN)
    with serve(engine, **opts) as srv:

        def client(k: int) -> None:
            with httpx.Client(base_url=srv.url, timeout=60, headers=AUTH) as c:
                for i in range(40):
                    if swapped.is_set() and i % 10 == 9:
                        break  # bounded: a few requests after the swap, then stop
                    j = (k + i) % len(structures)
                    sent = time.monotonic()
                    r = c.post("/v1/calculate", json=body(structures[j]))
                    with lock:
                        if r.status_code != 200:
                            failures.append(r.text)
                        else:
                            out = r.json()
                            replies.append((sent, out["model_sha"], j, out["energy"]))

        threads = [threading.Thread(target=client, args=(k,)) for k in range(16)]
        for t in threads:
            t.start()
        time.sleep(1.0)
        with httpx.Client(base_url=srv.url, timeout=120, headers=AUTH) as c:
            r = c.put("/v1/models/water", json={"path": str(update_dir / SEED1.name)})
            done = time.monotonic()
            swapped.set()
            assert r.status_code == 200, r.text
            assert r.json()["model_sha"] == new_sha
            for t in threads:
                t.join(120)
            assert c.get("/v1/models").json()["models"][0]["model_sha"] == new_sha
            assert version_gauge(c) == {"water": new_sha}
    assert not failures, failures[:3]
    shas = {sha for _, sha, _, _ in replies}
    assert shas == {old_sha, new_sha}
    for sent, sha, j, energy in replies:
        assert energy == pytest.approx(expected[sha][j], abs=1e-8), sha
        if sha == old_sha:
            assert sent < done  # old-version replies were all sent before the swap ended
    assert any(sha == new_sha and sent > done for sent, sha, _, _ in replies)


@pytest.mark.parametrize(
    ("case", "status", "kind"),
    [
        ("disabled", 403, "updates_disabled"),
        ("no_token", 401, "unauthorized"),
        ("damaged", 422, "bad_model"),
        ("not_a_model", 422, "bad_model"),
        ("outside", 403, "path_not_allowed"),
        ("species", 409, "species_in_use"),
    ],
)
def test_bad_swaps_are_refused_and_the_old_version_serves(
    engine: Engine, update_dir: Path, tmp_path: Path, case: str, status: int, kind: str
) -> None:
    old_sha = model_sha(WATER)
    outside = tmp_path / "elsewhere.safetensors"
    shutil.copy(SEED1, outside)
    opts: dict[str, Any] = dict(model_update_dir=str(update_dir), token=TOKEN)
    opts["allow_model_updates"] = case != "disabled"
    with serve(engine, **opts) as srv, httpx.Client(base_url=srv.url, timeout=60) as c:
        # a live HTTP session using O and H: a model without O must be refused
        session = {**AUTH, "x-cace-session": "md-1"}
        first = c.post("/v1/calculate", json=body(water(0)), headers=session)
        assert first.status_code == 200 and first.json()["model_sha"] == old_sha
        headers = {} if case == "no_token" else AUTH
        if case == "not_a_model":
            r = c.put("/v1/models/water", content=b"not a model at all", headers=headers)
        else:
            name = {
                "damaged": "damaged.safetensors",
                "species": "hydrogen.safetensors",
            }.get(case, "seed1.safetensors")
            path = outside if case == "outside" else update_dir / name
            r = c.put("/v1/models/water", json={"path": str(path)}, headers=headers)
        assert r.status_code == status, r.text
        assert r.json()["error"] == kind
        if case == "species":
            assert "O (used by the live trajectory http:md-1)" in r.json()["message"]
        again = c.post("/v1/calculate", json=body(water(1)), headers=session)
        assert again.status_code == 200 and again.json()["model_sha"] == old_sha
        assert version_gauge(c) == {"water": old_sha}
    assert engine.model_info("water").sha == old_sha


def test_upload_and_reload(engine: Engine, update_dir: Path) -> None:
    opts = dict(allow_model_updates=True, token=TOKEN)
    with serve(engine, **opts) as srv, httpx.Client(base_url=srv.url, timeout=60) as c:
        r = c.put("/v1/models/water", content=SEED2.read_bytes(), headers=AUTH)
        assert r.status_code == 200, r.text
        assert r.json()["model_sha"] == model_sha(SEED2)
        # no update directory: paths are refused, uploads are not
        r = c.put("/v1/models/water", json={"path": str(update_dir / "seed1.safetensors")})
        assert r.status_code == 401
        r = c.put(
            "/v1/models/water",
            json={"path": str(update_dir / "seed1.safetensors")},
            headers=AUTH,
        )
        assert r.status_code == 403 and r.json()["error"] == "path_not_allowed"
        r = c.post("/v1/models/water/reload", headers=AUTH)  # same file: same version
        assert r.status_code == 200 and r.json()["model_sha"] == model_sha(SEED2)
        out = c.post("/v1/calculate", json=body(water(2)), headers=AUTH).json()
        assert out["model_sha"] == model_sha(SEED2)


def test_a_step_split_into_batches_keeps_one_version(update_dir: Path) -> None:
    """An i-PI step whose first bead ran alone (it came before the step's time limit
    let the batch go) and was answered before the swap: the step's other bead still
    gets the old version; the next step gets the new one (found by the real i-PI in
    tests/test_ipi_swap.py)."""
    old_sha, new_sha = model_sha(WATER), model_sha(SEED1)
    settings = EngineSettings(dtype="float64", batch_wait_ms=2.0, step_wait_ms=20.0)
    with Engine({"water": update_dir / "water.safetensors"}, settings=settings) as eng:
        group = eng.step_group("ipi:test", 2)

        def bead(member: str, seed: int) -> str:
            (future,) = eng.submit(water(seed), lane="ipi", trajectory=member, step_group=group)
            return str(future.result(60).extras["model_sha"])

        assert [bead("a", 0), bead("b", 1)] == [old_sha, old_sha]  # a whole step
        assert bead("a", 2) == old_sha  # alone: the step's time limit let it run
        assert eng.swap_model("water", update_dir / SEED1.name).sha == new_sha
        assert bead("b", 3) == old_sha  # the same step: the version it began with
        assert [bead("a", 4), bead("b", 5)] == [new_sha, new_sha]  # the next step
        assert [bead("a", 6), bead("b", 7)] == [new_sha, new_sha]
        assert eng.model_info("water").sha == new_sha
