"""A dead device (CUDA context) makes the server unhealthy and exit non-zero.

The fault is injected with the documented debug setting CACE_SERVER_DEBUG_DEVICE_FAULT,
which makes model calls raise the exception torch raises for a device-side assert
(``torch.AcceleratorError``); the classification of real CUDA messages is unit-tested.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from cace_server.engine import (
    DeviceFailed,
    Engine,
    EngineSettings,
    is_fatal_device_error,
    is_out_of_memory,
)
from cace_server.engine.faults import ENV_VAR, parse_fault
from cace_server.http import BackgroundServer, create_app
from cace_server.model import random_model, save_model
from cace_server.structures import Structure

CLI = [sys.executable, "-m", "cace_server.cli"]


def box(seed: int, n: int = 12) -> Structure:
    rng = np.random.default_rng(seed)
    grid = np.array([(i, j, k) for i in range(3) for j in range(3) for k in range(3)])[:n]
    positions = grid * 1.6 + rng.uniform(-0.2, 0.2, (n, 3))
    return Structure.create(rng.choice([1, 8], n), positions, np.eye(3) * 4.8, True)


# -- classification -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "exc",
    [
        torch.AcceleratorError("CUDA error: device-side assert triggered"),
        RuntimeError("CUDA error: an illegal memory access was encountered"),
        RuntimeError(
            "CUDA error: CUBLAS_STATUS_EXECUTION_FAILED when calling `cublasSgemm( handle, ...)`"
        ),
        RuntimeError("CUDA error: unspecified launch failure"),
    ],
    ids=["accelerator-error", "illegal-access", "cublas-execution", "launch-failure"],
)
def test_fatal_device_errors_are_recognised(exc: BaseException) -> None:
    assert is_fatal_device_error(exc)
    assert not is_out_of_memory(exc)


@pytest.mark.parametrize(
    "exc",
    [
        torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
        RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"),
        RuntimeError("mat1 and mat2 shapes cannot be multiplied"),
        ValueError("device-side assert"),  # not an error torch raises for a device
    ],
    ids=["oom", "cublas-alloc", "shape", "value-error"],
)
def test_other_errors_are_not_fatal(exc: BaseException) -> None:
    assert not is_fatal_device_error(exc)


def test_cublas_alloc_failure_is_out_of_memory() -> None:
    assert is_out_of_memory(RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling"))


def test_fault_setting_is_parsed() -> None:
    assert parse_fault("3") == (3, 0.0)
    assert parse_fault("0:1.5") == (0, 1.5)
    with pytest.raises(ValueError, match=ENV_VAR):
        parse_fault("soon")


# -- the engine -----------------------------------------------------------------------------------


def test_engine_fails_pending_work_and_turns_unhealthy(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_VAR, "1:0.5")  # one good call, then a dead device (after 0.5 s)
    model = random_model((1, 8), seed=3)
    reasons: list[str] = []
    engine = Engine(model, settings=EngineSettings(dtype="float64", batch_wait_ms=0)).start()
    try:
        engine.on_fatal(reasons.append)
        assert engine.evaluate_sync([box(0)])[0].forces is not None
        running = engine.submit([box(1)])
        time.sleep(0.2)  # the worker is inside the failing call now
        waiting = engine.submit([box(2), box(3)])
        for future in running + waiting:
            with pytest.raises(DeviceFailed, match="device-side assert"):
                future.result(30)
        assert not engine.healthy and not engine.ready
        assert reasons and "device-side assert" in reasons[0]
        with pytest.raises(DeviceFailed, match="restarting"):
            engine.submit([box(4)])
        snap = engine.snapshot()
        # no halving and retrying on a dead device: one good call, one fatal one
        assert snap.model_calls == 2 and snap.oom_splits == 0
        assert snap.errors.get("device_failed", 0) >= 3
        assert "AcceleratorError" in snap.device_failures["cpu"]  # EngineSettings runs on cpu
    finally:
        engine.close(timeout=30)


def test_health_routes_and_metric_after_device_failure(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_VAR, "0")
    engine = Engine(random_model((1, 8), seed=3), settings=EngineSettings(dtype="float64"))
    with (
        engine,
        BackgroundServer(create_app(engine)) as server,
        httpx.Client(base_url=server.url, timeout=30) as client,
    ):
        assert client.get("/readyz").status_code == 200
        assert client.get("/healthz").status_code == 200
        s = box(0)
        reply = client.post(
            "/v1/calculate",
            json={"numbers": s.numbers.tolist(), "positions": s.positions.tolist(),
                  "cell": s.cell.tolist(), "pbc": [True] * 3},
        )  # fmt: skip
        assert reply.status_code == 503, reply.text
        assert reply.json()["error"] == "device_failed"
        for route in ("/readyz", "/healthz"):
            failed = client.get(route)
            assert failed.status_code == 503
            assert "device-side assert" in failed.json()["message"]
        metrics = {f.name: f for f in text_string_to_metric_families(client.get("/metrics").text)}
        assert metrics["cace_engine_healthy"].samples[0].value == 0
        (sample,) = metrics["cace_engine_device_failed"].samples
        assert sample.value == 1 and "AcceleratorError" in sample.labels["reason"]


# -- the server process ---------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_serve_exits_non_zero_when_the_device_dies(tmp_path: Path) -> None:
    model_file = save_model(random_model((1, 8), seed=5), tmp_path / "m.safetensors")
    port = free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1", **{ENV_VAR: "2:1.0"})
    log = open(tmp_path / "server.log", "wb")  # noqa: SIM115 - closed below
    server = subprocess.Popen(
        [*CLI, "serve", "--model", str(model_file), "--port", str(port), "--batch-wait-ms", "0"],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(base_url=url, timeout=30) as client:
            deadline = time.monotonic() + 120
            while True:
                try:
                    if client.get("/readyz").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert server.poll() is None, (tmp_path / "server.log").read_text()
                assert time.monotonic() < deadline, "server not ready"
                time.sleep(0.1)

            def calculate(seed: int) -> httpx.Response:
                s = box(seed)
                body: dict[str, Any] = {
                    "numbers": s.numbers.tolist(),
                    "positions": s.positions.tolist(),
                    "cell": s.cell.tolist(),
                    "pbc": [True] * 3,
                }
                return client.post("/v1/calculate", json=body)

            assert calculate(0).status_code == 200
            assert calculate(1).status_code == 200
            # The next call fails after 1 s; the requests sent meanwhile are pending.
            with ThreadPoolExecutor(4) as pool:
                first = pool.submit(calculate, 2)
                time.sleep(0.3)
                replies = [first, *(pool.submit(calculate, k) for k in range(3, 6))]
                results = [r.result(60) for r in replies]
        for reply in results:  # the failing one and the three that waited behind it
            assert reply.status_code == 503, reply.text
            assert reply.json()["error"] == "device_failed"
            assert "restarting" in reply.json()["message"]
        assert server.wait(timeout=60) == 3
    finally:
        if server.poll() is None:
            server.kill()
            server.wait(10)
        log.close()
    text = (tmp_path / "server.log").read_text()
    assert "the device failed" in text and "device-side assert" in text, text[-3000:]


def test_threads_end_after_a_device_failure(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_VAR, "0")
    engine = Engine(random_model((1, 8), seed=3), settings=EngineSettings(dtype="float64"))
    engine.start()
    with pytest.raises(DeviceFailed):
        engine.evaluate_sync([box(0)])
    engine.close(timeout=30)
    names = [t.name for t in threading.enumerate() if t.name.startswith("cace-engine")]
    assert not names
