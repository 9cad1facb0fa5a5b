"""Capture of uncertain structures: settings, records, the size cap, the rate limit,
the reader on a torn file, records from i-PI connections, and a server killed while
it captures under HTTP load."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from cace_server.capture import (
    Capture,
    CaptureSettings,
    Origin,
    Record,
    encode_record,
    read_capture,
)
from cace_server.engine import Engine, EngineError, EngineSettings
from cace_server.ipi.driver import Source
from cace_server.ipi.engine_evaluator import ipi_evaluator
from cace_server.settings import load_settings
from cace_server.structures import Prediction, Structure
from tests.test_serve_http import ServerProcess, servers, start  # noqa: F401 - fixture

DATA = Path(__file__).parent / "data" / "committee"
MEMBERS = ",".join(str(DATA / f"seed{k}.safetensors") for k in range(1, 5))
CLI = [sys.executable, "-m", "cace_server.cli"]
WATER = np.array([[0.0, 0.0, 0.0], [0.96, 0.0, 0.0], [-0.24, 0.93, 0.0]])


def water(shift: float = 0.0) -> Structure:
    return Structure.create([8, 1, 1], WATER + shift * np.eye(3)[0])


def prediction(uncertainty: float, n: int = 3) -> Prediction:
    return Prediction(
        energy=-10.0,
        forces=np.zeros((n, 3)),
        energy_uncertainty=uncertainty,
        committee_energies=np.array([-10.0 - uncertainty, -10.0 + uncertainty]),
    )


# -- settings ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("given", "message"),
    [
        ({"capture": "d", "capture_threshold": -0.1}, "capture_threshold must be a finite"),
        ({"capture": "d", "capture_force_threshold": "nan"}, "capture_force_threshold must be"),
        ({"capture": "d", "capture_threshold": "inf"}, "capture_threshold must be a finite"),
        ({"capture": "d"}, "capture needs capture_threshold"),
        ({"capture_threshold": 0.1}, r"capture \(the directory to write to\) is not"),
        ({"capture": "d", "capture_threshold": 0.1, "capture_max_mb": 0}, "capture_max_mb"),
        ({"capture": "d", "capture_threshold": 0.1, "capture_rate": -1}, "capture_rate"),
    ],
)
def test_bad_capture_settings_name_the_setting(given: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        load_settings(environ={}, overrides=given)


def test_serve_refuses_a_negative_threshold_at_start(tmp_path: Path) -> None:
    run = subprocess.run(
        [*CLI, "serve", "--capture", str(tmp_path), "--capture-threshold=-1"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 2, run.stderr
    assert "capture_threshold must be a finite number of at least 0" in run.stderr


def test_capture_with_a_plain_model_is_a_start_up_error(tmp_path: Path) -> None:
    settings = CaptureSettings(str(tmp_path / "cap"), threshold=0.0)
    engine = Engine(
        str(DATA / "seed1.safetensors"),
        settings=EngineSettings(torch_threads=1, warmup=False),
        capture=settings,
    )
    with pytest.raises(EngineError, match="capture is on but model 'seed1' is not a committee"):
        engine.start()
    engine.close()


def test_an_unwritable_capture_directory_is_a_start_up_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    capture = Capture(CaptureSettings(str(blocker / "cap"), threshold=0.0))
    with pytest.raises(ValueError, match="capture: cannot write to"):
        capture.start()


# -- the writer: size cap, rate limit ------------------------------------------------------------
def test_the_size_cap_holds_and_drops_are_counted(tmp_path: Path) -> None:
    one = len(
        encode_record(
            1,
            Record(
                "m",
                water(),
                -10.0,
                np.zeros(2),
                0.1,
                None,
                None,
                Origin("python", "python"),
                0,
                0.0,
            ),
        )
    )
    settings = CaptureSettings(
        str(tmp_path), threshold=0.0, max_mb=3.5 * one / 1e6, rate=1e6, queue_size=100
    )
    capture = Capture(settings)
    capture.start()
    for k in range(10):
        assert capture.consider("m", water(0.01 * k), prediction(0.1), None)
    capture.close()
    assert capture.path is not None
    records = read_capture(capture.path).records
    size = capture.path.stat().st_size
    n = len(records)
    assert 1 <= n <= 3 and [a.info["seq"] for a in records] == list(range(1, n + 1))
    assert settings.max_mb * 1e6 - size < size / n  # stopped when the next did not fit
    counts = capture.snapshot().captured
    assert counts == {("m", "written"): n, ("m", "dropped_size"): 10 - n}

    # a second run counts the files already there against the cap: nothing fits
    again = Capture(settings)
    again.start()
    again.consider("m", water(), prediction(0.1), None)
    again.close()
    assert again.snapshot().captured == {("m", "dropped_size"): 1}


def test_the_rate_limit_is_a_token_bucket_per_source(tmp_path: Path) -> None:
    now = [0.0]
    capture = Capture(
        CaptureSettings(str(tmp_path), threshold=0.01, rate=2.0), clock=lambda: now[0]
    )
    capture.start()
    a, b = Origin("http", "session:a"), Origin("http", "session:b")
    queued = [capture.consider("m", water(), prediction(0.1), a) for _ in range(5)]
    assert queued == [True, True, False, False, False]  # a burst of one second's worth
    assert capture.consider("m", water(), prediction(0.1), b)  # another source has its own
    now[0] = 0.5
    assert [capture.consider("m", water(), prediction(0.1), a) for _ in range(2)] == [
        True,
        False,
    ]
    # below the threshold: observed, not captured, no token spent
    assert not capture.consider("m", water(), prediction(0.001), a)
    capture.close()
    snap = capture.snapshot()
    assert snap.captured == {("m", "written"): 4, ("m", "dropped_rate"): 4}
    buckets, total = snap.uncertainty["m"]
    assert buckets[-1] == (float("inf"), 9)
    assert total == pytest.approx(8 * 0.1 / 3 + 0.001 / 3)


def test_the_force_threshold_reads_the_largest_force_uncertainty(tmp_path: Path) -> None:
    capture = Capture(CaptureSettings(str(tmp_path), force_threshold=0.5, rate=1e6))
    assert "forces_uncertainty" in capture.outputs
    capture.start()
    low, high = prediction(1.0), prediction(1.0)
    low.forces_uncertainty = np.array([0.1, 0.5, 0.2])
    high.forces_uncertainty = np.array([0.1, 0.6, 0.2])
    assert not capture.consider("m", water(), low, None)  # energy is not a criterion here
    assert capture.consider("m", water(), high, None)
    capture.close()
    assert capture.path is not None
    (record,) = read_capture(capture.path).records
    assert record.info["forces_uncertainty_max"] == 0.6
    np.testing.assert_array_equal(record.arrays["forces_uncertainty"], [0.1, 0.6, 0.2])


# -- the reader ----------------------------------------------------------------------------------
def test_the_reader_skips_a_torn_last_record_at_any_cut(tmp_path: Path) -> None:
    origin = Origin("ipi", "ipi[unix:x]", address="unix:x", step=4)
    records = [
        encode_record(
            k,
            Record(
                "water",
                water(0.1 * k),
                -10.0 - k,
                np.array([-10.0, -11.0]),
                0.5,
                np.ones((3, 3)),
                None,
                origin,
                k,
                1.7e9,
            ),
        )
        for k in (1, 2, 3)
    ]
    whole = b"".join(records)
    path = tmp_path / "capture.xyz"
    start_of_last = len(records[0]) + len(records[1])
    for cut in range(start_of_last, len(whole) + 1):
        path.write_bytes(whole[:cut])
        contents = read_capture(path)
        complete = 3 if cut == len(whole) else 2
        assert [a.info["seq"] for a in contents.records] == list(range(1, complete + 1)), cut
        assert contents.torn_bytes == (0 if complete == 3 else cut - start_of_last)
    first = read_capture(path).records[0]
    assert first.info["mean_energy"] == -11.0
    assert first.info["origin"] == "ipi" and first.info["origin_step"] == 4
    np.testing.assert_array_equal(first.info["member_energies"], [-10.0, -11.0])
    np.testing.assert_allclose(first.positions, water(0.1).positions)
    assert first.calc is None  # predictions are never read as labels


# -- records from a real committee through the engine --------------------------------------------
def test_ipi_connections_leave_their_origin_and_callers_get_what_they_asked(
    tmp_path: Path,
) -> None:
    settings = CaptureSettings(str(tmp_path), threshold=0.0, rate=1e6)

    async def run() -> tuple[list[Prediction], list[Prediction]]:
        async with Engine(
            {"water": MEMBERS},
            settings=EngineSettings(torch_threads=1, warmup=False),
            capture=settings,
        ) as engine:
            evaluate = ipi_evaluator(engine, None)
            source = Source("ipi[unix:/tmp/ipi_c]#1", "unix:/tmp/ipi_c", 1)
            steps = [await evaluate([water(0.01 * k)], source=source) for k in range(3)]
            plain = await engine.evaluate([water()], outputs=["energy"])
            assert engine.capture is not None
            return [s[0] for s in steps], plain

    steps, plain = asyncio.run(run())
    # the outputs capture adds are computed, and not handed to callers that did not ask
    assert plain[0].energy_uncertainty is None and plain[0].forces is None
    # i-PI asks a committee for its members' values (its <ffcommittee> extras), not
    # for the per-atom force spread the capture could add
    assert steps[0].committee_energies is not None and steps[0].forces is not None
    assert steps[0].forces_uncertainty is None
    (path,) = tmp_path.glob("capture-*.xyz")
    records = read_capture(path).records
    assert [a.info["seq"] for a in records] == [1, 2, 3, 4]
    ipi = records[:3]
    assert [a.info["origin_step"] for a in ipi] == [1, 2, 3]
    for atoms, step in zip(ipi, steps, strict=True):
        assert atoms.info["origin"] == "ipi"
        assert atoms.info["origin_address"] == "unix:/tmp/ipi_c"
        assert atoms.info["origin_source"] == "ipi[unix:/tmp/ipi_c]#1"
        assert atoms.info["mean_energy"] == step.energy
        assert len(atoms.info["member_energies"]) == 4
        assert np.mean(atoms.info["member_energies"]) == pytest.approx(step.energy, abs=1e-9)
        np.testing.assert_array_equal(atoms.arrays["mean_forces"], step.forces)
    assert records[3].info["origin"] == "python"
    assert "mean_forces" not in records[3].arrays  # an energy-only request computed none


# -- a server killed while it captures -----------------------------------------------------------
def test_a_server_killed_while_capturing_leaves_every_record_before_it(
    servers,  # noqa: F811 - the fixture
    tmp_path: Path,
) -> None:
    directory = tmp_path / "capture"
    server = start(
        servers,
        tmp_path,
        "--model",
        f"water={MEMBERS}",
        "--capture",
        str(directory),
        "--capture-threshold",
        "0",
        "--capture-rate",
        "1000000",
        "--torch-threads",
        "1",
    )
    rng = np.random.default_rng(0)
    stop = threading.Event()
    failures: list[str] = []

    def load(session: str) -> None:
        with httpx.Client(base_url=server.url, timeout=30) as client:
            while not stop.is_set():
                body = {
                    "structures": [
                        {
                            "numbers": [8, 1, 1],
                            "positions": (WATER + rng.normal(0, 0.02, (3, 3))).tolist(),
                        }
                        for _ in range(4)
                    ],
                    "properties": ["energy", "forces"],
                }
                try:
                    reply = client.post(
                        "/v1/calculate/batch", json=body, headers={"X-CACE-Session": session}
                    )
                except httpx.TransportError:
                    return  # the server was killed
                if reply.status_code != 200:
                    failures.append(reply.text)
                    return
                # capture adds outputs to the batch; the caller gets what it asked
                if set(reply.json()["results"][0]) != {
                    "n_atoms",
                    "energy",
                    "free_energy",
                    "forces",
                }:
                    failures.append(reply.text)

    threads = [threading.Thread(target=load, args=(f"s{k}",)) for k in range(3)]
    for thread in threads:
        thread.start()
    try:
        deadline = time.monotonic() + 60
        written = 0.0
        while written < 60 and time.monotonic() < deadline:
            time.sleep(0.2)
            metrics = httpx.get(server.url + "/metrics", timeout=10).text
            written = sum(
                float(line.rsplit(" ", 1)[1])
                for line in metrics.splitlines()
                if line.startswith('cace_captured_total{model="water",outcome="written"}')
            )
        assert written >= 60, server.log()
        assert 'cace_uncertainty_bucket{le="+Inf",model="water"}' in metrics
        server.proc.kill()  # SIGKILL, mid-load
        server.proc.wait(10)
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)
    assert not failures, failures[:1]
    (path,) = directory.glob("capture-*.xyz")
    contents = read_capture(path)
    seqs = [int(a.info["seq"]) for a in contents.records]
    # none lost, none twice: every record counted as written before the scrape is there
    assert seqs == list(range(1, len(seqs) + 1))
    assert len(seqs) >= written
    first = contents.records[0]
    assert first.info["origin"] == "http"
    assert first.info["origin_source"].startswith("session:s")
    assert len(first.info["origin_request"]) == 16
    assert first.arrays["mean_forces"].shape == (3, 3)
    # at most the last record is torn: what follows the complete ones is shorter than one
    assert contents.torn_bytes < len(path.read_bytes()) / len(seqs) * 2
