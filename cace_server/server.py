"""One server process: the engine, the i-PI driver connections and the HTTP API.

Start-up order: load and warm the models (the engine), then connect to i-PI and
open the HTTP port. On SIGINT/SIGTERM: stop accepting HTTP connections, let the
requests already received finish (each bounded by the request timeout), give the
connections still open (idle, or a client still sending) ``shutdown_timeout_s``
more, then close them; close the i-PI connections between messages (nothing
half-written), let the engine finish what it accepted, exit 0. A second signal
exits at once (status 128 + the signal number). When a device fails (a dead CUDA
context) the same shutdown runs and :func:`serve` raises DeviceFailed: the command
exits 3, for a restart.

With ``--no-http --no-ipi-reconnect`` the process exists for its i-PI runs: it exits 0
once every connection has closed (i-PI's runs ended, connections i-PI never accepted
included), and exits 4 (:class:`IpiRunRefused`, the reason logged and printed) as
soon as a connection refuses what i-PI sent: i-PI has no error message, and would
otherwise wait for a client that never comes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from cace_server import log_rate
from cace_server.engine import DeviceFailed, Engine, EngineError
from cace_server.http.settings import HttpSettings
from cace_server.ipi import DriverOptions, DriverPool
from cace_server.ipi.engine_evaluator import ipi_evaluator
from cace_server.settings import ServerSettings
from cace_server.validation import check_ipi_geometry

logger = logging.getLogger("cace_server")


class IpiRunRefused(Exception):
    """An i-PI connection refused what i-PI sent and will not reconnect (exit status 4)."""


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        for key, value in getattr(record, "fields", {}).items():
            entry[key] = value
        return json.dumps(entry)


def setup_logging(level: str, as_json: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if as_json:
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    # uvicorn's loggers have handlers of their own: the filter sits on them too
    log_rate.install(handler, ("uvicorn", "uvicorn.error"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def default_model_path() -> Path:
    """The water model that ships with the package."""
    return Path(__file__).parent / "data" / "water.safetensors"


def build_engine(settings: ServerSettings) -> Engine:
    sources: dict[str, Any] = settings.model.named_sources()
    if not sources:
        path = default_model_path()
        if not path.is_file():
            raise ValueError("no --model given and no bundled default model is installed")
        sources = {"default": str(path)}
    return Engine(
        sources,
        default=settings.model.default_model,
        settings=settings.engine,
        capture=settings.capture,
    )


def species_template(
    path: str, inputs: Sequence[str] = ()
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Atomic numbers, in order, from any structure file ASE reads, and the per-atom
    arrays named ``inputs`` (a model's per-atom inputs, e.g. extxyz columns)."""
    import ase.io

    atoms = ase.io.read(path, index=0)
    assert isinstance(atoms, ase.Atoms)
    arrays = {}
    for name in inputs:
        if name not in atoms.arrays:
            raise ValueError(
                f"the i-PI template {path} has no per-atom array {name!r}, which the model "
                f"needs (it has: {', '.join(sorted(atoms.arrays))})"
            )
        arrays[name] = np.asarray(atoms.arrays[name], dtype=np.float64)
    return np.asarray(atoms.get_atomic_numbers(), dtype=np.int64), arrays


def build_driver_pool(settings: ServerSettings, engine: Engine) -> DriverPool:
    """Connections to every --ipi address; more can be added later (HTTP API)."""
    model = settings.ipi.model
    evaluate = ipi_evaluator(engine, model, settings.ipi.bec)
    required = engine.model_info(model).required_inputs
    # i-PI structures get the geometry checks HTTP requests get (close contacts: see
    # check_ipi_geometry).
    cutoff = engine.model_info(model).cutoff if engine.ready else None
    limits = settings.http.geometry  # one min_distance for both frontends
    validate = (
        None
        if cutoff is None
        else partial(
            check_ipi_geometry,
            cutoff=cutoff,
            limits=limits,
            refuse_close_contacts=settings.ipi.refuse_close_contacts,
        )
    )

    per_address = []
    for address, template in settings.ipi.templates_per_address():
        numbers, arrays = species_template(template, required)
        options = DriverOptions(
            numbers=numbers.tolist(),
            arrays=arrays,
            reconnect=settings.ipi.reconnect,
            model_name=model or engine.default_model,
            validate=validate,
        )
        per_address.append((address, options))
    # Without --ipi the pool has no default species: connections added later must
    # bring their own options (the HTTP API does).
    default = per_address[0][1] if per_address else DriverOptions(numbers=())
    pool = DriverPool(evaluate, default)
    for address, options in per_address:
        pool.add(address, settings.ipi.clients, options)
    return pool


async def serve(settings: ServerSettings) -> None:
    engine = build_engine(settings)
    logger.info(
        "loading models %s on %s (%s)",
        engine.model_names,
        settings.engine.device,
        settings.engine.dtype,
    )
    await asyncio.to_thread(engine.start)
    logger.info("engine ready")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal(sig: signal.Signals) -> None:
        if not stop.is_set():
            logger.info("%s: stopping (send it again to exit at once)", sig.name)
            stop.set()
            return
        logger.warning("second %s: exiting now, without finishing", sig.name)
        logging.shutdown()
        os._exit(128 + sig.value)

    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, on_signal, sig)

    if settings.http.allow_model_updates:
        # SIGHUP: every model re-read from its path (a new file there is swapped in).
        reloads: set[asyncio.Task[None]] = set()

        def on_hangup() -> None:
            task = loop.create_task(reload_models(engine))
            reloads.add(task)
            task.add_done_callback(reloads.discard)

        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(signal.SIGHUP, on_hangup)

    # A dead device cannot recover in this process: stop, and exit non-zero (below).
    def on_device_failure(_reason: str) -> None:
        loop.call_soon_threadsafe(stop.set)

    engine.on_fatal(on_device_failure)

    try:
        pool = build_driver_pool(settings, engine)
    except BaseException:  # e.g. a template without the model's per-atom inputs
        await engine.aclose()
        raise
    await pool.start()
    http_server = http_app = None
    http_task = None
    if settings.http.enabled:
        http_server, http_app = build_http_server(settings, engine, pool)
        http_task = asyncio.create_task(http_server.serve(), name="http")
    try:
        waiters: list[asyncio.Task[Any]] = [asyncio.create_task(stop.wait())]
        if http_task is not None:
            waiters.append(http_task)
        elif settings.ipi.addresses and not settings.ipi.reconnect:
            # Nothing else can bring work: stop once every i-PI run has ended, or as
            # soon as one cannot go on (a refusal).
            waiters.append(asyncio.create_task(pool.wait()))
            waiters.append(asyncio.create_task(pool.refusal_event.wait()))
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        for waiter in waiters:
            if waiter is not http_task:  # stop_http shuts the HTTP server down gracefully
                waiter.cancel()
    finally:
        logger.info("shutting down")
        if http_server is not None and http_task is not None:
            await stop_http(http_server, http_app, http_task, settings.http)
        await pool.stop()
        await engine.aclose(drain=True, timeout=30)
        logger.info("stopped")
    if engine.fatal_error is not None:
        raise DeviceFailed(f"the device failed: {engine.fatal_error}")
    if not settings.http.enabled and not settings.ipi.reconnect and pool.refusals:
        connection, reason = pool.refusals[0]
        raise IpiRunRefused(
            f"{connection} refused what i-PI sent: {reason} (i-PI has no error message and "
            "waits for another client; <exit_on_disconnect> true </exit_on_disconnect> in "
            "its <ffsocket> makes it stop too)"
        )


async def reload_models(engine: Engine) -> None:
    """Re-read every model from its path; a refused one keeps serving its old version."""
    for name, info in engine.models.items():
        if info.source is None:
            continue
        try:
            new = await engine.aswap_model(name, info.source)
        except EngineError as exc:
            logger.error("SIGHUP: model %r not reloaded: %s", name, exc)
        else:
            logger.info("SIGHUP: model %r serves version %s", name, new.sha)


async def stop_http(server: Any, app: Any, task: asyncio.Task[Any], settings: HttpSettings) -> None:
    """Stop uvicorn within a bounded time (see the module docstring).

    uvicorn alone waits for every open connection to finish, so one client that
    stalls in the middle of a request body would keep the process alive forever.
    """
    server.should_exit = True  # uvicorn stops listening and closes idle connections
    in_flight = app.state.in_flight
    if not task.done() and not await in_flight.wait_idle(settings.request_timeout_s + 1.0):
        logger.warning(
            "%d HTTP request(s) still running after the request timeout", in_flight.count
        )
    done, _ = await asyncio.wait({task}, timeout=settings.shutdown_timeout_s)
    if not done:
        connections = list(server.server_state.connections)
        logger.warning(
            "closing %d HTTP connection(s) still open %g s after the last request was answered",
            len(connections),
            settings.shutdown_timeout_s,
        )
        server.force_exit = True  # uvicorn's wait loops end; its lifespan shutdown is skipped
        for connection in connections:
            connection.transport.abort()
        for request in list(server.server_state.tasks):
            request.cancel()
        await asyncio.wait({task}, timeout=5.0)
        # what uvicorn's lifespan shutdown would have done
        with contextlib.suppress(Exception):
            await asyncio.wait_for(app.state.shutdown(), 15.0)
    if task.done() and not task.cancelled() and task.exception() is not None:
        logger.error("the HTTP server failed: %s", task.exception())


def build_http_server(settings: ServerSettings, engine: Engine, pool: Any) -> tuple[Any, Any]:
    """The uvicorn server and the FastAPI app it serves."""
    import uvicorn

    from cace_server.http import create_app
    from cace_server.http.timeouts import timed_protocol

    http = settings.http
    app = create_app(engine, pool, http, settings.jobs)
    config = uvicorn.Config(
        app,
        host=http.host,
        port=http.port,
        log_level=settings.log.level,
        access_log=False,
        # "on": the app's shutdown hook stops the i-PI groups created over HTTP.
        lifespan="on",
        http=timed_protocol(http.header_timeout_s, http.body_timeout_s, http.min_body_bytes_per_s),
        timeout_keep_alive=http.keep_alive_timeout_s,  # type: ignore[arg-type]  # any number: call_later
    )
    server = uvicorn.Server(config)
    # Signals are ours (see serve); uvicorn must not install its own handlers.
    server.capture_signals = contextlib.nullcontext  # type: ignore[method-assign,assignment]
    return server, app
