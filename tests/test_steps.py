"""Step groups as a pure state machine (the queue calls them under its lock)."""

from __future__ import annotations

import time

from cace_server.engine.batching import Lane, PendingQueue, WorkItem
from cace_server.engine.steps import QUIET_FRACTION, StepGroup
from cace_server.outputs import Outputs
from cace_server.structures import Structure


def test_a_step_is_complete_when_every_connection_submitted() -> None:
    group = StepGroup("ipi:a", size=3, timeout_s=1.0)
    for member in ("c0", "c1"):
        group.arrived(member)
        assert not group.complete()
    group.arrived("c2")
    assert group.complete()
    group.taken(["c0", "c1", "c2"])
    assert group.step == 1
    # next step: the same three are expected again
    group.arrived("c1")
    assert not group.complete()
    group.arrived("c0")
    group.arrived("c2")
    assert group.complete()


def test_a_step_split_over_batches_waits_only_for_the_rest() -> None:
    group = StepGroup("ipi:a", size=2, timeout_s=1.0)
    group.arrived("c0")
    group.arrived("c1")
    group.taken(["c0"])  # the batch was full
    assert group.complete() and group.step == 0
    group.taken(["c1"])
    assert group.step == 1


def test_fewer_beads_than_connections_are_learned_after_one_timeout() -> None:
    group = StepGroup("ipi:a", size=4, timeout_s=1.0)
    group.arrived("c0")
    group.arrived("c1")
    assert not group.complete()  # two of four connections have been seen
    group.timed_out()
    group.taken(["c0", "c1"])
    group.arrived("c0")
    assert not group.complete()
    group.arrived("c1")
    assert group.complete()  # no more waiting for c2 and c3


def test_a_late_connection_joins_the_step_it_belongs_to() -> None:
    # The first step closed (quiet time) before the last connection's bead came: that
    # bead is still this step's, and the next step is one batch of all four again.
    group = StepGroup("ipi:a", size=4, timeout_s=1.0)
    for member in ("c0", "c1", "c2"):
        group.arrived(member)
    group.timed_out()
    group.taken(["c0", "c1", "c2"])
    assert group.step == 0
    group.arrived("c3")
    assert group.complete()
    group.taken(["c3"])
    assert group.step == 1
    for member in ("c0", "c1", "c2"):
        group.arrived(member)
        assert not group.complete()
    group.arrived("c3")
    assert group.complete()


def test_a_connection_that_stops_is_dropped_after_two_steps() -> None:
    group = StepGroup("ipi:a", size=2, timeout_s=1.0)
    for _ in range(2):
        group.arrived("c0")
        group.arrived("c1")
        group.taken(["c0", "c1"])
    group.arrived("c0")  # c1 has gone
    assert not group.complete()
    group.timed_out()
    group.taken(["c0"])
    group.arrived("c0")
    assert group.complete()


def test_a_step_closes_when_its_arrivals_stop_not_only_at_the_time_limit() -> None:
    group = StepGroup("ipi:a", size=3, timeout_s=1.0)
    assert group.deadline(10.0) == 11.0  # nothing arrived yet: the time limit
    group.arrived("c0", now=10.0)
    assert group.deadline(10.0) == 10.0 + QUIET_FRACTION
    group.arrived("c1", now=10.05)  # each arrival moves the quiet deadline on
    assert group.deadline(10.0) == 10.05 + QUIET_FRACTION
    for k in range(30):  # a steady stream never waits past the time limit
        group.arrived(f"x{k}", now=10.05 + 0.05 * (k + 1))
    assert group.deadline(10.0) == 11.0
    group.timed_out()
    group.taken(["c0", "c1", *(f"x{k}" for k in range(30))])
    assert group.deadline(20.0) == 21.0  # a new step starts without arrivals


def _item(group: StepGroup, member: str) -> WorkItem:
    structure = Structure.create([1], [[0.0, 0.0, 0.0]])
    return WorkItem(
        "m", structure, 0, Outputs(["energy"]), Lane.IPI, trajectory=member, step_group=group
    )


def test_the_queue_closes_a_stalled_step_after_the_quiet_time_not_the_time_limit() -> None:
    """Two of three members arrive and the third never does (i-PI is waiting for the
    answer to a straggler): the batch goes after a tenth of the limit."""
    group = StepGroup("ipi:a", size=3, timeout_s=2.0)
    queue = PendingQueue()
    queue.put_many([_item(group, "c0")])
    time.sleep(0.05)
    queue.put_many([_item(group, "c1")])
    start = time.monotonic()
    batch = queue.take_batch(max_atoms=100, max_pairs=100)
    waited = time.monotonic() - start
    assert batch is not None and [i.trajectory for i in batch] == ["c0", "c1"]
    # the quiet time (0.2 s) after c1, well before c0's limit (2 s)
    assert 0.1 < waited < 1.0, waited


def test_a_connection_accepted_late_brings_the_rest_of_the_first_step() -> None:
    # Cold start: i-PI accepted c0 alone and gave it the first bead; c1, accepted a poll
    # later, brings the other bead of that step. No step waits out its time limit.
    group = StepGroup("ipi:a", size=1, timeout_s=1.0)
    group.arrived("c0")
    assert group.complete()  # the only accepted connection submitted
    group.taken(["c0"])
    group.size = 2  # c1 accepted
    group.arrived("c1")
    assert group.complete()  # the rest of the first step: runs at once
    group.taken(["c1"])
    # the next step is one batch of both
    group.arrived("c0")
    assert not group.complete()
    group.arrived("c1")
    assert group.complete()
    group.taken(["c0", "c1"])
    group.arrived("c1")
    group.arrived("c0")
    assert group.complete()
