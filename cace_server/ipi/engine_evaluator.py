"""The evaluator that i-PI connections call: the engine, with the outputs i-PI reads.

i-PI asks for nothing beyond energy, forces and virial; what else goes into the
extras is decided here, per model (:func:`ipi_outputs`): the latent charges and the
dipole (i-PI's driven dynamics reads it) come with the energy pass whenever the
model has them; Born effective charges (i-PI's ``<bec mode="driver">`` reads them)
cost extra backward passes, so they are computed only when the model has them and
the connection wants them. A committee's members' energies, forces and virials (and
its uncertainty) go with every structure: i-PI's ``<ffcommittee>`` reads them from
the extras of one client. ``convert.extras_json`` writes them in i-PI's layout.

Each connection is an engine trajectory (it keeps the Verlet neighbour lists of the
beads it drives), and the connections of one address form a step group: a step's
beads make one batch, closed as soon as every connection has submitted. Each call
carries its origin (address, connection and the connection's step count) for
capture records.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import TYPE_CHECKING

from cace_server.capture import Origin
from cace_server.ipi.driver import Evaluator, Source
from cace_server.outputs import Outputs
from cace_server.structures import Prediction, Structure

if TYPE_CHECKING:
    from cace_server.engine import Engine


#: What every i-PI step needs: energy, forces and the virial (the stress output).
IPI_REQUIRED = ("energy", "forces", "stress")
#: Outputs sent in the extras when the model offers them (see the module docstring).
IPI_EXTRAS = ("charges", "dipole")
#: What a committee sends in addition (when it offers ``committee_energies``).
IPI_COMMITTEE = (
    "committee_energies",
    "committee_forces",
    "committee_virials",
    "energy_uncertainty",
)


#: Connections whose step counts are kept (for capture records); older ones are dropped.
MAX_COUNTED_CONNECTIONS = 4096


def ipi_outputs(offered: Sequence[str], bec: bool) -> Outputs:
    """What an i-PI connection asks a model that offers ``offered`` for."""
    extras = [name for name in IPI_EXTRAS if name in offered]
    if bec and "bec" in offered:
        extras.append("bec")
    if "committee_energies" in offered:
        extras += [name for name in IPI_COMMITTEE if name in offered]
    return Outputs([*IPI_REQUIRED, *extras])


def ipi_evaluator(engine: Engine, model: str | None, bec: bool = True) -> Evaluator:
    """Evaluate i-PI's structures with ``model`` (None: the default), with BEC if ``bec``
    and the model computes them."""
    outputs = ipi_outputs(engine.model_info(model).outputs, bec)
    steps: Counter[str] = Counter()  # per connection: the POSDATA it has served

    async def evaluate(structures: list[Structure], *, source: Source) -> list[Prediction]:
        group = engine.step_group(f"ipi:{source.address}", source.peers)
        steps[source.connection] += 1
        if len(steps) > MAX_COUNTED_CONNECTIONS:
            # connections end without telling the evaluator: forget the oldest
            del steps[next(iter(steps))]
        origin = Origin(
            "ipi", source.connection, address=source.address, step=steps[source.connection]
        )
        # the i-PI lane: a PIMD step never waits behind queued HTTP work
        return await engine.evaluate(
            structures,
            model,
            outputs=outputs,
            lane="ipi",
            trajectory=f"ipi:{source.connection}",
            step_group=group,
            origin=origin,
            dropped_reason="ipi_closed",  # cancelled: the connection closed
        )

    return evaluate
