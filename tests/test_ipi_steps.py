"""The engine and the real i-PI: one model call per PIMD step, Verlet lists per connection.

An in-process engine drives i-PI through a :class:`DriverPool` (the same evaluator
``cace-server serve`` uses), so its counters can be read after the run.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from pathlib import Path

import ase
import numpy as np
import pytest

from cace_server.engine import Engine, EngineSettings
from cace_server.ipi import DriverPool, Source
from cace_server.ipi.engine_evaluator import ipi_evaluator
from cace_server.model import load_model
from cace_server.server import default_model_path
from cace_server.structures import Prediction, Structure
from tests.ipi_support import (
    IPI_SCRIPT,
    options,
    serve_until_closed,
    start_ipi,
)

pytestmark = pytest.mark.ipi
if not IPI_SCRIPT.exists():  # pragma: no cover
    pytest.skip("the i-pi program is not installed", allow_module_level=True)


@pytest.mark.parametrize(
    "beads", [8, pytest.param(32, marks=pytest.mark.slow)], ids=["8-beads", "32-beads"]
)
def test_a_pimd_step_over_one_connection_per_bead_is_one_model_call(
    tmp_path: Path, socket_dir: str, ipi_runs: list, liquid_water: ase.Atoms, beads: int
) -> None:
    run = start_ipi(
        ipi_runs, tmp_path / "ipi", socket_dir, liquid_water, nbeads=beads, steps=3,
        outputs='<properties stride="1" filename="out"> [ step ] </properties>',
    )  # fmt: skip
    # batch_wait_ms=0: nothing but the step group holds a batch open.
    settings = EngineSettings(dtype="float32", batch_wait_ms=0.0, warmup=False)
    with Engine(str(default_model_path()), settings=settings) as engine:
        pool = DriverPool(ipi_evaluator(engine, None), options(liquid_water, model_name="water"))
        pool.add(f"unix:{run.socket_path}", clients=beads)
        asyncio.run(serve_until_closed(pool, timeout=600))
        stats = engine.snapshot()
    assert run.wait() == 0, run.log()
    served = sum(s.structures for s in pool.statuses())
    rounds = served // beads
    assert served == rounds * beads and rounds >= 4, served  # initial forces + 3 steps
    # i-PI accepts at most 5 waiting connections per poll (its <slots>), so the very
    # first forces may reach it over a few batches before every connection is in.
    # From then on every step is one model call holding every bead, closed because
    # all had arrived, not by the time limit.
    sizes = dict(stats.batch_structures.buckets)
    full = sizes[float(beads)] - sizes[float(beads // 2)]
    assert full >= rounds - 1, stats.batch_structures
    assert stats.model_calls == stats.batches and stats.batches - full <= beads
    assert stats.step_batches >= rounds - 1


def replayed_builds(trajectory: list[np.ndarray], skin: float) -> int:
    """How often a list with this skin must be built along one connection's structures."""
    builds, reference = 0, None
    for positions in trajectory:
        if reference is None or np.linalg.norm(positions - reference, axis=1).max() > skin / 2:
            builds, reference = builds + 1, positions
    return builds


class Recorder:
    """The engine's i-PI evaluator, keeping what each connection sent and got."""

    def __init__(self, engine: Engine) -> None:
        self.evaluate = ipi_evaluator(engine, None)
        self.seen: dict[str, list[tuple[Structure, Prediction]]] = defaultdict(list)

    async def __call__(self, structures: list[Structure], *, source: Source) -> list[Prediction]:
        predictions = await self.evaluate(structures, source=source)
        self.seen[source.connection].extend(zip(structures, predictions, strict=True))
        return predictions


@pytest.mark.parametrize(
    "steps", [6, pytest.param(20, marks=pytest.mark.slow)], ids=["6-steps", "20-steps"]
)
def test_verlet_lists_per_connection_in_a_pimd_run(
    tmp_path: Path, socket_dir: str, ipi_runs: list, liquid_water: ase.Atoms, steps: int
) -> None:
    beads, skin = 3, 0.1  # a small skin, so that some lists must be rebuilt
    run = start_ipi(
        ipi_runs, tmp_path / "ipi", socket_dir, liquid_water, nbeads=beads, steps=steps,
        outputs='<properties stride="1" filename="out"> [ step ] </properties>',
    )  # fmt: skip
    settings = EngineSettings(dtype="float64", neighbor_skin=skin, warmup=False)
    with Engine(str(default_model_path()), settings=settings) as engine:
        recorder = Recorder(engine)
        pool = DriverPool(recorder, options(liquid_water, model_name="water"))
        pool.add(f"unix:{run.socket_path}", clients=beads)
        asyncio.run(serve_until_closed(pool, timeout=600))
        stats = engine.snapshot()
    assert run.wait() == 0, run.log()
    assert len(recorder.seen) == beads
    model = load_model(default_model_path(), dtype="float64")
    expected_builds = evaluations = 0
    worst = 0.0
    for seen in recorder.seen.values():
        structures = [s for s, _ in seen]
        evaluations += len(structures)
        expected_builds += replayed_builds([s.positions for s in structures], skin)
        # what i-PI got (through reused lists) against the model on fresh lists
        for (_, got), fresh in zip(seen, model.predict(structures), strict=True):
            assert got.forces is not None and fresh.forces is not None
            worst = max(worst, float(np.abs(got.forces - fresh.forces).max()))
    assert worst <= 1e-10, worst
    assert evaluations >= beads * (steps + 1)
    # Each connection's list was rebuilt exactly when its structure had moved half
    # the skin since the last build, and reused otherwise.
    assert stats.neighbor_lists_built == expected_builds, (
        stats.neighbor_lists_built,
        expected_builds,
    )
    assert stats.neighbor_lists_reused == evaluations - expected_builds
    assert stats.neighbor_lists_reused > 0
