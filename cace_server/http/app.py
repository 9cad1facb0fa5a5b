"""The FastAPI application, assembled: settings, shared state, handlers, routes, middleware.

``create_app(engine, ipi_pool, settings, jobs)`` builds the app around an engine the
caller owns (started before, closed after); the app owns the i-PI groups created
through it and its jobs (``jobs``: their limits), which it stops on shutdown. The routes live in
:mod:`cace_server.http.routes`, one module per area.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from cace_server import __version__
from cace_server.engine import Engine
from cace_server.http.errors import install_handlers
from cace_server.http.guards import BrowserGuard, Framing
from cace_server.http.ipi import IpiGroups
from cace_server.http.middleware import (
    OPEN_PATHS,
    BearerAuth,
    BodyLimit,
    InFlight,
    Observe,
    SingleHeaders,
)
from cace_server.http.openapi import install_openapi
from cace_server.http.routes import ROUTERS
from cace_server.http.settings import HttpSettings
from cace_server.http.state import HttpState
from cace_server.ipi import DriverPool
from cace_server.jobs import JobManager, JobSettings


def create_app(
    engine: Engine,
    ipi_pool: DriverPool | None = None,
    settings: HttpSettings | None = None,
    jobs: JobSettings | None = None,
) -> FastAPI:
    """The HTTP API around a (started or starting) engine."""
    settings = settings or HttpSettings()
    manager = JobManager(engine, jobs)
    state = HttpState(engine, IpiGroups(engine, settings, ipi_pool), settings, manager)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        state.parser.start()
        yield
        await state.close()

    app = FastAPI(
        title="cace-server",
        version=__version__,
        description="Energies, forces and stresses from a CACE machine-learned potential. "
        "ASE units: Å, eV, eV/Å, stress eV/Å^3 (Voigt xx yy zz yz xz xy). "
        "Errors: {error, message, field}.",
        lifespan=lifespan,
    )
    app.state.api = state
    # For servers that run uvicorn with lifespan="off": await this when shutting down.
    app.state.shutdown = state.close
    install_handlers(app)
    install_openapi(app, state, OPEN_PATHS)
    for router in ROUTERS:
        app.include_router(router)
    # every route by itself, for the Allow header (errors.allowed_methods): FastAPI
    # keeps an included router as one entry of app.router.routes
    app.state.method_routes = (*app.router.routes, *(r for rt in ROUTERS for r in rt.routes))

    app.state.in_flight = InFlight(settings.max_pending_bytes)
    app.add_middleware(
        BodyLimit, max_bytes=settings.max_request_bytes, in_flight=app.state.in_flight
    )
    if settings.token is not None:
        app.add_middleware(BearerAuth, token=settings.token)
    app.add_middleware(BrowserGuard, hosts=settings.host_names)
    app.add_middleware(SingleHeaders)  # before the token is judged
    app.add_middleware(Framing)
    app.add_middleware(Observe, metrics=state.metrics, access_log=settings.access_log)
    return app
