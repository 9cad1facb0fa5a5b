"""Outputs computed on request: Born effective charges only for batches that ask.

The model is a real CACE model with a dipole head added here (point charges), whose
``predict`` records whether it was asked for BEC: the engine must ask once per batch
when any structure of it wants BEC, never when none does, and hand BEC only to the
structures that asked.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest

from cace_server.engine import Engine, EngineSettings, UnsupportedOutput
from cace_server.engine.models import ModelWrapper
from cace_server.model import random_model
from cace_server.outputs import Outputs
from cace_server.structures import Prediction
from tests.test_engine import make_structure

CHARGE = {1: 0.4, 8: -0.8}
DEFAULT = ("energy", "forces", "stress")


class WithDipole(ModelWrapper):
    """A real model plus mu = sum q_i r_i (so BEC[i] = q_i I)."""

    def __init__(self, inner: Any) -> None:
        super().__init__(inner)
        self.bec_calls: list[tuple[int, bool]] = []  # (structures, bec) per predict

    @property
    def outputs(self) -> tuple[str, ...]:
        return ("energy", "forces", "stress", "energies", "dipole", "bec")

    def predict(self, structures: Sequence[Any], outputs: Outputs) -> list[Prediction]:
        self.refuse_undeclared(outputs)
        bec = "bec" in outputs
        self.bec_calls.append((len(structures), bec))
        out = self.inner.predict(structures, Outputs(outputs.not_in(("dipole", "bec"))))
        for p, pred in zip(structures, out, strict=True):
            q = np.array([CHARGE[int(z)] for z in p.structure.numbers])
            if "dipole" in outputs:
                pred.dipole = q @ p.structure.positions
            if bec:
                pred.bec = q[:, None, None] * np.eye(3)
        return out


@pytest.fixture(scope="module")
def inner() -> Any:
    return random_model((1, 8), seed=3)


def test_bec_only_for_batches_and_structures_that_ask(inner: Any) -> None:
    model = WithDipole(inner)
    structures = [make_structure(n, seed=n) for n in (4, 5, 6)]
    settings = EngineSettings(batch_wait_ms=200.0, warmup=False)
    with Engine(model, settings=settings) as engine:
        got = engine.evaluate_sync(structures)
        assert model.bec_calls == [(3, False)]
        assert all(p.bec is None and p.dipole is not None for p in got)
        model.bec_calls.clear()
        # two requests in one batch, only the second asks for BEC
        plain = engine.submit(structures[:2])
        wanted = engine.submit(structures[2:], outputs=[*DEFAULT, "bec"])
        results = [f.result(30) for f in plain + wanted]
        assert model.bec_calls == [(3, True)]
        assert results[0].bec is None and results[1].bec is None
        bec = results[2].bec
        assert bec is not None and bec.shape == (6, 3, 3)
        np.testing.assert_array_equal(bec[:, 0, 0], [CHARGE[int(z)] for z in structures[2].numbers])
        assert engine.model_info().outputs == (
            "energy",
            "forces",
            "stress",
            "energies",
            "dipole",
            "bec",
        )


def test_bec_from_a_model_without_them_is_refused(inner: Any) -> None:
    with Engine(inner, settings=EngineSettings(warmup=False)) as engine:
        with pytest.raises(UnsupportedOutput, match="Born effective charges"):
            engine.submit([make_structure(4, seed=1)], outputs=[*DEFAULT, "bec"])
        assert engine.snapshot().errors == {"unsupported_output": 1}


def test_warm_up_of_a_dipole_model_asks_for_bec(inner: Any) -> None:
    model = WithDipole(inner)
    with Engine(model, settings=EngineSettings()):
        pass
    # every warm-up call (open cluster, periodic box, four boxes) asks for them
    assert model.bec_calls == [(1, True), (1, True), (4, True)]


def test_ipi_evaluator_sends_bec_when_the_model_has_them(inner: Any) -> None:
    """i-PI cannot ask: its connections get BEC whenever the model has them, unless off."""
    import asyncio

    from cace_server.ipi import Source
    from cace_server.ipi.engine_evaluator import ipi_evaluator

    structures = [make_structure(5, seed=9)]
    source = Source("ipi[unix:/tmp/ipi_x]#0", "unix:/tmp/ipi_x", 1)
    for model, bec, want in [
        (WithDipole(inner), True, True),
        (WithDipole(inner), False, False),
        (inner, True, False),  # no BEC to send: no error either
    ]:
        with Engine(model, settings=EngineSettings(warmup=False)) as engine:
            (got,) = asyncio.run(ipi_evaluator(engine, None, bec)(structures, source=source))
            assert (got.bec is not None) == want
