"""Prometheus metrics: the engine's counters (read at scrape time) and HTTP counters.

Each app has its own registry, so several servers in one process (tests) do not
share or clash. The engine is read through ``engine.snapshot()`` by a custom
collector: nothing is copied between scrapes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from cace_server.capture import CaptureSnapshot
from cace_server.engine import Engine, HistogramSnapshot
from cace_server.jobs import JobsSnapshot

HTTP_LATENCY_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    120.0,
)


def _histogram(name: str, doc: str, snap: HistogramSnapshot) -> HistogramMetricFamily:
    buckets = [("+Inf" if b == float("inf") else repr(float(b)), c) for b, c in snap.buckets]
    return HistogramMetricFamily(name, doc, buckets=buckets, sum_value=snap.sum)


class EngineCollector(Collector):
    """Reads the engine's snapshot (and i-PI connection states) at every scrape."""

    def __init__(self, engine: Engine, ipi_states: Callable[[], dict[str, int]]) -> None:
        self.engine = engine
        self.ipi_states = ipi_states

    def collect(self) -> Iterator[Metric]:
        s = self.engine.snapshot()
        yield GaugeMetricFamily(
            "cace_engine_ready", "1 when models are loaded and warm", value=float(self.engine.ready)
        )
        yield GaugeMetricFamily(
            "cace_engine_healthy",
            "0 once a device failed (the process exits and should be restarted)",
            value=float(self.engine.healthy),
        )
        failed = GaugeMetricFamily(
            "cace_engine_device_failed",
            "1 for a device that failed, with the error that killed it",
            labels=["device", "reason"],
        )
        for device, reason in sorted(s.device_failures.items()):
            failed.add_metric([device, reason], 1.0)
        yield failed
        versions = GaugeMetricFamily(
            "cace_model_version_info",
            "1 for the version each model serves (sha: short SHA-256 of its file(s))",
            labels=["model", "sha"],
        )
        for name, info in sorted(self.engine.models.items()):
            versions.add_metric([name, info.sha or ""], 1.0)
        yield versions
        yield GaugeMetricFamily("cace_engine_uptime_seconds", "engine age", value=s.uptime_s)
        counters = {
            "requests": ("evaluation requests (rejected ones included)", s.requests),
            "structures": ("structures accepted for evaluation", s.structures),
            "atoms": ("atoms accepted for evaluation", s.atoms),
            "batches": ("batches taken from the queue", s.batches),
            "model_calls": ("model forward passes", s.model_calls),
            "oom_splits": ("batches split after running out of memory", s.oom_splits),
            "neighbor_lists_built": ("neighbour lists built", s.neighbor_lists_built),
            "neighbor_lists_reused": (
                "Verlet neighbour lists reused (sessions, i-PI connections)",
                s.neighbor_lists_reused,
            ),
            "step_batches": ("i-PI step batches closed complete", s.step_batches),
            "step_timeouts": ("i-PI step batches closed by the time limit", s.step_timeouts),
        }
        for key, (doc, value) in counters.items():
            yield CounterMetricFamily(f"cace_engine_{key}", doc, value=value)
        yield GaugeMetricFamily(
            "cace_engine_neighbor_list_bytes",
            "bytes the kept Verlet neighbour lists hold (budget: --neighbor-list-bytes)",
            value=s.neighbor_list_bytes,
        )
        yield from _compile_metrics()
        dropped = CounterMetricFamily(
            "cace_engine_dropped",
            "structures dropped unevaluated because their caller left, by reason",
            labels=["reason"],
        )
        for reason, n in sorted(s.dropped.items()):
            dropped.add_metric([reason], n)
        yield dropped
        by_device = CounterMetricFamily(
            "cace_engine_device_model_calls", "model forward passes per device", labels=["device"]
        )
        for device, n in sorted(s.model_calls_by_device.items()):
            by_device.add_metric([device], n)
        yield by_device
        by_lane = CounterMetricFamily(
            "cace_engine_lane_batches", "batches taken from the queue, by lane", labels=["lane"]
        )
        for lane, n in sorted(s.batches_by_lane.items()):
            by_lane.add_metric([lane], n)
        yield by_lane
        behind = CounterMetricFamily(
            "cace_engine_ipi_waited_behind",
            "i-PI step batches by how many batches of other lanes each waited behind "
            "(at most one per worker: the one on the device when the step arrived)",
            labels=["batches"],
        )
        for n, count in sorted(s.ipi_waited_behind.items()):
            behind.add_metric([str(n)], count)
        yield behind
        behind_lane = CounterMetricFamily(
            "cace_engine_ipi_waited_behind_lane",
            "batches that i-PI step batches waited behind, by their lane",
            labels=["lane"],
        )
        for lane, n in sorted(s.ipi_waited_behind_lane.items()):
            behind_lane.add_metric([lane], n)
        yield behind_lane
        errors = CounterMetricFamily(
            "cace_engine_errors", "failed structures or rejected requests", labels=["kind"]
        )
        for kind, n in sorted(s.errors.items()):
            errors.add_metric([kind], n)
        yield errors
        by_model = CounterMetricFamily(
            "cace_engine_model_structures", "structures accepted per model", labels=["model"]
        )
        for model, n in sorted(s.structures_by_model.items()):
            by_model.add_metric([model], n)
        yield by_model
        yield GaugeMetricFamily(
            "cace_engine_queue_depth", "structures waiting", value=s.queue_depth
        )
        yield GaugeMetricFamily(
            "cace_engine_in_flight", "structures in the running batch", value=s.in_flight
        )
        yield _histogram("cace_engine_batch_structures", "structures per batch", s.batch_structures)
        yield _histogram("cace_engine_batch_atoms", "atoms per batch", s.batch_atoms)
        yield _histogram(
            "cace_engine_queue_wait_seconds", "per structure, submission to batch", s.queue_wait_s
        )
        yield _histogram("cace_engine_compute_seconds", "per batch, model time", s.compute_s)
        yield _histogram(
            "cace_engine_latency_seconds", "per request, submission to result", s.latency_s
        )
        states = GaugeMetricFamily(
            "cace_ipi_connections", "i-PI driver connections by state", labels=["state"]
        )
        for state, n in sorted(self.ipi_states().items()):
            states.add_metric([state], n)
        yield states
        capture = self.engine.capture
        if capture is not None:
            yield from _capture_metrics(capture.snapshot())


def _capture_metrics(snap: CaptureSnapshot) -> Iterator[Metric]:
    captured = CounterMetricFamily(
        "cace_captured",
        "structures over the capture threshold, by model and what became of them "
        "(written, or dropped by the rate limit, a full queue, the size cap or an error)",
        labels=["model", "outcome"],
    )
    for (model, outcome), n in sorted(snap.captured.items()):
        captured.add_metric([model, outcome], n)
    yield captured
    uncertainty = HistogramMetricFamily(
        "cace_uncertainty",
        "energy uncertainty per atom (eV/atom) of every structure a committee evaluated "
        "while capture is on",
        labels=["model"],
    )
    for model, (buckets, total) in sorted(snap.uncertainty.items()):
        shown = [("+Inf" if b == float("inf") else repr(float(b)), c) for b, c in buckets]
        uncertainty.add_metric([model], shown, total)
    yield uncertainty


class JobsCollector(Collector):
    """The jobs' counters (``JobManager.snapshot``), read at every scrape."""

    def __init__(self, snapshot: Callable[[], JobsSnapshot]) -> None:
        self.snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        snap = self.snapshot()
        jobs = GaugeMetricFamily("cace_jobs", "jobs held, by state", labels=["state"])
        for state, count in snap.by_state.items():
            jobs.add_metric([state], float(count))
        yield jobs
        yield CounterMetricFamily(
            "cace_job_iterations",
            "lockstep iterations of all jobs (one engine call each); rate() is iterations/s",
            value=float(snap.iterations),
        )
        yield CounterMetricFamily(
            "cace_job_evaluations",
            "structures evaluated for jobs (each structure of each iteration)",
            value=float(snap.evaluations),
        )
        finished = CounterMetricFamily(
            "cace_job_structures",
            "structures of jobs finished, by kind and status",
            labels=["kind", "status"],
        )
        for (kind, status), count in sorted(snap.structures.items()):
            finished.add_metric([kind, status], float(count))
        yield finished
        yield GaugeMetricFamily(
            "cace_job_live_structures",
            "structures in the current iteration of running jobs",
            value=float(snap.live_structures),
        )


class HttpMetrics:
    """HTTP-side counters, in a registry of their own (plus the engine collector)."""

    def __init__(
        self,
        engine: Engine,
        ipi_states: Callable[[], dict[str, int]],
        jobs: Callable[[], JobsSnapshot] | None = None,
    ) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(EngineCollector(engine, ipi_states))
        if jobs is not None:
            self.registry.register(JobsCollector(jobs))
        self.requests = Counter(
            "cace_http_requests",
            "HTTP requests by route, method and status",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "cace_http_request_duration_seconds",
            "HTTP request time, body read to reply sent",
            ["route", "method"],
            buckets=HTTP_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.errors = Counter(
            "cace_http_errors", "HTTP error replies by kind", ["kind"], registry=self.registry
        )
        self.structures = Counter(
            "cace_http_structures",
            "structures evaluated through HTTP",
            ["format"],
            registry=self.registry,
        )
        self.atoms = Counter(
            "cace_http_atoms", "atoms evaluated through HTTP", ["format"], registry=self.registry
        )


def _compile_metrics() -> Iterator[CounterMetricFamily]:
    """What the compiled model calls of this process did (all zero when none is on)."""
    import sys

    module = sys.modules.get("cace_server.model.compiled")
    stats = module.process_stats() if module is not None else None
    counters = {
        "compiles": ("model call shapes compiled", "compiles"),
        "compile_seconds": ("seconds spent compiling model call shapes", "compile_seconds"),
        "compile_fallbacks": (
            "model call shapes whose compile failed (served eagerly from then on)",
            "fallbacks",
        ),
        "compiled_calls": ("model calls run compiled", "calls"),
        "eager_calls": (
            "calls of a compiled model run eagerly (their shape compiling or failed)",
            "eager_calls",
        ),
    }
    for key, (doc, field) in counters.items():
        value = float(getattr(stats, field)) if stats is not None else 0.0
        yield CounterMetricFamily(f"cace_model_{key}", doc, value=value)
