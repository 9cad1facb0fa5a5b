"""Wait for a request's results or its client's hang-up, whichever comes first.

A client that closes its connection while its structures wait in the engine would
otherwise have them computed for nobody (and delay everyone queued behind them). The
ASGI ``receive`` of a request whose body has been read returns only when the client
disconnects (``http.disconnect``), so a watcher task awaiting it learns of the
hang-up at once; the engine then drops the structures not yet being computed
(:meth:`cace_server.engine.Engine.abandon`, counted in ``cace_engine_dropped``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from concurrent.futures import Future
from typing import Any

from starlette.requests import Request

from cace_server.engine import Engine
from cace_server.structures import Prediction


class ClientGone(Exception):
    """The client hung up before its results were ready."""


async def _disconnected(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def results_or_hang_up(
    request: Request,
    engine: Engine,
    futures: Sequence[Future[Prediction]],
    timeout: float | None,
) -> list[Prediction | BaseException]:
    """The outcome of each future, in order.

    Raises :class:`ClientGone` when the client disconnects first and TimeoutError
    after ``timeout`` seconds; either way the structures not yet computing are dropped.
    """
    waiting = asyncio.ensure_future(
        asyncio.gather(*(asyncio.wrap_future(f) for f in futures), return_exceptions=True)
    )
    gone = asyncio.ensure_future(_disconnected(request))
    both: set[asyncio.Future[Any]] = {waiting, gone}
    try:
        done, _ = await asyncio.wait(both, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        engine.abandon(futures, "cancelled")
        waiting.cancel()
        raise
    finally:
        gone.cancel()
    if waiting in done:
        return list(waiting.result())
    reason = "disconnected" if gone in done else "timeout"
    engine.abandon(futures, reason)
    waiting.cancel()
    if gone in done:
        raise ClientGone("the client closed the connection before its results were ready")
    raise TimeoutError
