"""In-process counters of the engine, read as one consistent :class:`StatsSnapshot`.

Plain numbers behind a lock: the HTTP layer turns a snapshot into Prometheus
metrics (histograms carry cumulative buckets the way Prometheus wants them).
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

LATENCY_BUCKETS_S = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip
BATCH_STRUCTURES_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
BATCH_ATOMS_BUCKETS = (16, 64, 256, 1024, 2048, 4096, 8192, 16384, 65536)


@dataclass(frozen=True)
class HistogramSnapshot:
    """``buckets``: (upper bound, cumulative count) pairs, the last bound is +inf."""

    buckets: tuple[tuple[float, int], ...]
    sum: float
    count: int
    max: float

    @property
    def mean(self) -> float:
        return self.sum / self.count if self.count else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "buckets": [[b, c] for b, c in self.buckets],
            "sum": self.sum,
            "count": self.count,
            "max": self.max,
            "mean": self.mean,
        }


class Histogram:
    """Fixed-bucket histogram; not thread-safe on its own (EngineStats locks)."""

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = tuple(float(b) for b in bounds)
        self.counts = [0] * (len(self.bounds) + 1)
        self.sum = 0.0
        self.count = 0
        self.max = 0.0

    def observe(self, value: float) -> None:
        i = 0
        while i < len(self.bounds) and value > self.bounds[i]:
            i += 1
        self.counts[i] += 1
        self.sum += value
        self.count += 1
        self.max = max(self.max, value)

    def snapshot(self) -> HistogramSnapshot:
        cumulative = []
        running = 0
        for bound, n in zip((*self.bounds, float("inf")), self.counts, strict=True):
            running += n
            cumulative.append((bound, running))
        return HistogramSnapshot(tuple(cumulative), self.sum, self.count, self.max)


@dataclass(frozen=True)
class StatsSnapshot:
    """Everything the engine counted since it was created.

    ``requests``: evaluate calls (rejected ones included); ``structures``/``atoms``:
    accepted for evaluation; ``batches``: batches taken from the queue;
    ``model_calls``: forward passes (more than batches when out-of-memory splits
    happen), ``model_calls_by_device`` the same per device (one worker each);
    ``errors``: failed structures (or rejected requests) by error kind;
    ``device_failures``: device -> why it died (empty while healthy);
    ``neighbor_lists_built``/``_reused``: neighbour lists built, and Verlet lists of
    trajectories (i-PI connections, HTTP sessions) reused; ``step_batches``: batches
    closed because every connection of an i-PI step had submitted
    (``step_timeouts``: closed by the time limit instead). ``batches_by_lane``:
    batches taken from the queue by lane; ``ipi_waited_behind``: i-PI batches by the
    number of other lanes' batches each waited behind (on the device when its first
    structure arrived, or taken while it waited: the lane rule allows at most one per
    worker), ``ipi_waited_behind_lane``: those batches by their lane.
    ``neighbor_list_bytes``: bytes the kept Verlet lists hold now;
    ``dropped``: structures dropped unevaluated because their caller left, by reason
    (``cancelled``: the caller cancelled, ``disconnected``: its HTTP client hung up,
    ``ipi_closed``: its i-PI connection closed).
    ``queue_wait``: per structure, submission to start of its batch (includes the
    neighbour list); ``pending_atoms``: atoms accepted and not yet answered;
    ``compute``: per batch; ``latency``: per request, submission
    to its last result.
    """

    uptime_s: float
    requests: int
    structures: int
    atoms: int
    batches: int
    model_calls: int
    model_calls_by_device: dict[str, int]
    oom_splits: int
    device_failures: dict[str, str]
    neighbor_lists_built: int
    neighbor_lists_reused: int
    neighbor_list_bytes: int
    dropped: dict[str, int]
    step_batches: int
    step_timeouts: int
    batches_by_lane: dict[str, int]
    ipi_waited_behind: dict[int, int]
    ipi_waited_behind_lane: dict[str, int]
    errors: dict[str, int]
    structures_by_model: dict[str, int]
    queue_depth: int
    pending_atoms: int
    in_flight: int
    batch_structures: HistogramSnapshot
    batch_atoms: HistogramSnapshot
    queue_wait_s: HistogramSnapshot
    compute_s: HistogramSnapshot
    latency_s: HistogramSnapshot

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name, value in self.__dict__.items():
            out[name] = value.as_dict() if isinstance(value, HistogramSnapshot) else value
        return out


class EngineStats:
    """Thread-safe counters, updated by callers, the prepare pool and the worker."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._started = time.monotonic()
        self._requests = 0
        self._structures = 0
        self._atoms = 0
        self._batches = 0
        self._model_calls = 0
        self._calls_by_device: Counter[str] = Counter()
        self._oom_splits = 0
        self._device_failures: dict[str, str] = {}
        self._lists_built = 0
        self._lists_reused = 0
        self._list_bytes = 0
        self._dropped: Counter[str] = Counter()
        self._step_batches = 0
        self._step_timeouts = 0
        self._by_lane: Counter[str] = Counter()
        self._ipi_behind: Counter[int] = Counter()
        self._ipi_behind_lane: Counter[str] = Counter()
        self._errors: Counter[str] = Counter()
        self._by_model: Counter[str] = Counter()
        self._queue_depth = 0
        self._pending_atoms = 0
        self._in_flight = 0
        self._batch_structures = Histogram(BATCH_STRUCTURES_BUCKETS)
        self._batch_atoms = Histogram(BATCH_ATOMS_BUCKETS)
        self._queue_wait = Histogram(LATENCY_BUCKETS_S)
        self._compute = Histogram(LATENCY_BUCKETS_S)
        self._latency = Histogram(LATENCY_BUCKETS_S)

    # -- admission / queue ---------------------------------------------------------------
    def request(self) -> None:
        with self._lock:
            self._requests += 1

    def try_admit(
        self,
        model: str,
        n_structures: int,
        n_atoms: int,
        max_queue: int,
        max_atoms: int | None = None,
    ) -> str | None:
        """Count a request in, or say why not: ``max_queue`` structures waiting, or
        ``max_atoms`` atoms accepted and not yet answered (None: no atom bound)."""
        with self._lock:
            if n_structures and self._queue_depth + n_structures > max_queue:
                if n_structures > max_queue:
                    return f"request of {n_structures} structures exceeds max_queue ({max_queue})"
                return f"queue full ({max_queue} structures); retry later"
            if max_atoms is not None and self._pending_atoms + n_atoms > max_atoms:
                if n_atoms > max_atoms:
                    return f"request of {n_atoms} atoms exceeds max_queue_atoms ({max_atoms})"
                return (
                    f"{self._pending_atoms} atoms are waiting or computing (max_queue_atoms "
                    f"{max_atoms}); retry later"
                )
            self._queue_depth += n_structures
            self._pending_atoms += n_atoms
            self._structures += n_structures
            self._atoms += n_atoms
            self._by_model[model] += n_structures
            return None

    def release_atoms(self, n_atoms: int) -> None:
        """Atoms whose structure was answered (or failed, or was cancelled)."""
        with self._lock:
            self._pending_atoms -= n_atoms

    def leave_queue(self, n: int) -> None:
        """Structures that left the queue (taken by the worker, or failed before)."""
        with self._lock:
            self._queue_depth -= n

    # -- outcomes -------------------------------------------------------------------------
    def error(self, kind: str, n: int = 1) -> None:
        with self._lock:
            self._errors[kind] += n

    def batch_started(self, n_structures: int, n_atoms: int, waits: list[float]) -> None:
        with self._lock:
            self._batches += 1
            self._in_flight = n_structures
            self._batch_structures.observe(n_structures)
            self._batch_atoms.observe(n_atoms)
            for w in waits:
                self._queue_wait.observe(w)

    def batch_finished(self, seconds: float) -> None:
        with self._lock:
            self._in_flight = 0
            self._compute.observe(seconds)

    def model_call(self, device: str | None = None) -> None:
        with self._lock:
            self._model_calls += 1
            self._calls_by_device[device or "default"] += 1

    def device_failed(self, device: str | None, reason: str) -> None:
        with self._lock:
            self._device_failures[device or "default"] = reason

    def neighbor_list(self, reused: bool) -> None:
        with self._lock:
            if reused:
                self._lists_reused += 1
            else:
                self._lists_built += 1

    def neighbor_list_bytes(self, n: int) -> None:
        with self._lock:
            self._list_bytes = n

    def dropped(self, reason: str, n: int = 1) -> None:
        """Structures removed unevaluated because their caller left."""
        with self._lock:
            self._dropped[reason] += n

    def step_closed(self, complete: bool) -> None:
        with self._lock:
            if complete:
                self._step_batches += 1
            else:
                self._step_timeouts += 1

    def batch_taken(self, lane: str, behind: dict[str, int]) -> None:
        """A batch taken from ``lane``; an i-PI one with the batches it waited ``behind``."""
        with self._lock:
            self._by_lane[lane] += 1
            if lane == "ipi":
                self._ipi_behind[sum(behind.values())] += 1
                self._ipi_behind_lane.update(behind)

    def oom_split(self) -> None:
        with self._lock:
            self._oom_splits += 1

    def request_done(self, seconds: float) -> None:
        with self._lock:
            self._latency.observe(seconds)

    def snapshot(self) -> StatsSnapshot:
        with self._lock:
            return StatsSnapshot(
                uptime_s=time.monotonic() - self._started,
                requests=self._requests,
                structures=self._structures,
                atoms=self._atoms,
                batches=self._batches,
                model_calls=self._model_calls,
                model_calls_by_device=dict(self._calls_by_device),
                oom_splits=self._oom_splits,
                device_failures=dict(self._device_failures),
                neighbor_lists_built=self._lists_built,
                neighbor_lists_reused=self._lists_reused,
                neighbor_list_bytes=self._list_bytes,
                dropped=dict(self._dropped),
                step_batches=self._step_batches,
                step_timeouts=self._step_timeouts,
                batches_by_lane=dict(self._by_lane),
                ipi_waited_behind=dict(self._ipi_behind),
                ipi_waited_behind_lane=dict(self._ipi_behind_lane),
                errors=dict(self._errors),
                structures_by_model=dict(self._by_model),
                queue_depth=self._queue_depth,
                pending_atoms=self._pending_atoms,
                in_flight=self._in_flight,
                batch_structures=self._batch_structures.snapshot(),
                batch_atoms=self._batch_atoms.snapshot(),
                queue_wait_s=self._queue_wait.snapshot(),
                compute_s=self._compute.snapshot(),
                latency_s=self._latency.snapshot(),
            )
