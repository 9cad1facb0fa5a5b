"""Run an ASGI app under uvicorn on a background thread (tests, benchmarks, notebooks).

The thread has its own event loop; :meth:`BackgroundServer.stop` asks uvicorn to
shut down (lifespan shutdown included) and joins the thread, bounded.
"""

from __future__ import annotations

import threading
import time
from types import TracebackType
from typing import Any

import uvicorn


class BackgroundServer:
    """``with BackgroundServer(app) as server: httpx.get(server.url + "/healthz")``.

    ``port=0`` takes a free port; binds 127.0.0.1 unless told otherwise.
    """

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0, **options: Any) -> None:
        # the event loop and HTTP parser ``cace-server serve`` uses, whatever else is
        # installed (ray[serve] brings uvloop and httptools)
        options.setdefault("loop", "asyncio")
        options.setdefault("http", "h11")
        options.setdefault("log_level", "warning")
        options.setdefault("access_log", False)
        options.setdefault("lifespan", "on")
        self.config = uvicorn.Config(app, host=host, port=port, **options)
        self.server = uvicorn.Server(self.config)
        self._thread: threading.Thread | None = None

    def start(self, timeout: float = 30.0) -> BackgroundServer:
        self._thread = threading.Thread(
            target=self.server.run, name="cace-http-server", daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self._thread.is_alive():
                raise RuntimeError("the HTTP server thread exited during start-up")
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"the HTTP server did not start in {timeout} s")
            time.sleep(0.01)
        return self

    @property
    def port(self) -> int:
        for server in self.server.servers:
            for sock in server.sockets:
                return int(sock.getsockname()[1])
        raise RuntimeError("the server is not listening")

    @property
    def url(self) -> str:
        host = self.config.host
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{self.port}"

    def stop(self, timeout: float = 30.0) -> None:
        self.server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():  # connections did not close: drop them
                self.server.force_exit = True
                self._thread.join(5.0)
            self._thread = None

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
