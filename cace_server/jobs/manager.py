"""Jobs: whole relaxations and MD runs of many structures, computed on the server.

A client sends the job, not every step (``POST /v1/jobs``). :class:`JobManager`
admits it (sizes, concurrency, per-client limits), runs it on a job thread (at most
``max_running_jobs`` at once; the others queue) and keeps its results until
``job_ttl_s`` after it ends. Each running job is a :class:`~cace_server.jobs.lockstep.Lockstep`
loop: one engine call per iteration for all of its live structures, in the engine's
``jobs`` lane, which shares the device with HTTP requests by time used and always
yields to i-PI steps.

A job does not depend on its client: it runs whether or not anyone reads its results,
and a reader may come and go (results are kept in the order structures finished,
each with its index). Cancelling stops it between iterations and withdraws its
queued structures from the engine at once. Jobs live in memory only: a server
restart loses the jobs it held and nothing else.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal

from cace_server.capture import Origin
from cace_server.engine import Engine, EngineError
from cace_server.engine.errors import Overloaded
from cace_server.jobs.items import JobItem
from cace_server.jobs.lockstep import Lockstep, Outcome, Task
from cace_server.jobs.md import md_body, md_calculator
from cace_server.jobs.params import JobKind, MDParams, RelaxParams
from cace_server.jobs.relax import relax_body, relax_calculator
from cace_server.jobs.settings import JobSettings
from cace_server.structures import Structure

logger = logging.getLogger("cace_server.jobs")

JobState = Literal["queued", "running", "done", "failed", "cancelled"]
STATES: tuple[JobState, ...] = ("queued", "running", "done", "failed", "cancelled")
_FINISHED = frozenset({"done", "failed", "cancelled"})
# How often a job waiting for the engine looks at its cancellation flag (s).
_POLL_S = 0.1
# An i-PI run counts as sharing the device while its last batch ended less than this ago.
_IPI_ACTIVE_S = 2.0
# While it does, a job iteration holds at least this fraction of the job's atom budget
# (so that a job keeps moving beside an i-PI run of tiny batches).
_SHARED_FLOOR = 8


class JobRefused(Exception):
    """A job the manager will not take: ``status`` 413 (too large), 429 (too many), 422."""

    def __init__(self, status: int, kind: str, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.kind = kind
        self.message = message
        self.field = field


class UnknownJob(KeyError):
    """No job has this id (never had, or it expired)."""


class _Stopped(Exception):
    """The job was cancelled (or the server is closing) while it waited for the engine."""


@dataclass(frozen=True)
class JobRequest:
    """What to run: ``kind`` with ``params`` on ``items`` with model ``model``."""

    kind: JobKind
    items: Sequence[JobItem]
    params: RelaxParams | MDParams
    model: str | None = None


class Job:
    """One job: its request, state, progress and the results of finished structures."""

    def __init__(self, request: JobRequest, model: str, owner: str) -> None:
        self.id = uuid.uuid4().hex
        self.kind = request.kind
        self.params = request.params
        self.items = list(request.items)
        self.model = model
        self.owner = owner
        self.n_atoms = sum(len(item) for item in self.items)
        self.created = time.time()
        self.started: float | None = None
        self.finished: float | None = None
        self.state: JobState = "queued"
        self.error: str | None = None
        self.model_calls = 0
        self.model_sha: str | None = None
        self._loop: Lockstep | None = None
        self._records: list[dict[str, Any]] = []
        self._cancel = threading.Event()
        self._cond = threading.Condition()
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = []

    # -- what readers see ------------------------------------------------------------------------
    @property
    def is_finished(self) -> bool:
        return self.state in _FINISHED

    @property
    def trajectory(self) -> str:
        """The engine trajectory its structures' neighbour lists are kept under."""
        return f"job:{self.id}"

    def records(self, start: int = 0) -> tuple[list[dict[str, Any]], bool]:
        """Results from position ``start`` on (finishing order), and whether the job has ended."""
        with self._cond:
            return self._records[start:], self.is_finished

    def status(self) -> dict[str, Any]:
        """State and progress, as ``GET /v1/jobs/{id}`` shows them."""
        with self._cond:
            counts = Counter(r["status"] for r in self._records)
            loop = self._loop
            out: dict[str, Any] = {
                "id": self.id,
                "kind": self.kind,
                "state": self.state,
                "model": self.model,
                "model_sha": self.model_sha,
                "n_structures": len(self.items),
                "n_atoms": self.n_atoms,
                "finished_structures": len(self._records),
                "by_status": dict(counts),
                "live_structures": loop.stats.live if loop is not None else 0,
                "iterations": loop.stats.iterations if loop is not None else 0,
                "model_calls": self.model_calls,
                "created": self.created,
                "started": self.started,
                "finished": self.finished,
                "error": self.error,
                "params": self.params.model_dump(),
            }
            if self.kind == "relax":
                force = loop.stats.max_force if loop is not None else float("nan")
                out["max_force"] = None if force != force else force  # NaN: none live
        return out

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the job has ended (threads only); whether it has."""
        with self._cond:
            return self._cond.wait_for(lambda: self.is_finished, timeout)

    async def changed(self, seen: int, timeout: float) -> None:
        """Return once there are more than ``seen`` records, the job has ended, or ``timeout``."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        with self._cond:
            if len(self._records) > seen or self.is_finished:
                return
            self._waiters.append((loop, future))
        try:
            await asyncio.wait_for(asyncio.shield(future), timeout)
        except asyncio.TimeoutError:
            pass
        finally:
            with self._cond:
                if (loop, future) in self._waiters:
                    self._waiters.remove((loop, future))

    # -- what the runner does --------------------------------------------------------------------
    def cancel(self) -> None:
        """Ask the job to stop (it does between iterations; queued work is withdrawn)."""
        self._cancel.set()
        with self._cond:
            if self.state == "queued":
                self._end("cancelled")

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def _add(self, index: int, record: dict[str, Any]) -> None:
        with self._cond:
            self._records.append({"index": index, **record})
            self._notify()

    def _start(self, loop: Lockstep) -> bool:
        with self._cond:
            if self.state != "queued":
                return False
            self.state = "running"
            self.started = time.time()
            self._loop = loop
            self._notify()
            return True

    def _end(self, state: JobState, error: str | None = None) -> None:
        """Set the final state (caller holds ``_cond``)."""
        self.state = state
        self.error = error
        self.finished = time.time()
        self._notify()

    def _notify(self) -> None:
        self._cond.notify_all()
        for loop, future in self._waiters:
            loop.call_soon_threadsafe(_resolve, future)
        self._waiters.clear()


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


@dataclass(frozen=True)
class JobsSnapshot:
    """The manager's counters, for ``/metrics``."""

    by_state: dict[str, int]
    iterations: int  # lockstep iterations of all jobs, since start
    evaluations: int  # structure evaluations of all jobs, since start
    structures: dict[tuple[str, str], int]  # (kind, status) -> finished structures
    live_structures: int


class JobManager:
    """Admits, runs, cancels and forgets jobs for one engine."""

    def __init__(self, engine: Engine, settings: JobSettings | None = None) -> None:
        self.engine = engine
        self.settings = settings or JobSettings()
        self._jobs: dict[str, Job] = {}
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(
            self.settings.max_running_jobs, thread_name_prefix="cace-job"
        )
        self._closed = False
        self._iterations = 0
        self._evaluations = 0
        self._structures: Counter[tuple[str, str]] = Counter()

    # -- admission ---------------------------------------------------------------------------------
    def submit(self, request: JobRequest, owner: str = "local") -> Job:
        """Queue ``request``; raises :class:`JobRefused` or the engine's error for its model."""
        self._check_size(request)
        model = self.engine.serving(request.model).name
        job = Job(request, model, owner)
        with self._lock:
            if self._closed:
                raise JobRefused(503, "closing", "the server is shutting down")
            self._expire()
            live = [j for j in self._jobs.values() if not j.is_finished]
            s = self.settings
            if len(live) >= s.max_jobs:
                raise JobRefused(
                    429,
                    "too_many_jobs",
                    f"{len(live)} jobs are queued or running; the limit "
                    f"is {s.max_jobs} (max_jobs): retry when one has finished",
                )
            mine = sum(1 for j in live if j.owner == owner)
            if mine >= s.max_jobs_per_client:
                raise JobRefused(
                    429,
                    "too_many_jobs",
                    f"this client has {mine} jobs queued or running; "
                    f"the limit is {s.max_jobs_per_client} (max_jobs_per_client)",
                )
            self._jobs[job.id] = job
        self._pool.submit(self._run, job)
        logger.info(
            "job %s: %s of %d structures (%d atoms) with model %s",
            job.id,
            job.kind,
            len(job.items),
            job.n_atoms,
            model,
        )
        return job

    def _check_size(self, request: JobRequest) -> None:
        s = self.settings
        if not request.items:
            raise JobRefused(422, "invalid_job", "a job needs at least one structure", "structures")
        if len(request.items) > s.max_job_structures:
            raise JobRefused(
                413,
                "too_many_structures",
                f"{len(request.items)} structures; a job may hold "
                f"at most {s.max_job_structures} (max_job_structures)",
                "structures",
            )
        atoms = sum(len(item) for item in request.items)
        if atoms > s.max_job_atoms:
            raise JobRefused(
                413,
                "too_many_atoms",
                f"{atoms} atoms in the job's structures; the limit is "
                f"{s.max_job_atoms} (max_job_atoms)",
                "structures",
            )
        if request.params.steps > s.max_job_steps:
            raise JobRefused(
                413,
                "too_many_steps",
                f"{request.params.steps} steps; the limit is {s.max_job_steps} (max_job_steps)",
                f"{request.kind}.steps",
            )

    # -- access ------------------------------------------------------------------------------------
    def get(self, job_id: str) -> Job:
        with self._lock:
            self._expire()
            job = self._jobs.get(job_id)
        if job is None:
            raise UnknownJob(job_id)
        return job

    def jobs(self) -> list[Job]:
        with self._lock:
            self._expire()
            return sorted(self._jobs.values(), key=lambda j: j.created)

    def cancel(self, job_id: str) -> Job:
        job = self.get(job_id)
        job.cancel()
        return job

    def forget(self, job_id: str) -> Job:
        """Cancel the job if it runs, and drop it and its results."""
        job = self.get(job_id)
        job.cancel()
        with self._lock:
            self._jobs.pop(job_id, None)
        return job

    def snapshot(self) -> JobsSnapshot:
        with self._lock:
            self._expire()
            jobs = list(self._jobs.values())
            iterations, evaluations = self._iterations, self._evaluations
            structures = dict(self._structures)
        by_state: dict[str, int] = dict.fromkeys(STATES, 0)
        live = 0
        for job in jobs:
            by_state[job.state] += 1
            loop = job._loop
            if loop is not None and job.state == "running":
                live += loop.stats.live
        return JobsSnapshot(by_state, iterations, evaluations, structures, live)

    def _expire(self) -> None:
        """Forget jobs that ended more than ``job_ttl_s`` ago (caller holds the lock)."""
        cutoff = time.time() - self.settings.job_ttl_s
        for job_id in [
            k for k, j in self._jobs.items() if j.finished is not None and j.finished < cutoff
        ]:
            del self._jobs[job_id]

    def close(self, timeout: float = 10.0) -> None:
        """Cancel every job and wait (up to ``timeout``) for the job threads to stop."""
        with self._lock:
            self._closed = True
            jobs = list(self._jobs.values())
        for job in jobs:
            job.cancel()
        deadline = time.monotonic() + timeout
        for job in jobs:
            job.wait(max(0.0, deadline - time.monotonic()))
        self._pool.shutdown(wait=False, cancel_futures=True)

    # -- running -----------------------------------------------------------------------------------
    def _budget(self) -> tuple[int, int]:
        engine = self.engine.settings
        atoms = self.settings.job_batch_atoms or engine.max_batch_atoms
        return min(atoms, engine.max_batch_atoms), engine.max_batch_pairs

    def _cap(self, budget: int) -> int:
        """Atoms a job evaluates in its next iteration.

        The whole budget, unless an i-PI run is using the device: the i-PI lane goes
        first, but a step whose beads arrive while a job batch runs waits for it. The job
        batch is then held to about the duration of an i-PI batch (from the engine's
        moving averages), so i-PI keeps at least half of the device and a step waits at
        most about one batch of its own length (``benchmarks/jobs.py --with-ipi``).
        """
        timing = self.engine.lane_timing()
        ipi, jobs = timing.get("ipi"), timing.get("jobs")
        if ipi is None or jobs is None or jobs.s_per_atom <= 0:
            return budget
        if time.monotonic() - ipi.last_end > _IPI_ACTIVE_S:
            return budget
        share = int(ipi.batch_s / jobs.s_per_atom)
        return max(budget // _SHARED_FLOOR, min(budget, share))

    def _tasks(self, job: Job) -> list[Task]:
        tasks = []
        for index, item in enumerate(job.items):
            params = job.params
            if isinstance(params, RelaxParams):
                body, calc = relax_body(item, params), relax_calculator(item, params)
            else:
                body, calc = md_body(item, params, index), md_calculator(item, params)
            tasks.append(Task(index, len(item), body, calc))
        return tasks

    def _outputs(self, job: Job) -> tuple[str, ...]:
        params = job.params
        stress = params.cell if isinstance(params, RelaxParams) else params.needs_stress
        return ("energy", "forces", "stress") if stress else ("energy", "forces")

    def _run(self, job: Job) -> None:
        max_atoms, max_pairs = self._budget()
        loop = Lockstep(
            lambda structures, slots: self._evaluate(job, structures, slots),
            max_atoms=max_atoms,
            max_pairs=max_pairs,
            cancelled=lambda: job.cancelled or self._closed,
            cap=lambda: self._cap(max_atoms),
        )
        if not job._start(loop):
            return  # cancelled while queued
        done_iterations = done_evaluations = 0
        state: JobState = "done"
        error = None
        try:
            for index, record in loop.run(self._tasks(job)):
                job._add(index, record)
                with self._lock:
                    self._structures[(job.kind, record["status"])] += 1
                    self._iterations += loop.stats.iterations - done_iterations
                    self._evaluations += loop.stats.evaluations - done_evaluations
                done_iterations, done_evaluations = loop.stats.iterations, loop.stats.evaluations
            if job.cancelled or self._closed:
                state = "cancelled"
        except _Stopped:
            state = "cancelled"
        except EngineError as exc:
            state, error = "failed", f"{exc.kind}: {exc}"
        except Exception as exc:
            logger.exception("job %s failed", job.id)
            state, error = "failed", f"{type(exc).__name__}: {exc}"
        finally:
            with self._lock:
                self._iterations += loop.stats.iterations - done_iterations
                self._evaluations += loop.stats.evaluations - done_evaluations
            self.engine.forget_trajectory(job.trajectory)
            with job._cond:
                job._end(state, error)
        logger.info(
            "job %s %s: %d structures finished, %d iterations, %d model calls",
            job.id,
            state,
            len(job._records),
            loop.stats.iterations,
            job.model_calls,
        )

    def _evaluate(self, job: Job, structures: list[Structure], slots: list[int]) -> list[Outcome]:
        """One engine call for the live structures of ``job``; waits, watching for cancel."""
        stopped = lambda: job.cancelled or self._closed  # noqa: E731
        origin = Origin("job", job.id)
        while True:
            if stopped():
                raise _Stopped
            try:
                futures = self.engine.submit(
                    structures,
                    job.model,
                    outputs=self._outputs(job),
                    lane="jobs",
                    trajectory=job.trajectory,
                    slots=slots,
                    origin=origin,
                )
                break
            except Overloaded:  # the engine's queue is full of other work: wait a little
                time.sleep(_POLL_S)
        job.model_calls += 1
        pending = set(futures)
        while pending:
            _, pending = concurrent.futures.wait(pending, _POLL_S)
            if pending and stopped():
                for future in futures:  # withdrawn from the queue: costs no compute
                    future.cancel()
                raise _Stopped
        outcomes: list[Outcome] = []
        for future in futures:
            exc = future.exception()
            if exc is None:
                prediction = future.result()
                outcomes.append(prediction)
                job.model_sha = prediction.extras.get("model_sha", job.model_sha)
            else:
                outcomes.append(exc)
        return outcomes
