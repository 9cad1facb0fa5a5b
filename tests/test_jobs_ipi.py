"""An i-PI run is not slowed by a big relaxation job beyond its lane share.

The real i-PI runs 2-bead PIMD of liquid water through ``cace-server serve --ipi``,
started once a relax job of many water clusters runs on the same server. What must hold
is the structural property of the engine's lanes, not a wall-clock ratio: every
i-PI step completes, and each i-PI step batch waited behind at most one batch of
another lane (the one on the device when its beads arrived; one worker), read from
the engine's counters in ``/metrics``; and the job did compete (i-PI batches waited
behind job batches, and job batches ran between i-PI steps).
"""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path

import ase.io
import httpx
import pytest

from tests.ipi_support import IPI_SCRIPT, IpiRun, serve_with_ipi

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from scripts.water_clusters import water_clusters  # noqa: E402

pytestmark = [
    pytest.mark.ipi,
    pytest.mark.slow,
    pytest.mark.skipif(not IPI_SCRIPT.exists(), reason="the i-pi program is not installed"),
]

INIT = ROOT / "clients" / "ipi" / "init.extxyz"
MODEL = ROOT / "cace_server" / "data" / "water.safetensors"
BEADS = 2
STEPS = 12
OUTPUTS = '<properties stride="1" filename="out" flush="1"> [ step ] </properties>'


def metrics(client: httpx.Client) -> dict[str, float]:
    out: dict[str, float] = {}
    for line in client.get("/metrics").text.splitlines():
        match = re.match(r"^([a-zA-Z_:][\w:]*(?:\{[^}]*\})?) (\S+)$", line)
        if match:
            out[match.group(1)] = float(match.group(2))
    return out


def labelled(m: dict[str, float], name: str) -> dict[str, int]:
    """The values of a labelled counter, by its one label's value."""
    return {key.split('"')[1]: int(value) for key, value in m.items() if key.startswith(name + "{")}


def test_ipi_steps_wait_behind_at_most_one_job_batch(tmp_path: Path, socket_dir: str) -> None:
    run = IpiRun(
        tmp_path / "ipi",
        socket_dir,
        ase.io.read(INIT),
        nbeads=BEADS,
        steps=STEPS,
        outputs=OUTPUTS,
    )
    clusters = water_clusters(128)
    body = {
        "kind": "relax",
        # tight enough that the job outlasts the i-PI run; cancelled at the end
        "relax": {"fmax": 1e-4, "steps": 100_000},
        "structures": [
            {"numbers": a.numbers.tolist(), "positions": a.positions.tolist()} for a in clusters
        ],
    }
    try:
        with (
            serve_with_ipi(
                tmp_path / "server.log",
                run,
                BEADS,
                INIT,
                "--model",
                f"water={MODEL}",
                "--dtype",
                "float64",
                # job iterations of about two i-PI steps' atoms: big enough to be felt
                "--job-batch-atoms",
                "768",
            ) as (url, server),
            httpx.Client(base_url=url, timeout=60) as client,
        ):
            deadline = time.monotonic() + 120
            while True:  # it waits for i-PI, which starts once the job runs
                assert server.poll() is None, (tmp_path / "server.log").read_text()
                try:
                    if client.get("/readyz").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert time.monotonic() < deadline, "the server did not become ready"
                time.sleep(0.1)
            response = client.post("/v1/jobs", json=body)
            assert response.status_code == 202, response.text
            job_id = response.json()["id"]
            while client.get(f"/v1/jobs/{job_id}").json()["model_calls"] < 2:
                assert time.monotonic() < deadline, "the job did not start"
                time.sleep(0.05)
            run.start()  # the server connects to it (retrying until it listens)
            assert run.wait(300) == 0, run.log()
            job = client.get(f"/v1/jobs/{job_id}").json()
            m = metrics(client)
            client.delete(f"/v1/jobs/{job_id}")
    finally:
        run.stop()

    # every i-PI step completed (a property line for step 0 and each step after)
    lines = [ln for ln in (run.workdir / "sim.out").read_text().splitlines() if ln[:1] != "#"]
    assert len(lines) == STEPS + 1, run.log()
    assert job["state"] == "running", f"the job ended before i-PI did: {job}"
    assert job["model_calls"] > 0

    by_lane = labelled(m, "cace_engine_lane_batches_total")
    behind = labelled(m, "cace_engine_ipi_waited_behind_total")
    behind_lane = labelled(m, "cace_engine_ipi_waited_behind_lane_total")
    ipi_batches = by_lane.get("ipi", 0)
    # one batch per step with both beads (the step closes once both connections sent)
    assert ipi_batches >= STEPS, by_lane
    assert sum(behind.values()) == ipi_batches, (behind, by_lane)
    # the lane rule: never behind more than the batch on the device (one worker)
    assert set(behind) <= {"0", "1"}, f"i-PI batches by batches waited behind: {behind}"
    # ... and the job did compete: some steps found a job batch on the device
    assert by_lane.get("jobs", 0) > 0, by_lane
    assert behind_lane.get("jobs", 0) > 0, (behind_lane, by_lane)
    assert set(behind_lane) <= {"jobs"}, behind_lane
