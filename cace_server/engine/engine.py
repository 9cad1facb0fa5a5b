"""The serving engine: the one object frontends (i-PI, HTTP) talk to.

Callers submit structures; a small thread pool builds their neighbour lists; the
worker thread (which alone owns the device; one per device with several) runs them
in batches and resolves each structure's future. Concurrent callers, from
coroutines or threads, share batches. See ``worker.py`` for batching and failure
isolation, ``steps.py`` for how an i-PI step becomes one batch, ``trajectories.py`` for
the Verlet lists kept per trajectory.

:meth:`Engine.swap_model` replaces a served model while serving: the new version is
loaded and warmed on every worker beside the old one, checked, then new work gets
it; work already submitted finishes on the version it was submitted for, and an
i-PI step group keeps one version for all of its step (see ``_pin``). The old
version is released once nothing submitted, and no step in progress, refers to it.

A fatal device error (a dead CUDA context) ends the engine: what it holds fails
with :class:`DeviceFailed`, :attr:`Engine.healthy` turns false and the callbacks
given to :meth:`Engine.on_fatal` run (the server exits non-zero from there).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import copy
import dataclasses
import logging
import os
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Literal, overload

from cace_server.capture import Capture, CaptureSettings, Origin
from cace_server.engine.batching import Lane, LaneTiming, PendingQueue, WorkItem, reject
from cace_server.engine.errors import (
    DeviceFailed,
    EngineClosed,
    EngineError,
    EvaluationError,
    InvalidStructure,
    NotReady,
    Overloaded,
    SwapRefused,
    UnknownModel,
    UnsupportedOutput,
)
from cace_server.engine.models import (
    CatalogueEntry,
    ModelInfo,
    ModelSource,
    check_inputs,
    default_name,
    model_sha,
)
from cace_server.engine.settings import EngineSettings
from cace_server.engine.stats import EngineStats, StatsSnapshot
from cace_server.engine.steps import StepGroup
from cace_server.engine.trajectories import SLOTS_PER_KEY, TrajectoryLists
from cace_server.engine.worker import Worker
from cace_server.outputs import CATALOGUE, Outputs, UnknownOutput
from cace_server.structures import Prediction, Structure, StructureError

if TYPE_CHECKING:
    from cace_server.model.io import ModelFilePolicy

logger = logging.getLogger("cace_server.engine")

Outcome = Prediction | BaseException

_CLOSED_BEFORE = "engine closed before the structure was evaluated"


#: step groups kept (one per i-PI address or HTTP step-group name)
MAX_STEP_GROUPS = 1024


class _RequestClock:
    """Records a request's latency when the last of its structures is resolved."""

    def __init__(self, n: int, submitted: float, stats: EngineStats) -> None:
        self._left = n
        self._submitted = submitted
        self._stats = stats
        self._lock = threading.Lock()

    def __call__(self, _future: Future[Prediction]) -> None:
        with self._lock:
            self._left -= 1
            done = self._left == 0
        if done:
            self._stats.request_done(time.monotonic() - self._submitted)


class _PreparedGroup:
    """Collects the prepared chunks of one request so that it is queued in one piece."""

    def __init__(self, n_chunks: int) -> None:
        self._left = n_chunks
        self._items: list[WorkItem] = []
        self._lock = threading.Lock()

    def add(self, items: list[WorkItem]) -> list[WorkItem] | None:
        """Add one chunk; returns the whole request (in order) once the last chunk is in."""
        with self._lock:
            self._items.extend(items)
            self._left -= 1
            if self._left:
                return None
        return sorted(self._items, key=lambda item: item.index)


class Engine:
    """Serves one or more models (one of them the default) to concurrent callers.

    ``models``: one model (a built model or a model file path) or a mapping of
    names to models. A single model file is named after its stem, a single built
    model ``"default"``. Use as a (async) context manager, or call :meth:`start`
    and :meth:`close`. ``capture`` (settings with a directory, or a built
    :class:`~cace_server.capture.Capture`): every evaluated structure is offered to
    it; every served model must then be a committee.
    """

    def __init__(
        self,
        models: ModelSource | Mapping[str, ModelSource],
        *,
        default: str | None = None,
        settings: EngineSettings | None = None,
        capture: Capture | CaptureSettings | None = None,
    ) -> None:
        sources = dict(models) if isinstance(models, Mapping) else {default_name(models): models}
        if not sources:
            raise ValueError("an engine needs at least one model")
        self._names = tuple(sources)
        self._default = default if default is not None else self._names[0]
        if self._default not in sources:
            raise ValueError(f"default model {self._default!r} is not among {sorted(sources)}")
        # Without settings, a built model stays where and as it is (see EngineSettings).
        self.settings = (
            settings
            if settings is not None
            else EngineSettings(device=None, dtype=None, torch_threads=None)
        )
        # read once, here: a missing or short signing key file fails the construction
        self._model_files = self.settings.model_file_policy()
        self.stats = EngineStats()
        if isinstance(capture, CaptureSettings):
            capture = Capture(capture) if capture.enabled else None
        #: where uncertain structures go (None: capture is off)
        self.capture = capture
        self._queue = PendingQueue(self.stats)
        devices = self.settings.devices
        self._workers = [
            Worker(
                # Built models are moved in place: every further device gets a copy.
                sources if k == 0 else _copies(sources),
                self._default,
                self.settings,
                self._queue,
                self.stats,
                device=device,
                label=label,
                on_fatal=self._device_failed,
                capture=capture,
                model_files=self._model_files,
                name="cace-engine-worker" + (f"-{label}" if len(devices) > 1 else ""),
            )
            for k, (device, label) in enumerate(zip(devices, _labels(devices), strict=True))
        ]
        self._entries: dict[str, CatalogueEntry] = {}
        # model versions: the one new work of each model gets, every one still loaded
        # (the catalogue entry its prepare threads use), and items submitted per version
        self._current: dict[str, int] = dict.fromkeys(self._names, 0)
        self._next_version: dict[str, int] = dict.fromkeys(self._names, 1)
        self._version_entries: dict[tuple[str, int], CatalogueEntry] = {}
        self._outstanding: Counter[tuple[str, int]] = Counter()
        # (step group key, model) -> the version its current step was pinned to
        self._group_pins: dict[tuple[str, str], _StepPin] = {}
        self._swap_lock = threading.Lock()
        self._trajectories = TrajectoryLists(
            self.settings.neighbor_skin,
            self.settings.max_neighbor_lists,
            self.stats,
            self.settings.neighbor_list_bytes,
        )
        self._step_groups: dict[str, StepGroup] = {}
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        self._started = False
        self._closing = False
        self._draining = False
        self._fatal: str | None = None
        self._fatal_callbacks: list[Callable[[str], None]] = []

    # -- life cycle ------------------------------------------------------------------------------
    def start(self, *, wait: bool = True, timeout: float | None = None) -> Engine:
        """Start the worker (model loading and warm-up happen there).

        With ``wait``, block until the engine is ready; raises EngineError if
        start-up failed. Without, poll :attr:`ready` or call :meth:`wait_ready`.
        """
        with self._lock:
            if self._closing:
                raise EngineClosed("engine is closed")
            if not self._started:
                if self.capture is not None:
                    self.capture.start()  # a directory it cannot write to fails here
                self._started = True
                self._pool = ThreadPoolExecutor(
                    self.settings.prepare_threads, thread_name_prefix="cace-engine-prepare"
                )
                for worker in self._workers:
                    worker.start()
        if wait:
            self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float | None = None) -> None:
        """Block until start-up finished; raise EngineError if it failed."""
        if not self._started:
            raise NotReady("engine was not started")
        deadline = None if timeout is None else time.monotonic() + timeout
        for worker in self._workers:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not worker.started.wait(left):
                raise TimeoutError(f"engine not ready after {timeout} s")
        error = self.startup_error
        if error is not None:
            self.close()
            raise EngineError(f"engine failed to start: {type(error).__name__}: {error}") from error

    @property
    def ready(self) -> bool:
        """True once models are loaded and warmed up, until close() begins or a device dies."""
        return self._all_ready() and not self._closing and self._fatal is None

    def _all_ready(self) -> bool:
        return all(w.ready.is_set() for w in self._workers)

    @property
    def startup_error(self) -> BaseException | None:
        """Why start-up failed (loading or warm-up), if it did."""
        return next((w.error for w in self._workers if w.error is not None), None)

    @property
    def healthy(self) -> bool:
        """False once a device failed: the process should be restarted."""
        return self._fatal is None

    @property
    def fatal_error(self) -> str | None:
        """Why the engine died (device and error), if a device failed."""
        return self._fatal

    @property
    def devices(self) -> list[str]:
        """The label of each worker: its device, numbered (``cpu#1``) if two share one."""
        return [w.label for w in self._workers]

    def on_fatal(self, callback: Callable[[str], None]) -> None:
        """Call ``callback(reason)`` (from a worker thread) when a device fails."""
        with self._lock:
            self._fatal_callbacks.append(callback)
            fatal = self._fatal
        if fatal is not None:
            callback(fatal)

    @property
    def closed(self) -> bool:
        return self._closing

    def close(self, *, drain: bool = False, timeout: float | None = None) -> None:
        """Stop the engine and its threads.

        Without ``drain``, structures still waiting get :class:`EngineClosed` and
        only the batch being computed completes; with it, everything accepted so
        far is evaluated first. New requests are refused either way. ``timeout``
        bounds the wait for the worker (a stuck model leaves a daemon thread).
        """
        with self._lock:
            if self._closing:
                return
            self._closing = True
            self._draining = drain
        pool = self._pool
        if pool is not None and drain:
            pool.shutdown(wait=True)  # every accepted request reaches the queue
        removed = self._queue.close(drain=drain)
        self.stats.leave_queue(len(removed))
        for item in removed:
            reject(item, EngineClosed(_CLOSED_BEFORE), self.stats)
        if pool is not None and not drain:
            pool.shutdown(wait=True)  # pending neighbour-list tasks see _closing and reject
        deadline = None if timeout is None else time.monotonic() + timeout
        for worker in self._workers:
            if threading.current_thread() is worker.thread:
                continue
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not worker.join(left):
                logger.warning("engine worker still busy after %s s; leaving it behind", timeout)
        if self.capture is not None:
            left = None if deadline is None else max(1.0, deadline - time.monotonic())
            self.capture.close(left)

    def __enter__(self) -> Engine:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    async def __aenter__(self) -> Engine:
        await asyncio.to_thread(self.start)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self, *, drain: bool = False, timeout: float | None = None) -> None:
        """:meth:`close` without blocking the event loop."""
        await asyncio.to_thread(lambda: self.close(drain=drain, timeout=timeout))

    # -- models --------------------------------------------------------------------------------
    @property
    def default_model(self) -> str:
        return self._default

    @property
    def model_names(self) -> tuple[str, ...]:
        return self._names

    @property
    def models(self) -> dict[str, ModelInfo]:
        """Descriptions of the served models (empty until they are loaded)."""
        return {name: entry.info for name, entry in self._catalogue().items()}

    def model_info(self, name: str | None = None) -> ModelInfo:
        key = self._resolve_model(name)
        try:
            return self._catalogue()[key].info
        except KeyError:
            raise NotReady(f"model {key!r} is not loaded yet") from None

    def _catalogue(self) -> dict[str, CatalogueEntry]:
        """Name -> what the engine knows of a served model, once every worker loaded it.

        The description comes from the first worker's copy (all copies are the same
        model); so does the neighbour-list builder the prepare threads use: it builds
        on that copy's device (numpy on the CPU; on a CUDA model's device), and a
        worker on another device moves the lists to its own when it collates a batch.
        """
        if not self._entries and self._all_ready():
            first = self._workers[0]
            with self._lock:
                if not self._entries:
                    for name in self._names:
                        entry = CatalogueEntry(first.infos[name], first.models[name])
                        self._version_entries[(name, 0)] = entry
                    self._entries = {name: self._version_entries[(name, 0)] for name in self._names}
        return self._entries

    def serving(self, name: str | None = None) -> ModelInfo:
        """The model ``name`` means (None: the default), while the engine serves requests.

        Raises NotReady until start-up ends, once close() begins or after a device
        failed, and UnknownModel for a name it does not serve: a frontend's one check.
        """
        if not self.ready:
            raise NotReady("the engine is not ready")
        return self.model_info(name)

    def snapshot(self) -> StatsSnapshot:
        """The engine's counters (see :class:`StatsSnapshot`)."""
        return self.stats.snapshot()

    def lane_timing(self) -> dict[str, LaneTiming]:
        """Recent batches by lane name: when the last ended, mean seconds per batch and
        per atom. A frontend that chooses its own batch sizes (jobs) reads it."""
        return {lane.value: t for lane, t in self._queue.timing().items()}

    # -- evaluation ----------------------------------------------------------------------------
    def submit(
        self,
        structures: Sequence[Structure] | Structure,
        model: str | None = None,
        *,
        outputs: Iterable[str] | None = None,
        lane: Lane | str | None = None,
        trajectory: str | None = None,
        step_group: StepGroup | None = None,
        origin: Origin | None = None,
        slots: Sequence[int] | None = None,
    ) -> list[Future[Prediction]]:
        """Queue structures for evaluation; one future per structure, in order.

        ``outputs`` (an :class:`~cace_server.outputs.Outputs` or names; default: what
        the model computes with the energy pass, see ``Outputs.default_for``) is what
        each prediction holds; an output the model does not offer is refused with
        UnsupportedOutput. A batch computes what any of its structures asked for (Born
        effective charges cost extra backward passes). ``lane``: ``"ipi"`` for i-PI
        steps (they go first), ``"jobs"`` for a server-side job's iteration; otherwise
        the request waits in the ``small`` or ``bulk`` lane by its atom count (see
        ``batching.py``). ``trajectory`` names the caller's structures that evolve
        step by step (an i-PI connection, an HTTP client's X-CACE-Session, a job):
        their neighbour lists are kept and reused, structure i's under the key
        ``slots[i]`` (default: i, its position in the call; a job whose set of live
        structures changes passes each one's index in the job). ``step_group`` (with
        a trajectory) makes the batch of a step close once every member of the group
        has submitted (:meth:`step_group`). ``origin``: where the structures came
        from, for capture records and its per-source rate limit.

        Raises UnknownModel, Overloaded, NotReady, EngineClosed or DeviceFailed for
        the whole request (ValueError for ``slots`` not one per structure); a
        structure that cannot be evaluated gets its error in its future.
        """
        self.stats.request()
        structures = [structures] if isinstance(structures, Structure) else list(structures)
        if slots is not None and len(slots) != len(structures):
            raise ValueError(f"{len(slots)} slots for {len(structures)} structures")
        try:
            name = self._check_accepting(model)
            chosen = self._check_outputs(name, outputs)
        except EngineError as exc:
            self.stats.error(exc.kind)
            raise
        sizes = [len(s) if isinstance(s, Structure) else 0 for s in structures]
        n_atoms = sum(sizes)
        lane_of = self._lane(lane, n_atoms)
        if not structures:
            return []
        version = self._pin(name, step_group, len(structures), trajectory or "")
        items = [
            WorkItem(
                name,
                s,
                i,
                chosen,
                lane_of,
                trajectory=trajectory,
                step_group=step_group,
                origin=origin,
                version=version,
                slot=None if slots is None else int(slots[i]),
            )
            for i, s in enumerate(structures)
        ]
        done = partial(self._item_done, name, version, step_group)
        for item in items:
            item.future.add_done_callback(done)
        # i-PI steps are not held to the atom budget: refusing one ends a simulation.
        atom_limit = None if lane_of is Lane.IPI else self.settings.max_queue_atoms
        refusal = self.stats.try_admit(
            name, len(items), n_atoms, self.settings.max_queue, atom_limit
        )
        if refusal is not None:
            self.stats.error(Overloaded.kind)
            for item in items:  # releases their hold on the version
                item.future.cancel()
            raise Overloaded(refusal)
        clock = _RequestClock(len(items), items[0].submitted, self.stats)
        for item, size in zip(items, sizes, strict=True):
            item.future.add_done_callback(clock)
            item.future.add_done_callback(partial(_release_atoms, self.stats, size))
        assert self._pool is not None
        # Neighbour lists of a large request are built by all prepare threads at once;
        # the request is queued as a whole when its last chunk is done.
        n_chunks = min(len(items), self.settings.prepare_threads)
        chunks = [items[k::n_chunks] for k in range(n_chunks)]
        group = _PreparedGroup(n_chunks)
        for chunk in chunks:
            try:
                self._pool.submit(self._prepare, chunk, group)
            except RuntimeError:  # the pool was shut down by a concurrent close()
                self._fail_closed(chunk)
                complete = group.add([])
                if complete is not None:  # earlier chunks were prepared; never queue them
                    self._fail_closed(complete)
        return [item.future for item in items]

    @overload
    async def evaluate(
        self,
        structures: Sequence[Structure] | Structure,
        model: str | None = ...,
        *,
        outputs: Iterable[str] | None = ...,
        lane: Lane | str | None = ...,
        return_exceptions: Literal[False] = ...,
        trajectory: str | None = ...,
        step_group: StepGroup | None = ...,
        origin: Origin | None = ...,
        slots: Sequence[int] | None = ...,
        dropped_reason: str = ...,
    ) -> list[Prediction]: ...

    @overload
    async def evaluate(
        self,
        structures: Sequence[Structure] | Structure,
        model: str | None = ...,
        *,
        outputs: Iterable[str] | None = ...,
        lane: Lane | str | None = ...,
        return_exceptions: Literal[True],
        trajectory: str | None = ...,
        step_group: StepGroup | None = ...,
        origin: Origin | None = ...,
        slots: Sequence[int] | None = ...,
        dropped_reason: str = ...,
    ) -> list[Outcome]: ...

    async def evaluate(
        self,
        structures: Sequence[Structure] | Structure,
        model: str | None = None,
        *,
        outputs: Iterable[str] | None = None,
        lane: Lane | str | None = None,
        return_exceptions: bool = False,
        trajectory: str | None = None,
        step_group: StepGroup | None = None,
        origin: Origin | None = None,
        slots: Sequence[int] | None = None,
        dropped_reason: str = "cancelled",
    ) -> list[Prediction] | list[Outcome]:
        """Evaluate structures with ``model`` (default: the default model).

        Returns one Prediction per structure, in order. A failing structure raises
        its EngineError (after all structures of the call are done), or with
        ``return_exceptions`` takes its place in the list. ``lane``, ``trajectory``,
        ``step_group``, ``origin`` and ``slots``: see :meth:`submit`. Cancelling the
        call drops its structures not yet computing (:meth:`abandon`, counted as
        ``dropped_reason``).
        """
        futures = self.submit(
            structures,
            model,
            outputs=outputs,
            lane=lane,
            trajectory=trajectory,
            step_group=step_group,
            origin=origin,
            slots=slots,
        )
        if not futures:
            return []
        try:
            outcomes = await asyncio.gather(
                *(asyncio.wrap_future(f) for f in futures), return_exceptions=True
            )
        except asyncio.CancelledError:  # the caller left (a timeout, a closed connection)
            self.abandon(futures, dropped_reason)
            raise
        return _collect(outcomes, return_exceptions)

    @overload
    def evaluate_sync(
        self,
        structures: Sequence[Structure] | Structure,
        model: str | None = ...,
        *,
        outputs: Iterable[str] | None = ...,
        timeout: float | None = ...,
        return_exceptions: Literal[False] = ...,
        trajectory: str | None = ...,
    ) -> list[Prediction]: ...

    @overload
    def evaluate_sync(
        self,
        structures: Sequence[Structure] | Structure,
        model: str | None = ...,
        *,
        outputs: Iterable[str] | None = ...,
        timeout: float | None = ...,
        return_exceptions: Literal[True],
        trajectory: str | None = ...,
    ) -> list[Outcome]: ...

    def evaluate_sync(
        self,
        structures: Sequence[Structure] | Structure,
        model: str | None = None,
        *,
        outputs: Iterable[str] | None = None,
        timeout: float | None = None,
        return_exceptions: bool = False,
        trajectory: str | None = None,
    ) -> list[Prediction] | list[Outcome]:
        """Blocking :meth:`evaluate` for threads (not for the event loop's thread)."""
        if any(threading.current_thread() is w.thread for w in self._workers):
            raise RuntimeError("evaluate_sync on the engine worker thread would deadlock")
        futures = self.submit(structures, model, outputs=outputs, trajectory=trajectory)
        _, not_done = concurrent.futures.wait(futures, timeout)
        if not_done:
            for f in not_done:
                f.cancel()
            raise TimeoutError(
                f"{len(not_done)} of {len(futures)} structures not done in {timeout} s"
            )
        outcomes: list[Outcome] = []
        for f in futures:
            try:
                outcomes.append(f.result())
            except (Exception, concurrent.futures.CancelledError) as exc:
                outcomes.append(exc)
        return _collect(outcomes, return_exceptions)

    def abandon(self, futures: Iterable[Future[Prediction]], reason: str) -> int:
        """Drop structures whose caller left (``reason``: ``disconnected``, ``ipi_closed``,
        ``timeout``...): those not yet computing are cancelled and taken out of the queue
        unevaluated, counted in ``dropped``. Returns how many were dropped."""
        n = sum(1 for f in futures if f.cancel())
        if n:
            self.stats.dropped(reason, n)
            purged = self._queue.purge_cancelled()
            if purged:
                self.stats.leave_queue(purged)
                self.stats.error("cancelled", purged)
        return n

    def step_group(self, key: str, size: int) -> StepGroup:
        """The step group named ``key`` (an i-PI address, or the name HTTP clients of one
        path-integral run share) of ``size`` members; the least recently used of more
        than ``MAX_STEP_GROUPS`` groups are forgotten."""
        with self._lock:
            group = self._step_groups.pop(key, None)
            if group is None:
                timeout_s = self.settings.step_wait_ms / 1000.0
                group = StepGroup(key, size, timeout_s)
                if len(self._step_groups) >= MAX_STEP_GROUPS:
                    # Groups are named by clients (HTTP step-group headers): keep the
                    # most recently used. A dropped group's queued items keep their
                    # object; its next request starts a new one that learns its members.
                    del self._step_groups[next(iter(self._step_groups))]
            self._step_groups[key] = group  # re-inserted: the dict is in order of use
            group.size = size
            return group

    def forget_trajectory(self, trajectory: str) -> None:
        """Drop the neighbour lists (every model and version) and species kept for
        ``trajectory``: a finished job frees its share of ``max_neighbor_lists`` now."""
        self._trajectories.forget(trajectory)

    # -- model versions ------------------------------------------------------------------------
    def swap_model(
        self, name: str | None, source: ModelSource, *, timeout: float | None = None
    ) -> ModelInfo:
        """Serve ``source`` (a model file, committee file or member list) as model ``name``.

        The new version is checked (file checksums), loaded and warmed up on every
        worker beside the serving one, and checked against the live trajectories
        (i-PI connections, HTTP sessions: each of their elements must be known to
        it). Then new work gets it; work already submitted finishes on the old
        version, which is released once nothing refers to it. Its neighbour lists
        are its own (a changed cutoff rebuilds every live trajectory's list).
        A source with the serving version's SHA changes nothing. Blocks (call it
        from a thread); one swap at a time. Raises SwapRefused (the old version
        keeps serving), UnknownModel, NotReady or EngineClosed.
        """
        key = self._check_accepting(name)
        with self._swap_lock:
            self._check_accepting(key)
            current = self.model_info(key)
            sha = _checked_sha(source, self._model_files)
            if sha is not None and sha == current.sha:
                return current
            with self._lock:
                version = self._next_version[key]
                self._next_version[key] += 1
            loading = [
                w.run_task(partial(w.load_version, key, version, source)) for w in self._workers
            ]
            done, not_done = concurrent.futures.wait(loading, timeout)
            errors = [f.exception() for f in done if f.exception() is not None]
            if not_done or errors:
                self._discard(key, version)
                if not_done:
                    raise SwapRefused(f"model {key!r}: loading the new version timed out")
                error = errors[0]
                assert error is not None
                raise SwapRefused(
                    f"model {key!r}: the new version does not load: {type(error).__name__}: {error}"
                ) from error
            info = dataclasses.replace(loading[0].result(), default=key == self._default)
            missing = self._missing_species(key, info.elements)
            if missing:
                self._discard(key, version)
                raise SwapRefused(
                    f"model {key!r}: the new version lacks {missing}", reason="species_in_use"
                )
            entry = CatalogueEntry(info, self._workers[0].version_model(key, version))
            with self._lock:
                old = self._current[key]
                self._version_entries[(key, version)] = entry
                for worker in self._workers:
                    worker.adopt_version(key, version, info)
                self._entries = {**self._entries, key: entry}
                self._current[key] = version
                release = self._unused(key, old)
            if release:
                self._release(key, old)
            logger.info("model %r now serves version %s (was %s)", key, info.sha, current.sha)
            return info

    async def aswap_model(
        self, name: str | None, source: ModelSource, *, timeout: float | None = None
    ) -> ModelInfo:
        """:meth:`swap_model` without blocking the event loop."""
        return await asyncio.to_thread(lambda: self.swap_model(name, source, timeout=timeout))

    def _missing_species(self, name: str, elements: Sequence[int]) -> str:
        """What live trajectories of ``name`` use that ``elements`` lack ("" if nothing)."""
        from ase.data import chemical_symbols

        known = set(elements)
        lacking = []
        for trajectory, species in sorted(self._trajectories.species(name).items()):
            missing = sorted(species - known)
            if missing:
                symbols = ", ".join(chemical_symbols[z] for z in missing)
                lacking.append(f"{symbols} (used by the live trajectory {trajectory})")
        return "; ".join(lacking)

    def _pin(self, name: str, group: StepGroup | None, n: int, member: str) -> int:
        """The version new work of ``name`` gets, counted as outstanding.

        A step group (the connections of an i-PI run) keeps the version of its step
        until the step is over: while any of its items is unresolved, and while a
        member (connection) that has not submitted in this step may still bring a
        bead. A step can run as several batches (a bead arriving after the step's
        time limit), so unresolved items alone do not mark its end. The next step
        begins when a member submits again (i-PI sends no bead of the next step
        before every bead of this one is answered), or when every member has
        submitted and all is resolved.
        """
        released: int | None = None
        with self._lock:
            version = self._current[name]
            if group is not None:
                key = (group.key, name)
                pin = self._group_pins.get(key)
                if pin is not None and (pin.left > 0 or member not in pin.members):
                    version = pin.version
                else:
                    if pin is not None and pin.version != version:
                        released = pin.version
                    pin = self._group_pins[key] = _StepPin(version)
                pin.left += n
                pin.members.add(member)
            self._outstanding[(name, version)] += n
            if released is not None and not self._unused(name, released):
                released = None
        if released is not None:
            self._release(name, released)
        return version

    def _unused(self, name: str, version: int) -> bool:
        """Nothing queued and no step group's current step refers to an old version
        (call under the lock)."""
        if self._outstanding[(name, version)] > 0 or version == self._current[name]:
            return False
        return not any(
            key[1] == name and pin.version == version for key, pin in self._group_pins.items()
        )

    def _item_done(
        self, name: str, version: int, group: StepGroup | None, _future: Future[Prediction]
    ) -> None:
        key = (name, version)
        with self._lock:
            if group is not None:
                pin = self._group_pins.get((group.key, name))
                if pin is not None and pin.version == version:
                    pin.left -= 1
                    if pin.left <= 0 and len(pin.members) >= group.size:
                        del self._group_pins[(group.key, name)]  # every member was served
            self._outstanding[key] -= 1
            if self._outstanding[key] <= 0:
                del self._outstanding[key]
            release = key in self._version_entries and self._unused(name, version)
        if release:
            self._release(name, version)

    def _release(self, name: str, version: int) -> None:
        """Free an old version nothing submitted refers to any more."""
        with self._lock:
            if self._version_entries.pop((name, version), None) is None:
                return
        self._trajectories.drop_version(name, version)
        self._discard(name, version)
        logger.info("model %r: version %d released", name, version)

    def _discard(self, name: str, version: int) -> None:
        for worker in self._workers:
            worker.run_task(partial(worker.drop_version, name, version))

    # -- internals -----------------------------------------------------------------------------
    def _device_failed(self, worker: Worker, reason: str) -> None:
        """A worker's device died: fail everything waiting, refuse new work, tell listeners."""
        with self._lock:
            if self._fatal is not None:
                return
            self._fatal = f"{worker.device or 'model device'}: {reason}"
            callbacks = list(self._fatal_callbacks)
        self.stats.device_failed(worker.label, reason)
        removed = self._queue.close(drain=False)
        self.stats.leave_queue(len(removed))
        for item in removed:
            reject(item, self._device_error(), self.stats)
        for callback in callbacks:
            try:
                callback(self._fatal)
            except Exception:  # a listener's bug must not hide the failure
                logger.exception("device-failure callback failed")

    def _device_error(self) -> DeviceFailed:
        return DeviceFailed(f"the device failed and the server is restarting ({self._fatal})")

    def _resolve_model(self, name: str | None) -> str:
        key = self._default if name is None else name
        if key not in self._names:
            raise UnknownModel(f"no model named {key!r} (served: {', '.join(self._names)})")
        return key

    def _check_outputs(self, name: str, outputs: Iterable[str] | None) -> Outputs:
        offered = self._catalogue()[name].info.outputs
        if outputs is None:
            return Outputs.default_for(offered)
        try:
            chosen = Outputs(outputs)
        except UnknownOutput as exc:
            raise UnsupportedOutput(str(exc)) from None
        missing = chosen.not_in(offered)
        if missing:
            what = "; ".join(f"{n} ({CATALOGUE[n].description})" for n in missing)
            raise UnsupportedOutput(f"model {name!r} does not compute {what}")
        return chosen

    def _lane(self, lane: Lane | str | None, n_atoms: int) -> Lane:
        if lane is not None:
            return Lane(lane)
        return Lane.SMALL if n_atoms <= self.settings.small_request_atoms else Lane.BULK

    def _check_accepting(self, model: str | None) -> str:
        if self._fatal is not None:
            raise self._device_error()
        if self._closing:
            raise EngineClosed("engine is closed")
        if not self._all_ready():
            if self.startup_error is not None:
                raise EngineClosed("engine failed to start")
            raise NotReady("engine is starting (loading and warming up models)")
        return self._resolve_model(model)

    def _prepare(self, items: list[WorkItem], group: _PreparedGroup) -> None:
        """Neighbour lists of (part of) one request, on a prepare thread."""
        self._catalogue()
        entry = self._version_entries[items[0].model_key]
        model, required = entry.model, entry.info.required_inputs
        ready: list[WorkItem] = []
        for item in items:
            if self._closing and not self._draining:
                reject(item, EngineClosed(_CLOSED_BEFORE), self.stats)
            elif item.future.cancelled():
                self.stats.error("cancelled")
            else:
                try:
                    if not isinstance(item.structure, Structure):
                        raise StructureError(
                            f"expected a Structure, got {type(item.structure).__name__}"
                        )
                    check_inputs(item.structure, required)
                    if item.trajectory is None:
                        item.prepared = model.prepare(item.structure)
                        self.stats.neighbor_list(reused=False)
                    else:  # counts built and reused lists itself
                        item.prepared = self._trajectories.prepare(
                            item.model,
                            model,
                            item.trajectory,
                            item.list_slot,
                            item.structure,
                            item.version,
                            most_slots=SLOTS_PER_KEY if item.lane is Lane.IPI else 1,
                        )
                    item.cost = model.batch_cost(item.prepared)
                except StructureError as exc:
                    reject(item, InvalidStructure(str(exc), index=item.index), self.stats)
                except Exception as exc:
                    logger.exception("neighbour list failed")
                    error = EvaluationError(f"neighbour list failed: {exc}", index=item.index)
                    reject(item, error, self.stats)
                else:
                    ready.append(item)
        self.stats.leave_queue(len(items) - len(ready))
        complete = group.add(ready)
        if complete is None:
            return
        try:
            self._queue.put_many(complete)
        except EngineClosed:
            self._fail_closed(complete)

    def _fail_closed(self, items: list[WorkItem]) -> None:
        self.stats.leave_queue(len(items))
        for item in items:
            error = EngineClosed(_CLOSED_BEFORE) if self._fatal is None else self._device_error()
            reject(item, error, self.stats)


@dataclasses.dataclass
class _StepPin:
    """The version of a step group's current step, its unresolved items, and the
    members that have submitted in the step."""

    version: int
    left: int = 0
    members: set[str] = dataclasses.field(default_factory=set)


def _checked_sha(source: ModelSource, policy: ModelFilePolicy) -> str | None:
    """The SHA of a model source whose files' checksums hold and ``policy`` accepts;
    SwapRefused otherwise."""
    if not isinstance(source, (str, os.PathLike)):
        return None
    from cace_server.model.committee import CommitteeError, committee_spec
    from cace_server.model.io import ModelFileError, check_integrity

    try:
        spec = committee_spec(str(source))
        files = [Path(source)] if spec is None else list(spec.members)
        for path in files:
            if not os.path.isfile(path):
                raise ModelFileError(f"model file {path} does not exist")
            check_integrity(path, policy=policy)
        return model_sha(source)
    except (ModelFileError, CommitteeError, OSError, ValueError) as exc:
        raise SwapRefused(f"{exc}") from exc


def _labels(devices: Sequence[str | None]) -> list[str]:
    names = [d or "default" for d in devices]
    return [n if names.count(n) == 1 else f"{n}#{k}" for k, n in enumerate(names)]


def _copies(sources: Mapping[str, ModelSource]) -> dict[str, ModelSource]:
    """Model files as they are; built models deep-copied (a worker moves its own)."""
    return {
        name: source if isinstance(source, (str, os.PathLike)) else copy.deepcopy(source)
        for name, source in sources.items()
    }


def _release_atoms(stats: EngineStats, n_atoms: int, _future: Future[Prediction]) -> None:
    stats.release_atoms(n_atoms)


def _collect(outcomes: Sequence[Outcome], return_exceptions: bool) -> list[Outcome]:
    if not return_exceptions:
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome
    return list(outcomes)
