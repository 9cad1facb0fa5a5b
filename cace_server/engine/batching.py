"""Work items and the queue the worker drains into batches.

Items wait in four lanes:

- ``ipi``: structures from i-PI connections. A PIMD step is waited for by the whole
  simulation, so this lane always goes first: it never waits behind other work
  than the one batch already on the device.
- ``small``: HTTP requests of at most ``small_request_atoms`` atoms in total.
- ``bulk``: larger HTTP requests.
- ``jobs``: server-side jobs (batched relaxations, MD runs). Each iteration of a job
  is one call holding all its live structures, and waits here; an i-PI step waits at
  most for the one job batch already on the device.

The ``small``, ``bulk`` and ``jobs`` lanes share the device's time: the next batch
comes from the lane that has used least of it (ties in that order; a lane that was
empty starts level with the busiest, it saves no credit). Small batches cost little,
so a 3-atom request waits only for the batch already on the device, and each busy
lane still gets its share of the time when the others never stop coming.

A batch holds items of one lane and one model version (see ``Engine.swap_model``:
an item keeps the version it was submitted for), in arrival order, bounded by atoms
and neighbour pairs. The head of its lane always goes into the batch (even when it
alone exceeds a bound), so nothing is starved within a lane; later items that do
not fit wait for a following batch. The batch of an i-PI step closes when every
connection of its :class:`~cace_server.engine.steps.StepGroup` has submitted, not
on a timer (see ``steps.py``); other work waits ``wait_s`` for company.
"""

from __future__ import annotations

import contextlib
import enum
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from typing import Any

from cace_server.capture import Origin
from cace_server.engine.errors import EngineClosed, EngineError
from cace_server.engine.stats import EngineStats
from cace_server.engine.steps import StepGroup
from cace_server.outputs import Outputs
from cace_server.structures import BatchCost, Prediction, Structure


class Lane(str, enum.Enum):
    """Where an item waits; lanes earlier in this list go first (see the module doc)."""

    IPI = "ipi"
    SMALL = "small"
    BULK = "bulk"
    JOBS = "jobs"


# The lanes that share the device's time, in the order that breaks ties.
_SHARED_LANES = (Lane.SMALL, Lane.BULK, Lane.JOBS)


@dataclass(eq=False)
class WorkItem:
    """One structure of one request, from submission to its resolved future."""

    model: str
    structure: Structure
    index: int  # position within its request
    outputs: Outputs  # what the caller asked for (checked against the model at submit)
    lane: Lane = Lane.SMALL
    future: Future[Prediction] = field(default_factory=Future)
    submitted: float = field(default_factory=time.monotonic)
    prepared: Any = None  # the model's prepared structure (neighbour list), set before queueing
    cost: BatchCost = field(default=BatchCost(0, 0))  # from the model, set with prepared
    enqueued: float = 0.0
    # the caller's structures that evolve step by step (Verlet lists, step-group member)
    trajectory: str | None = None
    step_group: StepGroup | None = None  # the i-PI step it belongs to, if any
    origin: Origin | None = None  # where it came from (capture records it)
    version: int = 0  # the model version it is evaluated with (pinned at submission)
    # the key of its Verlet list within the trajectory (None: its index)
    slot: int | None = None
    # i-PI items: per shared lane, batches on the device at enqueue minus batches taken
    # by then; adding the count taken by its own batch's turn gives what it waited behind
    ahead_offset: dict[Lane, int] | None = None

    @property
    def n_atoms(self) -> int:
        return len(self.structure)

    @property
    def list_slot(self) -> int:
        """Which of the trajectory's Verlet lists it uses (see ``Engine.submit``'s ``slots``)."""
        return self.index if self.slot is None else self.slot

    @property
    def model_key(self) -> tuple[str, int]:
        """Which model version computes it: items of one batch share this."""
        return (self.model, self.version)


def select_batch(
    items: deque[WorkItem], max_atoms: int, max_pairs: int
) -> tuple[list[WorkItem], deque[WorkItem]]:
    """Split ``items`` into (next batch, the rest in order); ``items`` must not be empty."""
    model = items[0].model_key
    batch: list[WorkItem] = []
    rest: deque[WorkItem] = deque()
    atoms = pairs = 0
    for item in items:
        cost = item.cost
        fits = atoms + cost.atoms <= max_atoms and pairs + cost.pairs <= max_pairs
        if item.model_key == model and (fits or not batch):
            batch.append(item)
            atoms += cost.atoms
            pairs += cost.pairs
        else:
            rest.append(item)
    return batch, rest


# weight of the newest batch in a lane's moving averages
_NEWEST_WEIGHT = 0.3


@dataclass(frozen=True)
class LaneTiming:
    """A lane's recent batches: when the last ended (``time.monotonic``), and moving
    averages of a batch's seconds and of seconds per atom."""

    last_end: float = float("-inf")
    batch_s: float = 0.0
    s_per_atom: float = 0.0

    def updated(self, now: float, seconds: float, atoms: int) -> LaneTiming:
        per_atom = seconds / max(atoms, 1)
        if self.last_end == float("-inf"):
            return LaneTiming(now, seconds, per_atom)
        a = _NEWEST_WEIGHT
        return LaneTiming(
            now, (1 - a) * self.batch_s + a * seconds, (1 - a) * self.s_per_atom + a * per_atom
        )


class PendingQueue:
    """Prepared items waiting for the worker, in lanes; producers are the prepare threads."""

    def __init__(self, stats: EngineStats | None = None) -> None:
        self._lanes: dict[Lane, deque[WorkItem]] = {lane: deque() for lane in Lane}
        self._cond = threading.Condition()
        self._closed = False
        self._stats = stats
        # Worker seconds used by each shared lane: a worker asks for its next batch when
        # it has finished the previous one, so the time between is that batch's cost.
        # Per worker thread (lane, time taken): several workers may share the queue.
        self._used: dict[Lane, float] = dict.fromkeys(_SHARED_LANES, 0.0)
        self._computing: dict[int, tuple[Lane, float, int]] = {}
        # Recent batches of each lane (a frontend sizes its own work from them).
        self._timing: dict[Lane, LaneTiming] = {}
        # Batches taken from each lane, to count what an i-PI step waited behind.
        self._taken: dict[Lane, int] = dict.fromkeys(Lane, 0)

    def __len__(self) -> int:
        with self._cond:
            return sum(len(q) for q in self._lanes.values())

    def put_many(self, items: list[WorkItem]) -> None:
        """Append a request's items together; raises EngineClosed after close()."""
        if not items:
            return
        now = time.monotonic()
        with self._cond:
            if self._closed:
                raise EngineClosed("engine is shutting down")
            for item in items:
                item.enqueued = now
                if item.lane is Lane.IPI:
                    item.ahead_offset = self._ahead_offset()
                self._lanes[item.lane].append(item)
                if item.step_group is not None and item.trajectory is not None:
                    item.step_group.arrived(item.trajectory, now)
            self._cond.notify_all()

    def purge_cancelled(self) -> int:
        """Remove the items whose caller cancelled; returns how many (not yet counted)."""
        with self._cond:
            return self._purge()

    def _purge(self) -> int:
        removed = 0
        for lane in Lane:
            items = self._lanes[lane]
            if not any(item.future.cancelled() for item in items):
                continue
            keep: deque[WorkItem] = deque()
            for item in items:
                if item.future.cancelled():
                    removed += 1
                    if item.step_group is not None and item.trajectory is not None:
                        item.step_group.forget(item.trajectory)
                else:
                    keep.append(item)
            self._lanes[lane] = keep
        if removed:
            self._cond.notify_all()
        return removed

    def wake(self) -> None:
        """Wake the workers waiting for work (one has a task to run, see ``take_batch``)."""
        with self._cond:
            self._cond.notify_all()

    def take_batch(
        self,
        max_atoms: int,
        max_pairs: int,
        wait_s: float = 0.0,
        interrupt: Callable[[], bool] | None = None,
    ) -> list[WorkItem] | None:
        """Block until a batch is available; ``None`` when the queue is closed (and drained).

        Returns an empty batch when ``interrupt()`` is true while it waits for work (a
        worker's task, such as loading a model version, is due; see :meth:`wake`).

        With ``wait_s`` > 0, waits until ``wait_s`` after the head item of the chosen
        lane arrived for more items of its model to join, unless the batch is
        already full (or work of a lane that goes first arrives meanwhile). A head
        item of a step group waits instead until its step is complete (at most the
        group's ``timeout_s``).
        """
        with self._cond:
            previous = self._computing.pop(threading.get_ident(), None)
            if previous is not None:
                self._finished(*previous)
            while True:
                purged = self._purge()
                if purged and self._stats is not None:
                    self._stats.leave_queue(purged)
                    self._stats.error("cancelled", purged)
                lane = self._next_lane()
                while lane is None:
                    if self._closed:
                        return None
                    if interrupt is not None and interrupt():
                        return []
                    self._cond.wait()
                    lane = self._next_lane()
                head = self._lanes[lane][0]
                group = head.step_group
                timed_out = False
                if group is not None or wait_s > 0:
                    # Nothing can join after close(), so stop waiting then.
                    while not self._closed and self._still_head(lane, head):
                        if group is not None and group.complete():
                            break
                        if self._is_full(self._lanes[lane], max_atoms, max_pairs):
                            break
                        # a step's deadline moves with its arrivals (StepGroup.deadline)
                        deadline = (
                            group.deadline(head.enqueued)
                            if group is not None
                            else head.enqueued + wait_s
                        )
                        remaining = deadline - time.monotonic()
                        if remaining <= 0:
                            timed_out = group is not None
                            break
                        self._cond.wait(remaining)
                    # emptied by close(), taken by another worker, or i-PI work came
                    if not self._still_head(lane, head):
                        continue
                batch, self._lanes[lane] = select_batch(self._lanes[lane], max_atoms, max_pairs)
                atoms = sum(item.n_atoms for item in batch)
                self._computing[threading.get_ident()] = (lane, time.monotonic(), atoms)
                self._taken[lane] += 1
                self._step_taken(batch, not timed_out)
                self._count_taken(lane, batch)
                return batch

    def _finished(self, lane: Lane, started: float, atoms: int) -> None:
        """Account a batch that has just been computed (caller holds the condition)."""
        now = time.monotonic()
        seconds = now - started
        if lane in self._used:
            self._used[lane] += seconds
        self._timing[lane] = self._timing.get(lane, LaneTiming()).updated(now, seconds, atoms)

    def timing(self) -> dict[Lane, LaneTiming]:
        """Recent batches by lane (lanes that have had none are absent)."""
        with self._cond:
            return dict(self._timing)

    def _ahead_offset(self) -> dict[Lane, int]:
        """Batches of the shared lanes on the device now, less those taken so far."""
        offset = {lane: -self._taken[lane] for lane in _SHARED_LANES}
        for lane, _, _ in self._computing.values():
            if lane in offset:
                offset[lane] += 1
        return offset

    def _count_taken(self, lane: Lane, batch: list[WorkItem]) -> None:
        """Count the batch by lane and, for an i-PI batch, the batches it waited behind:
        those of other lanes on the device when its first structure arrived or taken
        while it waited (the lane rule allows only the former, one per worker)."""
        if self._stats is None:
            return
        behind: dict[Lane, int] = {}
        if lane is Lane.IPI:
            for item in batch:
                if item.ahead_offset is None:
                    continue
                counts = {k: n + self._taken[k] for k, n in item.ahead_offset.items()}
                if sum(counts.values()) > sum(behind.values()):
                    behind = counts
        self._stats.batch_taken(lane.value, {k.value: n for k, n in behind.items() if n})

    def _step_taken(self, batch: list[WorkItem], complete: bool) -> None:
        groups: dict[int, tuple[StepGroup, list[str]]] = {}
        for item in batch:
            if item.step_group is not None and item.trajectory is not None:
                groups.setdefault(id(item.step_group), (item.step_group, []))[1].append(
                    item.trajectory
                )
        for group, members in groups.values():
            if not complete:
                group.timed_out()
            group.taken(members)
            if self._stats is not None:
                self._stats.step_closed(complete)

    def close(self, *, drain: bool = False) -> list[WorkItem]:
        """Refuse new items; without ``drain``, remove and return the waiting ones."""
        with self._cond:
            self._closed = True
            removed: list[WorkItem] = []
            if not drain:
                for lane in Lane:
                    removed.extend(self._lanes[lane])
                    self._lanes[lane].clear()
                for item in removed:
                    if item.step_group is not None and item.trajectory is not None:
                        item.step_group.forget(item.trajectory)
            self._cond.notify_all()
            return removed

    def _next_lane(self) -> Lane | None:
        """i-PI first; then the shared lane that has used least worker time."""
        if self._lanes[Lane.IPI]:
            return Lane.IPI
        most = max(self._used.values())
        for lane in _SHARED_LANES:
            if not self._lanes[lane]:
                self._used[lane] = most  # idle time earns no credit
        waiting = [lane for lane in _SHARED_LANES if self._lanes[lane]]
        if not waiting:
            return None
        return min(waiting, key=lambda lane: self._used[lane])  # ties: small, bulk, jobs

    def _still_head(self, lane: Lane, head: WorkItem) -> bool:
        """``head`` still leads ``lane`` and no lane that goes first has work."""
        items = self._lanes[lane]
        return bool(items) and items[0] is head and self._next_lane() == lane

    @staticmethod
    def _is_full(items: deque[WorkItem], max_atoms: int, max_pairs: int) -> bool:
        model = items[0].model_key
        atoms = pairs = 0
        for item in items:
            if item.model_key != model:
                continue
            atoms += item.cost.atoms
            pairs += item.cost.pairs
            if atoms >= max_atoms or pairs >= max_pairs:
                return True
        return False


def resolve(item: WorkItem, prediction: Prediction) -> None:
    """Hand a result to the caller (ignored if the caller cancelled meanwhile)."""
    with contextlib.suppress(InvalidStateError):
        item.future.set_result(prediction)


def reject(item: WorkItem, error: EngineError, stats: EngineStats) -> None:
    """Hand an error to the caller and count it."""
    stats.error(error.kind)
    with contextlib.suppress(InvalidStateError):
        item.future.set_exception(error)
