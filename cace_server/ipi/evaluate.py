"""The evaluator that i-PI connections call: the engine, with the outputs i-PI reads.

i-PI asks for nothing beyond energy, forces and virial; what else goes into the
extras is decided here, per model: Born effective charges (i-PI's ``<bec
mode="driver">`` reads them) cost extra backward passes, so they are computed only
when the model has them and the connection wants them.

Each connection is an engine session (it keeps the Verlet neighbour lists of the
beads it drives), and the connections of one address form a step group: a step's
beads make one batch, closed as soon as every connection has submitted.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from cace_server.ipi.driver import Evaluator, Source
from cace_server.structures import Prediction, Structure

if TYPE_CHECKING:
    from cace_server.engine import Engine


def ipi_evaluator(engine: Engine, model: str | None, bec: bool = True) -> Evaluator:
    """Evaluate i-PI's structures with ``model`` (None: the default), with BEC if ``bec``
    and the model computes them."""
    with_bec = bec and "bec" in engine.model_info(model).outputs

    async def evaluate(structures: list[Structure], *, source: Source) -> list[Prediction]:
        group = engine.step_group(f"ipi:{source.address}", source.peers)
        # the i-PI lane: a PIMD step never waits behind queued HTTP work
        return await engine.evaluate(
            structures,
            model,
            bec=with_bec,
            lane="ipi",
            session=f"ipi:{source.connection}",
            step_group=group,
        )

    return evaluate
