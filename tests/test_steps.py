"""Step groups as a pure state machine (the queue calls them under its lock)."""

from __future__ import annotations

from cace_server.engine.steps import StepGroup


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
