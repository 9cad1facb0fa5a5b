"""The HTTP API: FastAPI app factory, its settings, and a loopback server runner.

``create_app(engine, ipi_pool=None, settings=HttpSettings())`` builds the app; the
caller owns the engine (and a startup i-PI pool, if any).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from cace_server.http.settings import HttpSettings

if TYPE_CHECKING:
    from cace_server.http.app import create_app
    from cace_server.http.errors import ApiError
    from cace_server.http.runner import BackgroundServer

__all__ = ["ApiError", "BackgroundServer", "HttpSettings", "create_app"]

# The app pulls in FastAPI and the engine: imported on first use, so that the
# settings (read by the command line to build its options) come without them.
_LAZY = {
    "create_app": "cace_server.http.app",
    "ApiError": "cace_server.http.errors",
    "BackgroundServer": "cace_server.http.runner",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
