"""Work items and the queue the worker drains into batches.

A batch holds items of one model only, in arrival order, bounded by atoms and
neighbour pairs. The head of the queue always goes into the next batch (even when
it alone exceeds a bound), so no request can be starved; later items that do not
fit wait for a following batch. The batch of an i-PI step closes when every
connection of its :class:`~cace_server.engine.steps.StepGroup` has submitted, not
on a timer (see ``steps.py``); other work waits ``wait_s`` for company.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import deque
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from typing import Any

from cace_server.engine.errors import EngineClosed, EngineError
from cace_server.engine.stats import EngineStats
from cace_server.engine.steps import StepGroup
from cace_server.structures import Prediction, Structure


@dataclass(eq=False)
class WorkItem:
    """One structure of one request, from submission to its resolved future."""

    model: str
    structure: Structure
    index: int  # position within its request
    stress: bool
    bec: bool = False  # Born effective charges asked for (extra backward passes)
    future: Future[Prediction] = field(default_factory=Future)
    submitted: float = field(default_factory=time.monotonic)
    prepared: Any = None  # the model's prepared structure (neighbour list), set before queueing
    enqueued: float = 0.0
    session: str | None = None  # who submitted it (Verlet lists, step-group member)
    step_group: StepGroup | None = None  # the i-PI step it belongs to, if any

    @property
    def n_atoms(self) -> int:
        return len(self.structure)

    @property
    def n_pairs(self) -> int:
        return int(self.prepared.n_pairs) if self.prepared is not None else 0


def select_batch(
    items: deque[WorkItem], max_atoms: int, max_pairs: int
) -> tuple[list[WorkItem], deque[WorkItem]]:
    """Split ``items`` into (next batch, the rest in order); ``items`` must not be empty."""
    model = items[0].model
    batch: list[WorkItem] = []
    rest: deque[WorkItem] = deque()
    atoms = pairs = 0
    for item in items:
        fits = atoms + item.n_atoms <= max_atoms and pairs + item.n_pairs <= max_pairs
        if item.model == model and (fits or not batch):
            batch.append(item)
            atoms += item.n_atoms
            pairs += item.n_pairs
        else:
            rest.append(item)
    return batch, rest


class PendingQueue:
    """Prepared items waiting for the worker; producers are the prepare threads."""

    def __init__(self, stats: EngineStats | None = None) -> None:
        self._items: deque[WorkItem] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._stats = stats

    def __len__(self) -> int:
        with self._cond:
            return len(self._items)

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
                if item.step_group is not None and item.session is not None:
                    item.step_group.arrived(item.session)
            self._items.extend(items)
            self._cond.notify_all()

    def take_batch(
        self, max_atoms: int, max_pairs: int, wait_s: float = 0.0
    ) -> list[WorkItem] | None:
        """Block until a batch is available; ``None`` when the queue is closed (and drained).

        With ``wait_s`` > 0, waits until ``wait_s`` after the head item arrived for
        more items of its model to join, unless the batch is already full. A head
        item of a step group waits instead until its step is complete (at most the
        group's ``timeout_s``).
        """
        with self._cond:
            while True:
                while not self._items:
                    if self._closed:
                        return None
                    self._cond.wait()
                group = self._items[0].step_group
                timed_out = False
                if group is not None or wait_s > 0:
                    head = self._items[0]
                    deadline = head.enqueued + (group.timeout_s if group is not None else wait_s)
                    # Nothing can join after close(), so stop waiting then.
                    while self._items and not self._closed and self._items[0] is head:
                        if group is not None and group.complete():
                            break
                        if self._is_full(max_atoms, max_pairs):
                            break
                        remaining = deadline - time.monotonic()
                        if remaining <= 0:
                            timed_out = group is not None
                            break
                        self._cond.wait(remaining)
                    if not self._items or self._items[0] is not head:
                        continue  # emptied by close(), or taken by another worker
                batch, self._items = select_batch(self._items, max_atoms, max_pairs)
                self._step_taken(batch, not timed_out)
                return batch

    def _step_taken(self, batch: list[WorkItem], complete: bool) -> None:
        groups: dict[int, tuple[StepGroup, list[str]]] = {}
        for item in batch:
            if item.step_group is not None and item.session is not None:
                groups.setdefault(id(item.step_group), (item.step_group, []))[1].append(
                    item.session
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
                removed = list(self._items)
                self._items.clear()
                for item in removed:
                    if item.step_group is not None and item.session is not None:
                        item.step_group.forget(item.session)
            self._cond.notify_all()
            return removed

    def _is_full(self, max_atoms: int, max_pairs: int) -> bool:
        model = self._items[0].model
        atoms = pairs = 0
        for item in self._items:
            if item.model != model:
                continue
            atoms += item.n_atoms
            pairs += item.n_pairs
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
