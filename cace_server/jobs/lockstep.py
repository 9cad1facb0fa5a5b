"""Many ASE optimisers or integrators stepped together: one model call per iteration.

Each structure of a job runs ASE's own code (``FIRE(...).run(fmax, steps)``, an
integrator's ``run(steps)``) unchanged, in a greenlet of its own, with a
:class:`LockstepCalculator` attached. When ASE asks that calculator for forces, the
greenlet hands the structure to the loop and is suspended; once every live structure
waits for forces (or has finished), the loop evaluates them all in one call and
resumes each with its own result. ASE's control flow is never re-implemented here,
so a job's relaxation is ASE's relaxation, step for step, whatever the optimiser
(line searches, which ask for forces at trial points, included).

Greenlets rather than threads: switching is deterministic and costs about a
microsecond, and a thousand suspended optimisers need no thread each.

The live set is bounded by a budget of atoms and neighbour pairs (the model's own
cost estimate, :class:`~cace_server.structures.BatchCost`, learnt from each
structure's previous evaluation); a structure that finishes leaves and a waiting one
enters at the next iteration, so the batch stays full. An iteration normally
evaluates the whole live set; ``cap()`` may ask for less (while an i-PI run shares
the device, see ``manager.py``): the live structures are then evaluated in turns,
those that waited longest first, each still one call at a time.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
from ase import Atoms
from ase.calculators.calculator import Calculator, all_changes
from greenlet import GreenletExit, greenlet

from cace_server.structures import Prediction, Structure, voigt

Outcome = Prediction | BaseException
#: evaluates structures in one call: (structures, their indices in the job) -> outcomes
Evaluate = Callable[[list[Structure], list[int]], Sequence[Outcome]]
#: what one structure runs (in its greenlet): ASE code using the calculator it is given;
#: returns the structure's result record
Body = Callable[["LockstepCalculator"], dict[str, Any]]


class LockstepCalculator(Calculator):
    """An ASE calculator whose results come from the lockstep loop (see the module doc).

    Every evaluation computes energy and forces (and the stress when ``stress``): ASE
    asks for them in turn at one geometry, and they come from one model call.
    """

    implemented_properties = ["energy", "free_energy", "forces", "stress"]  # noqa: RUF012

    def __init__(
        self,
        *,
        stress: bool = False,
        arrays: Mapping[str, npt.NDArray[np.float64]] | None = None,
        free: npt.NDArray[np.bool_] | None = None,
    ) -> None:
        super().__init__()
        self.stress = stress
        self.arrays = dict(arrays or {})
        #: atoms whose forces count for ``max_force`` (those not held fixed)
        self.free = free
        #: largest force on a free atom at the last evaluation (eV/Å)
        self.max_force = float("nan")
        self.evaluations = 0
        if not stress:
            self.implemented_properties = ["energy", "free_energy", "forces"]

    def check_state(self, atoms: Atoms, tol: float = 1e-15) -> list[str]:
        """What changed since the last evaluation: ASE's test, without its cost.

        ASE compares every array with ``allclose`` on each property request (four per
        optimiser step); profiled on 64 water clusters that was 40 ms of a 240 ms
        iteration. Positions and cell are set, never nudged by 1e-15, so an exact
        comparison gives the same answers.
        """
        last = self.atoms
        if last is None or len(last) != len(atoms):
            return list(all_changes)
        changed = []
        if not np.array_equal(last.positions, atoms.positions):
            changed.append("positions")
        if not np.array_equal(last.numbers, atoms.numbers):
            changed.append("numbers")
        if not np.array_equal(last.cell.array, atoms.cell.array):
            changed.append("cell")
        if not np.array_equal(last.pbc, atoms.pbc):
            changed.append("pbc")
        return changed

    def calculate(
        self,
        atoms: Atoms | None = None,
        properties: Sequence[str] = ("energy",),
        system_changes: Sequence[str] = all_changes,
    ) -> None:
        super().calculate(atoms, properties, system_changes)
        assert self.atoms is not None
        structure = Structure.create(
            self.atoms.numbers,
            self.atoms.positions,
            self.atoms.cell.array,
            self.atoms.pbc,
            self.arrays,
        )
        parent = greenlet.getcurrent().parent
        if parent is None:
            raise RuntimeError("a LockstepCalculator is evaluated only inside a lockstep task")
        outcome = parent.switch(structure)
        if isinstance(outcome, BaseException):
            raise outcome
        assert isinstance(outcome, Prediction) and outcome.forces is not None
        forces = np.asarray(outcome.forces, dtype=np.float64)
        self.results = {"energy": outcome.energy, "free_energy": outcome.energy, "forces": forces}
        if self.stress:
            if outcome.stress is None:
                raise RuntimeError("the model returned no stress for a 3-D periodic structure")
            self.results["stress"] = voigt(outcome.stress)
        norms = np.linalg.norm(forces if self.free is None else forces[self.free], axis=1)
        self.max_force = float(norms.max()) if norms.size else 0.0
        self.evaluations += 1


@dataclass
class Task:
    """One structure of a job: its index, size, and what it runs."""

    index: int
    n_atoms: int
    body: Body
    calculator: LockstepCalculator
    _glet: greenlet | None = field(default=None, repr=False)
    #: the structure it waits to have evaluated (None: not started or finished)
    request: Structure | None = field(default=None, repr=False)
    pairs: int | None = None  # neighbour pairs of its last evaluation


@dataclass
class IterationStats:
    """What the loop has done so far (read by progress reports)."""

    iterations: int = 0
    evaluations: int = 0
    live: int = 0
    max_force: float = float("nan")


def failure(exc: BaseException) -> dict[str, Any]:
    """The record of a structure whose run raised ``exc``."""
    kind = getattr(exc, "kind", None) or type(exc).__name__
    return {"status": "failed", "error": {"error": str(kind), "message": str(exc)}}


class Lockstep:
    """Runs tasks to completion, evaluating all live ones together each iteration.

    ``evaluate`` computes a list of structures in one call (raising only when the
    whole call cannot be made, which ends the run). ``max_atoms`` / ``max_pairs``
    bound the live set (the first task always runs). ``cancelled`` is polled between
    iterations; once true, live tasks are abandoned and nothing more is yielded.
    """

    def __init__(
        self,
        evaluate: Evaluate,
        *,
        max_atoms: int,
        max_pairs: int,
        cancelled: Callable[[], bool] = lambda: False,
        cap: Callable[[], int] | None = None,
    ) -> None:
        self._evaluate = evaluate
        self.max_atoms = max_atoms
        self.max_pairs = max_pairs
        self._cancelled = cancelled
        self._cap = cap
        self.stats = IterationStats()
        # pairs per atom seen so far: the estimate for structures not yet evaluated
        self._pairs_seen = 0
        self._atoms_seen = 0

    def run(self, tasks: Iterable[Task]) -> Iterator[tuple[int, dict[str, Any]]]:
        """Yield ``(index, record)`` for each task as it finishes (failures included)."""
        waiting = deque(tasks)
        live: list[Task] = []
        try:
            while waiting or live:
                if self._cancelled():
                    return
                finished = self._admit(waiting, live)
                yield from finished
                live = [t for t in live if t.request is not None]
                if not live:
                    continue
                turn = self._turn(live)
                outcomes = self._evaluate([t.request for t in turn], [t.index for t in turn])  # type: ignore[misc]
                self.stats.iterations += 1
                self.stats.evaluations += len(turn)
                # those evaluated now go to the back of the line
                chosen = set(map(id, turn))
                live = [t for t in live if id(t) not in chosen] + turn
                for task, outcome in zip(turn, outcomes, strict=True):
                    if isinstance(outcome, Prediction) and outcome.cost is not None:
                        task.pairs = outcome.cost.pairs
                        self._pairs_seen += outcome.cost.pairs
                        self._atoms_seen += outcome.cost.atoms
                    done = self._advance(task, outcome)
                    if done is not None:
                        yield task.index, done
                live = [t for t in live if t.request is not None]
                self.stats.live = len(live)
                forces = [t.calculator.max_force for t in live]
                self.stats.max_force = max(forces) if forces else float("nan")
        finally:
            for task in live:  # cancelled, or the run failed: end the suspended ASE runs
                if task._glet is not None and not task._glet.dead:
                    task._glet.throw(GreenletExit)

    def _turn(self, live: list[Task]) -> list[Task]:
        """The live structures evaluated this iteration: all, or the first up to ``cap()`` atoms."""
        if self._cap is None:
            return live
        cap = self._cap()
        turn: list[Task] = []
        atoms = 0
        for task in live:
            if turn and atoms + task.n_atoms > cap:
                continue
            turn.append(task)
            atoms += task.n_atoms
        return turn

    def _cost(self, task: Task) -> tuple[int, int]:
        if task.pairs is not None:
            return task.n_atoms, task.pairs
        per_atom = self._pairs_seen / self._atoms_seen if self._atoms_seen else 0.0
        return task.n_atoms, int(per_atom * task.n_atoms)

    def _admit(self, waiting: deque[Task], live: list[Task]) -> list[tuple[int, dict[str, Any]]]:
        """Start waiting tasks while the budget allows; returns those that ended at once."""
        atoms = pairs = 0
        for task in live:
            a, p = self._cost(task)
            atoms += a
            pairs += p
        finished = []
        while waiting:
            a, p = self._cost(waiting[0])
            if live and (atoms + a > self.max_atoms or pairs + p > self.max_pairs):
                break
            task = waiting.popleft()
            task._glet = greenlet(lambda t=task: t.body(t.calculator))
            done = self._advance(task, None)
            if done is None:
                live.append(task)
                atoms += a
                pairs += p
            else:
                finished.append((task.index, done))
        return finished

    def _advance(self, task: Task, outcome: Outcome | None) -> dict[str, Any] | None:
        """Resume ``task`` with ``outcome``; its record once it has finished, else None."""
        assert task._glet is not None
        try:
            value = task._glet.switch(outcome) if outcome is not None else task._glet.switch()
        except Exception as exc:
            task.request = None
            return failure(exc)
        if task._glet.dead:
            task.request = None
            assert isinstance(value, dict)
            return value
        assert isinstance(value, Structure)
        task.request = value
        return None
