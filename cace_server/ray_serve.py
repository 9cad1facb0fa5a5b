"""cace-server as a Ray Serve application: a fleet of replicas behind Ray's HTTP proxy.

Each replica is one :class:`~cace_server.engine.Engine` on one device (the GPUs Ray
gave it, else the CPU) with our FastAPI app as its ingress, so every route, the
Python client and the ASE calculator work unchanged through the proxy; batching
stays inside the replica. Ray routes, scales on ongoing requests per replica and
replaces a replica whose :meth:`CACEReplica.check_health` raises (the analogue of
the exit status 3 of a dead device). Needs the extra: ``pip install 'cace-server[ray]'``.

``serve run cace_server.ray_serve:app_builder model=water.safetensors num_replicas=2``:
the arguments are our settings (the names of the TOML file, ``CACE_SERVER_*`` and the
flags: ``dtype=float32``, ``max_batch_atoms=4096``, ...) and the replica's (:data:`RAY_ARGS`).
Metrics: each replica copies its Prometheus registry into Ray's metrics
(:class:`RayMetricsBridge`), which Ray exports per node with ``replica``,
``deployment`` and ``application`` labels (prefixed ``ray_``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from typing import Any

import ray
from ray import serve
from ray.serve import metrics as serve_metrics
from ray.serve.config import AutoscalingConfig

from cace_server.engine import Engine
from cace_server.http.metrics import HttpMetrics
from cace_server.server import build_engine
from cace_server.settings import ENV_PREFIX, ServerSettings, load_settings

logger = logging.getLogger("cace_server.ray")

#: Arguments of :func:`app_builder` that shape the deployment, not the engine, with
#: their defaults. ``max_ongoing_requests``: the requests one replica holds at once,
#: the pool its engine batches from (Ray's default of 5 would cap a batch at 5
#: structures); autoscaling adds a replica when replicas hold more than
#: ``target_ongoing_requests`` each on average.
RAY_ARGS: dict[str, str] = {
    "num_replicas": "auto",
    "min_replicas": "1",
    "max_replicas": "4",
    "target_ongoing_requests": "32",
    "max_ongoing_requests": "64",
    "num_cpus": "1",
    "num_gpus": "0",
    "metrics_interval_s": "5",
}


def replica_device(gpu_ids: list[Any]) -> str:
    """The engine's device in a replica Ray gave ``gpu_ids`` (none: the CPU).

    Ray sets ``CUDA_VISIBLE_DEVICES`` to the replica's GPUs, so they are
    ``cuda:0`` .. ``cuda:N-1`` inside it; several GPUs get one engine worker each.
    """
    if not gpu_ids:
        return "cpu"
    return ",".join(f"cuda:{k}" for k in range(len(gpu_ids)))


class RayMetricsBridge:
    """Copies a Prometheus registry into Ray Serve gauges, one per sample name.

    Ray exports what a replica records through :mod:`ray.serve.metrics`, with the
    replica's tags added; a FastAPI ``/metrics`` it does not scrape. Every sample
    (counters, gauges, histogram buckets) is recorded as a gauge of its current
    value, under its own name and labels (a counter's ``_total``, a histogram's
    ``_bucket``/``_sum``/``_count``; not ``_created``): ``rate()`` and
    ``histogram_quantile()`` read them as they read the originals. A replica's
    ``/metrics`` (through the proxy: whichever replica answers) stays as it is.
    """

    def __init__(self, registry: Any) -> None:
        self.registry = registry
        self._gauges: dict[str, serve_metrics.Gauge] = {}

    def sync(self) -> int:
        """Record every sample now; returns how many."""
        n = 0
        for family in self.registry.collect():
            for sample in family.samples:
                if sample.name.endswith("_created"):  # a counter's creation time
                    continue
                gauge = self._gauges.get(sample.name)
                if gauge is None:
                    gauge = serve_metrics.Gauge(
                        sample.name,
                        description=family.documentation,
                        tag_keys=tuple(sorted(sample.labels)),
                    )
                    self._gauges[sample.name] = gauge
                gauge.set(float(sample.value), tags=dict(sample.labels))
                n += 1
        return n


@serve.deployment(name="CACE", ray_actor_options={"num_cpus": 1})
@serve.ingress()
class CACEReplica:
    """One engine and one FastAPI app per replica."""

    # Ray Serve awaits an async constructor (the engine warms up off its event loop).
    async def __init__(  # type: ignore[misc]
        self, settings: ServerSettings, metrics_interval_s: float = 5.0
    ) -> None:
        device = replica_device(ray.get_gpu_ids())
        self.settings = replace(settings, engine=replace(settings.engine, device=device))
        self.engine: Engine = build_engine(self.settings)
        logger.info("replica: loading models %s on %s", self.engine.model_names, device)
        await asyncio.to_thread(self.engine.start)
        self._metrics_interval_s = metrics_interval_s
        self._bridge: RayMetricsBridge | None = None
        self._metrics_task: asyncio.Task[None] | None = None

    def __serve_build_asgi_app__(self) -> Any:
        from cace_server.http import create_app

        app = create_app(self.engine, None, self.settings.http, self.settings.jobs)
        metrics: HttpMetrics = app.state.api.metrics
        self._bridge = RayMetricsBridge(metrics.registry)
        if self._metrics_interval_s > 0:
            self._metrics_task = asyncio.get_running_loop().create_task(self._export_metrics())
        return app

    async def _export_metrics(self) -> None:
        assert self._bridge is not None
        while True:
            try:
                self._bridge.sync()
            except Exception:  # a metric must never take the replica down
                logger.exception("copying the metrics to Ray failed")
            await asyncio.sleep(self._metrics_interval_s)

    def check_health(self) -> None:
        """Ray's health probe: raising makes Ray replace this replica."""
        if not self.engine.healthy:
            raise RuntimeError(f"the device failed: {self.engine.fatal_error}")
        if not self.engine.ready:
            raise RuntimeError(f"the engine is not ready: {self.engine.startup_error}")

    async def __del__(self) -> None:
        if self._metrics_task is not None:
            self._metrics_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._metrics_task
        await self.engine.aclose(drain=True, timeout=30)


def _int(args: Mapping[str, str], key: str) -> int:
    try:
        return int(args[key])
    except ValueError:
        raise ValueError(f"{key} must be an integer, not {args[key]!r}") from None


def _float(args: Mapping[str, str], key: str) -> float:
    try:
        return float(args[key])
    except ValueError:
        raise ValueError(f"{key} must be a number, not {args[key]!r}") from None


def deployment_options(args: Mapping[str, str]) -> dict[str, Any]:
    """``Deployment.options`` from the :data:`RAY_ARGS` (all given, as strings)."""
    num_cpus, num_gpus = _float(args, "num_cpus"), _float(args, "num_gpus")
    options: dict[str, Any] = {
        "max_ongoing_requests": _int(args, "max_ongoing_requests"),
        "ray_actor_options": {"num_cpus": num_cpus, "num_gpus": num_gpus},
    }
    if args["num_replicas"] == "auto":
        options["autoscaling_config"] = AutoscalingConfig(
            min_replicas=_int(args, "min_replicas"),
            max_replicas=_int(args, "max_replicas"),
            target_ongoing_requests=_float(args, "target_ongoing_requests"),
        )
    else:
        options["num_replicas"] = _int(args, "num_replicas")
    return options


def replica_settings(
    args: Mapping[str, Any], num_cpus: float, environ: Mapping[str, str] | None = None
) -> ServerSettings:
    """Our settings from the builder's other arguments (over ``CACE_SERVER_*``).

    torch threads default to the replica's CPUs; the device is the replica's, so
    ``device`` is refused, as are startup i-PI connections (i-PI spreads its beads
    over nodes itself: ``--ipi inet:HOST:PORT``).
    """
    env = os.environ if environ is None else environ
    overrides = dict(args)
    if "device" in overrides:
        raise ValueError(
            "device is chosen by Ray: give num_gpus=N (each replica then runs on its N GPUs)"
        )
    if "torch_threads" not in overrides and ENV_PREFIX + "TORCH_THREADS" not in env:
        overrides["torch_threads"] = str(max(1, int(num_cpus)))
    settings = load_settings(environ=env, overrides=overrides)
    if settings.ipi.addresses:
        raise ValueError(
            "i-PI connections are not made from Ray replicas: run cace-server serve "
            "--ipi inet:HOST:PORT on each node instead"
        )
    return settings


def app_builder(args: Mapping[str, Any] | None = None) -> Any:
    """The application for ``serve run``/``serve deploy`` (``import_path``).

    ``args``: :data:`RAY_ARGS` and any server setting by its name (``model``,
    ``dtype``, ``torch_threads``, ``max_batch_atoms``, ...), as the command line's
    strings or a config file's values.
    """
    given: dict[str, Any] = {str(k): v for k, v in (args or {}).items()}
    ray_args = {key: str(given.pop(key, default)) for key, default in RAY_ARGS.items()}
    options = deployment_options(ray_args)
    settings = replica_settings(given, options["ray_actor_options"]["num_cpus"])
    return CACEReplica.options(**options).bind(  # type: ignore[attr-defined]
        settings, _float(ray_args, "metrics_interval_s")
    )


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class LocalFleet:
    """A Ray cluster of several nodes on this machine serving the app (see :func:`local_fleet`)."""

    #: Ray's HTTP proxy (the app's routes under it)
    url: str
    #: each node's Prometheus endpoint (Ray's metrics export)
    metrics_urls: list[str]
    cluster: Any

    def per_replica(self, name: str) -> dict[str, float]:
        """Replica -> the sum of our metric ``name``'s samples, as Ray exports them now."""
        import httpx
        from prometheus_client.parser import text_string_to_metric_families

        out: dict[str, float] = {}
        for url in self.metrics_urls:
            text = httpx.get(url, timeout=10.0).text
            for family in text_string_to_metric_families(text):
                for sample in family.samples:
                    if sample.name == f"ray_{name}" and "replica" in sample.labels:
                        replica = sample.labels["replica"]
                        out[replica] = out.get(replica, 0.0) + sample.value
        return out


@contextlib.contextmanager
def local_fleet(
    args: Mapping[str, Any] | None = None,
    *,
    nodes: int = 2,
    cpus_per_node: float = 1,
    name: str = "cace",
    metrics_report_ms: int = 1000,
) -> Iterator[LocalFleet]:
    """Start ``nodes`` Ray nodes here (CPU only), run :func:`app_builder` (``args``) on
    them behind a proxy on 127.0.0.1, and shut everything down on leaving.

    For tests, benchmarks and trying the app on one machine. The proxy's routing
    to replicas on its own node first is switched off (it would keep a replica on
    another node idle behind a single proxy), for the nodes started here only.
    """
    from ray.cluster_utils import Cluster

    env = {"RAY_SERVE_PROXY_PREFER_LOCAL_NODE_ROUTING": "0"}
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)  # the nodes' processes inherit it
    ports = [_free_port() for _ in range(nodes)]
    cluster = Cluster()
    try:
        for k, port in enumerate(ports):
            node: dict[str, Any] = {
                "num_cpus": cpus_per_node,
                "metrics_export_port": port,
                "include_dashboard": False,
            }
            if k == 0:
                node["_system_config"] = {"metrics_report_interval_ms": metrics_report_ms}
            cluster.add_node(**node)
        ray.init(address=cluster.address, log_to_driver=False)
        http_port = _free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": http_port})
        serve.run(app_builder(args), name=name, route_prefix="/")
        yield LocalFleet(
            f"http://127.0.0.1:{http_port}",
            [f"http://127.0.0.1:{port}/metrics" for port in ports],
            cluster,
        )
    finally:
        with contextlib.suppress(Exception):
            serve.shutdown()
        ray.shutdown()
        cluster.shutdown()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
