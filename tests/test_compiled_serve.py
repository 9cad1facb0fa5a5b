"""`cace-server serve --compile`: compiled before ready, compiled later off the request
path, the same numbers as eager, and counted in /metrics."""

from __future__ import annotations

import time
from pathlib import Path

import ase
import ase.io
import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from cace_server.model import random_model, save_model
from cace_server.model.compiled import COMPILE_AFTER
from cace_server.structures import Structure
from tests.test_serve_http import ServerProcess

pytestmark = pytest.mark.slow


def water_box(repeat: int, seed: int) -> ase.Atoms:
    rng = np.random.default_rng(seed)
    cells = []
    for i in range(repeat):
        for j in range(repeat):
            for k in range(repeat):
                origin = 3.1 * np.array([i, j, k]) + rng.uniform(-0.1, 0.1, 3)
                cells.append(origin + np.array([[0, 0, 0], [0.96, 0, 0], [-0.24, 0.93, 0]]))
    return ase.Atoms("OHH" * repeat**3, np.concatenate(cells), cell=[3.1 * repeat] * 3, pbc=True)


def metrics(url: str) -> dict[str, float]:
    out = {}
    for family in text_string_to_metric_families(httpx.get(url + "/metrics").text):
        for sample in family.samples:
            if sample.name.startswith("cace_model_"):
                out[sample.name] = sample.value
    return out


def payload(atoms: ase.Atoms) -> dict:
    return {
        "numbers": atoms.numbers.tolist(),
        "positions": atoms.positions.tolist(),
        "cell": atoms.cell.array.tolist(),
        "pbc": True,
    }


def test_compiled_before_ready_then_off_the_request_path(tmp_path: Path) -> None:
    model = random_model((1, 8), seed=4, num_message_passing=1)
    path = save_model(model, tmp_path / "small.safetensors")
    warm = water_box(2, seed=0)
    ase.io.write(tmp_path / "warm.extxyz", warm, format="extxyz")
    server = ServerProcess(
        tmp_path, "--model", str(path), "--compile", "on",
        "--compile-warmup", f"{tmp_path / 'warm.extxyz'}:1",
        "--compile-cache-dir", str(tmp_path / "inductor"), "--torch-threads", "1",
    )  # fmt: skip
    try:
        server.wait_ready(timeout=600)
        messages = server.messages()
        # The compile happened during warm-up: before the server said it was ready.
        compiled_at = next(k for k, m in enumerate(messages) if "compiled the model call" in m)
        ready_at = next(k for k, m in enumerate(messages) if "warmed up" in m)
        assert compiled_at < ready_at, messages
        first = metrics(server.url)
        assert first["cace_model_compiles_total"] == 1, first
        assert first["cace_model_compile_fallbacks_total"] == 0, first
        (described,) = httpx.get(server.url + "/v1/models").json()["models"]
        assert described["description"]["compiled"] == "default", described

        # The warm-up's shape (a rattled copy) runs compiled, with the eager numbers.
        rattled = warm.copy()
        rattled.rattle(0.02, seed=1)
        reply = httpx.post(server.url + "/v1/calculate", json=payload(rattled), timeout=60)
        assert reply.status_code == 200, reply.text
        expected = model.predict([Structure.from_ase(rattled)])[0]
        body = reply.json()
        assert abs(body["energy"] - expected.energy) < 1e-9
        assert np.abs(np.array(body["forces"]) - expected.forces).max() < 1e-10
        after = metrics(server.url)
        assert (
            after["cace_model_compiled_calls_total"] == first["cace_model_compiled_calls_total"] + 1
        ), after
        assert after["cace_model_compiles_total"] == 1

        # A new shape is served eagerly (right numbers, no wait for the compiler) and
        # compiles on its own thread once it has recurred.
        bigger = water_box(3, seed=2)
        expected = model.predict([Structure.from_ase(bigger)])[0]
        for _ in range(COMPILE_AFTER):
            t0 = time.monotonic()
            reply = httpx.post(server.url + "/v1/calculate", json=payload(bigger), timeout=60)
            assert reply.status_code == 200, reply.text
            assert time.monotonic() - t0 < 10.0  # a compile takes longer than that here
            assert abs(reply.json()["energy"] - expected.energy) < 1e-9
        deadline = time.monotonic() + 300
        while metrics(server.url)["cace_model_compiles_total"] < 2:
            assert time.monotonic() < deadline, server.log()
            time.sleep(1)
        reply = httpx.post(server.url + "/v1/calculate", json=payload(bigger), timeout=60)
        assert abs(reply.json()["energy"] - expected.energy) < 1e-9
        final = metrics(server.url)
        assert final["cace_model_compiled_calls_total"] > after["cace_model_compiled_calls_total"]
        assert final["cace_model_eager_calls_total"] >= COMPILE_AFTER
        assert final["cace_model_compile_fallbacks_total"] == 0
    finally:
        server.stop()
