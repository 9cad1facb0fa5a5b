"""A compiled model serving a real i-PI PIMD run: everything compiles during warm-up.

200 steps of 8-bead NVT PIMD of liquid water at 300 K, driven through the engine
``cace-server serve`` uses, with ``compile=on`` and the run's structure as the
compile warm-up. The neighbour counts change from step to step; the compiler's own
counters (dynamo's captured graphs, AOTAutograd's compiles) and ours must not move
after warm-up, and the steps must run compiled.
"""

from __future__ import annotations

import asyncio
import copy
from pathlib import Path

import ase
import ase.io
import pytest
import torch._dynamo.utils

from cace_server.engine import Engine, EngineSettings
from cace_server.ipi import DriverPool
from cace_server.ipi.engine_evaluator import ipi_evaluator
from cace_server.model import load_model
from cace_server.model.compiled import process_stats
from cace_server.server import default_model_path
from cace_server.structures import Structure
from tests.ipi_support import IPI_SCRIPT, options, serve_until_closed, start_ipi

pytestmark = [pytest.mark.ipi, pytest.mark.slow]
if not IPI_SCRIPT.exists():  # pragma: no cover
    pytest.skip("the i-pi program is not installed", allow_module_level=True)

STEPS = 200
BEADS = 8


def compiler_counters() -> dict[str, dict[str, int]]:
    counters = torch._dynamo.utils.counters
    return copy.deepcopy({k: dict(counters[k]) for k in ("stats", "aot_autograd", "inductor")})


def test_no_compilation_after_warmup_over_a_200_step_pimd_run(
    tmp_path: Path, socket_dir: str, ipi_runs: list, liquid_water: ase.Atoms
) -> None:
    init = tmp_path / "init.extxyz"
    ase.io.write(init, liquid_water, format="extxyz")
    settings = EngineSettings(
        dtype="float32",
        batch_wait_ms=0.0,
        compile=("on",),
        compile_warmup=(f"{init}:{BEADS}",),
        compile_cache_dir=str(tmp_path / "inductor"),
    )
    # The counters are process-wide: other tests in this process may have compiled.
    start = process_stats()
    with Engine(str(default_model_path()), settings=settings) as engine:
        engine.wait_ready(timeout=600)
        warmed = process_stats()
        assert warmed.compiles > start.compiles and warmed.fallbacks == start.fallbacks, warmed
        before = compiler_counters()
        run = start_ipi(
            ipi_runs, tmp_path / "ipi", socket_dir, liquid_water, nbeads=BEADS, steps=STEPS,
            timestep_fs=0.5,
        )  # fmt: skip
        pool = DriverPool(ipi_evaluator(engine, None), options(liquid_water, model_name="water"))
        pool.add(f"unix:{run.socket_path}", clients=BEADS)
        asyncio.run(serve_until_closed(pool, timeout=900))
        after = compiler_counters()
        served = process_stats()
        stats = engine.snapshot()
    assert run.wait() == 0, run.log()

    # Nothing compiled after warm-up: not by us, not by dynamo, AOTAutograd or Inductor.
    assert served.compiles == warmed.compiles, served.shapes
    assert after == before
    assert served.fallbacks == start.fallbacks
    # The steps ran compiled: each model call is the engine's groups of beads; only
    # the first forces (before every connection is in) may take an odd shape.
    calls = served.calls - warmed.calls
    eager = served.eager_calls - warmed.eager_calls
    assert calls >= STEPS * stats.model_calls // (STEPS + 1) - BEADS, (calls, eager, stats)
    assert eager <= BEADS, (calls, eager)

    # The neighbour counts did change: the most neighbours of one atom took several
    # values over the beads and steps (so reusing one shape was not a given).
    model = load_model(default_model_path())
    numbers = liquid_water.numbers
    most = set()
    for bead in range(BEADS):
        for frame in run.frames("pos", bead)[:: STEPS // 20]:
            frame.numbers = numbers
            frame.cell, frame.pbc = liquid_water.cell, True
            most.add(model.prepare(Structure.from_ase(frame)).max_neighbors)
    assert len(most) > 1, most
