"""Step groups: the connections of one i-PI run, whose beads of a step make one batch.

i-PI sends a step's beads over its connections one after the other and waits for
all forces before the next step. A timer window either closes before the last bead
arrives (one step becomes several model calls) or waits longer than needed. A
:class:`StepGroup` knows which members (connections) are active and closes the
batch as soon as every active member's structure of this step is queued.

``size`` is the number of connections that i-PI has accepted (the driver knows:
i-PI accepts a few per poll, and one still in its listen backlog brings no bead), so
a cold start does not wait for connections i-PI has not taken yet. Until every one
of ``size`` connections has been seen, a step waits for all of them. After that, a
member is active when it submitted in this step or the previous one, so a
connection that i-PI no longer uses (fewer beads than connections, a run that
ended) stops being waited for after one step. A step whose
members do not all arrive within ``timeout_s`` of the first one, or that sees no
arrival for ``QUIET_FRACTION * timeout_s``, is closed anyway (counted as a step
timeout; from then on only members seen are waited for). The quiet limit matters:
measured with ``cace-server serve`` and 32 connections, a bead that reached us
after its step was closed (a late connection) started a step of its own, and i-PI
sent no further bead until it was answered; every later step then waited out the
full time limit (9 timeouts in 7 steps, 2.1 s per step against 1.1 s).

A connection i-PI accepts after it handed out a step's first beads brings a bead of
that step, which our group has already closed (every connection accepted then was
served). Such a *late joiner* (a member never seen before, arriving when no member
has yet arrived in the new step) is counted in the step before: its batch runs as
soon as every accepted connection has been seen, and the next step waits for it.
Every method is called under the queue's lock.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterable

#: a step with no arrival for this fraction of its time limit is closed: i-PI hands
#: out a step's beads within milliseconds of each other, unless it waits for us.
QUIET_FRACTION = 0.1


class StepGroup:
    """The members of one i-PI address and what each has queued in the current step."""

    def __init__(self, key: str, size: int, timeout_s: float) -> None:
        self.key = key
        self.size = size  # connections to this address
        self.timeout_s = timeout_s
        self.step = 0
        self._learned = False  # True once we know who is active without counting to size
        self._last_seen: dict[str, int] = {}  # member -> step it last submitted in
        self._queued: Counter[str] = Counter()  # member -> items waiting in the queue
        self._taken: set[str] = set()  # members whose item of this step was batched
        self._last_arrival: float | None = None  # time of this step's latest arrival
        self._arrivals = 0  # arrivals of this step's own beads (late joiners not counted)
        self._late: set[str] = set()  # late joiners whose bead of the previous step waits

    def arrived(self, member: str, now: float | None = None) -> None:
        """A member's structure entered the queue at ``now`` (time.monotonic's clock)."""
        if member in self._taken:
            # A second structure of the same member: i-PI has begun the next step
            # (or a member serves several beads); the current step is over.
            self._next_step()
        if member not in self._last_seen and self.step > 0 and not self._arrivals:
            self._late.add(member)
            self._last_seen[member] = self.step - 1
        else:
            self._last_seen[member] = self.step
            self._arrivals += 1
        self._queued[member] += 1
        self._last_arrival = time.monotonic() if now is None else now

    def deadline(self, first: float) -> float:
        """When a batch whose first item arrived at ``first`` closes, complete or not."""
        limit = first + self.timeout_s
        if self._last_arrival is None:
            return limit
        return min(limit, self._last_arrival + QUIET_FRACTION * self.timeout_s)

    def active(self) -> list[str]:
        return [m for m, seen in self._last_seen.items() if seen >= self.step - 1]

    def complete(self) -> bool:
        """Every active member has this step's structure queued or already batched."""
        if not self._learned and len(self._last_seen) < self.size:
            return False
        if self._late and not self._arrivals:
            # only late joiners queued: the rest of the previous step, once all are in
            return len(self._last_seen) >= self.size
        return all(self._queued[m] > 0 or m in self._taken for m in self.active())

    def taken(self, members: Iterable[str]) -> None:
        """Structures of these members went into a batch."""
        for member in members:
            self._queued[member] -= 1
            if self._queued[member] <= 0:
                del self._queued[member]
            if member in self._late:
                self._late.discard(member)  # its bead was of the previous step
            else:
                self._taken.add(member)
        # Until every connection has been seen, one still unseen may bring this step's
        # bead late (i-PI accepts a few connections per poll): the step then ends when
        # a member that was served in it submits again (``arrived``). Ending it here
        # would count the late beads as the next step's, and every later step would be
        # split in two the same way.
        if len(self._last_seen) >= self.size and all(m in self._taken for m in self.active()):
            self._next_step()

    def timed_out(self) -> None:
        """A step was closed by the time limit: wait only for members seen from now on."""
        self._learned = True

    def forget(self, member: str) -> None:
        """A member's structure left the queue unbatched (engine closing)."""
        self._queued[member] -= 1
        if self._queued[member] <= 0:
            del self._queued[member]
            self._late.discard(member)

    def _next_step(self) -> None:
        if len(self._last_seen) >= self.size:
            self._learned = True
        self.step += 1
        self._taken.clear()
        self._last_arrival = None
        self._arrivals = 0
        # Members silent for two steps are no longer active: drop them for good.
        stale = [m for m, seen in self._last_seen.items() if seen < self.step - 1]
        for m in stale:
            if not self._queued[m]:
                del self._last_seen[m]
