"""Large JSON request bodies, parsed in a worker process and handed back as msgpack.

``json.loads`` and building arrays from nested lists hold the GIL from start to end:
for a body of hundreds of megabytes that is seconds, and on a thread of the server
every other client (the event loop) waits that long. :class:`ProcessParser` parses
such a body in a worker process instead, packs every float array (rectangular,
1-D or 2-D, at least ``MIN_PACKED`` numbers) into the packed form of the msgpack
API (``{"shape", "dtype": "<f8", "data"}``) and returns the whole body as msgpack,
which the server unpacks in a fraction of the time (an array is one copy). The
request then goes through the same validation as any msgpack request; nothing but
the parse moves.

This module imports neither torch nor the server: the worker process stays small.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import os
import select
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import msgpack
import numpy as np

#: arrays with fewer numbers stay lists (cells, pbc flags, small structures).
MIN_PACKED = 256

# Python >= 3.10.7 limits int(str) to 4,300 digits by default (0: no limit).
_int_max_str_digits = getattr(sys, "get_int_max_str_digits", lambda: 0)


class OversizedInt:
    """A JSON integer literal longer than Python converts (``sys.get_int_max_str_digits``).

    Kept as a marker instead of failing the whole parse, so that the field holding
    it is named by the validation that refuses it (no field takes such a number).
    """

    __slots__ = ("digits",)

    def __init__(self, digits: int) -> None:
        self.digits = digits

    def __repr__(self) -> str:
        return f"<an integer of {self.digits} digits>"


def parse_int(literal: str) -> int | OversizedInt:
    """``json.loads(..., parse_int=parse_int)``: no ValueError for very long literals."""
    limit = _int_max_str_digits()
    if limit and len(literal.lstrip("-")) > limit:
        return OversizedInt(len(literal))
    return int(literal)


def load_json(body: bytes) -> tuple[Any, str | None]:
    """(value, None), or (None, why the body is not JSON)."""
    try:
        return json.loads(body, parse_int=parse_int), None
    except json.JSONDecodeError as exc:
        return None, f"{exc.msg} at char {exc.pos}"
    except (UnicodeDecodeError, RecursionError) as exc:
        return None, str(exc)


def _packable(value: Any) -> Any:
    """``value`` with float arrays packed and what msgpack cannot hold made a string
    (an integer beyond 64 bits: no field accepts it, and the validation of the field
    says so)."""
    if isinstance(value, dict):
        return {k: _packable(v) for k, v in value.items()}
    if isinstance(value, list):
        if len(value) >= 8 and not isinstance(value[0], (dict, str)):
            try:
                arr = np.asarray(value)
            except (ValueError, TypeError, OverflowError):
                arr = None
            if arr is not None and arr.ndim in (1, 2):
                if arr.dtype.kind == "f" and arr.size >= MIN_PACKED:
                    packed = np.ascontiguousarray(arr, dtype="<f8")
                    return {"shape": list(packed.shape), "dtype": "<f8", "data": packed.tobytes()}
                if arr.dtype.kind in "biuf":  # plain numbers msgpack holds as they are
                    return value
        return [_packable(v) for v in value]
    if isinstance(value, OversizedInt):
        return repr(value)
    if isinstance(value, int) and not isinstance(value, bool) and not -(2**63) <= value < 2**64:
        return f"<an integer of {len(str(abs(value)))} digits>"
    return value


def json_to_msgpack(body: bytes) -> tuple[bytes | None, str | None]:
    """In the worker: (msgpack bytes, None), or (None, why the body is not JSON)."""
    value, error = load_json(body)
    if error is not None:
        return None, error
    try:
        return msgpack.packb(_packable(value), use_bin_type=True), None
    except (RecursionError, ValueError) as exc:  # nesting beyond msgpack's limit
        return None, f"cannot be handled: {exc}"


def _exit_with(server_pid: int) -> None:
    """Worker initializer: end this worker when the server process is gone.

    A pool worker waits for tasks on a pipe it also holds the other end of, so it
    never sees the server die; a server killed (SIGKILL, a second signal) would leave
    the worker, and the fork server it keeps alive, behind for good.
    """

    def watch() -> None:
        try:
            fd = os.pidfd_open(server_pid)  # Linux: readable once the process has exited
        except ProcessLookupError:
            os._exit(0)
        except (AttributeError, OSError):  # pragma: no cover - no pidfd: poll instead
            while True:
                try:
                    os.kill(server_pid, 0)
                except ProcessLookupError:
                    os._exit(0)
                time.sleep(1.0)
        select.select([fd], [], [])
        os._exit(0)

    threading.Thread(target=watch, name="server-watch", daemon=True).start()


class ProcessParser:
    """One worker process (started on first use) that parses JSON bodies."""

    def __init__(self) -> None:
        self._pool: ProcessPoolExecutor | None = None

    def _executor(self) -> ProcessPoolExecutor:
        if self._pool is None:
            # forkserver: workers fork from a clean process, never from this one
            # (threads, torch); spawn where there is no forkserver.
            context: multiprocessing.context.BaseContext
            if "forkserver" in multiprocessing.get_all_start_methods():
                forkserver = multiprocessing.get_context("forkserver")
                # imported once in the fork server, not again by every worker
                forkserver.set_forkserver_preload([__name__])
                context = forkserver
            else:  # pragma: no cover - platforms without fork
                context = multiprocessing.get_context("spawn")
            options: dict[str, Any] = {
                "max_workers": 1,
                "mp_context": context,
                "initializer": _exit_with,
                "initargs": (os.getpid(),),
            }
            if sys.version_info >= (3, 11):
                # a fresh worker per body: a parse of hundreds of MB leaves its
                # memory behind in the process that did it
                options["max_tasks_per_child"] = 1
            self._pool = ProcessPoolExecutor(**options)
        return self._pool

    def start(self) -> None:
        """Start the fork server now (in the background), not with the first large body."""
        self._executor().submit(load_json, b"0")

    async def json_to_msgpack(self, body: bytes) -> tuple[bytes | None, str | None]:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor(), json_to_msgpack, body)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
