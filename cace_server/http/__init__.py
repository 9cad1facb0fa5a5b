"""The HTTP API: FastAPI app factory, its settings, and a loopback server runner.

``create_app(engine, ipi_pool=None, settings=HttpSettings())`` builds the app; the
caller owns the engine (and a startup i-PI pool, if any).
"""

from cace_server.http.app import create_app
from cace_server.http.errors import ApiError
from cace_server.http.runner import BackgroundServer
from cace_server.http.settings import HttpSettings

__all__ = ["ApiError", "BackgroundServer", "HttpSettings", "create_app"]
