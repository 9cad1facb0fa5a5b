"""Keep freed host memory for reuse instead of handing it back to the kernel.

PyTorch's CPU tensors come straight from ``malloc``. glibc serves large requests
(above a threshold that starts at 128 KiB) with fresh ``mmap`` pages and trims the
heap top when it is freed, so every model call faults in its scratch memory anew: a
192-atom call of the reference water model took ~8,600 page faults, ~45 % of its time
on a 2-core VM. Raising the mmap threshold to glibc's maximum (32 MiB) and the trim
threshold keeps that memory mapped from call to call, which is what jemalloc or
tcmalloc give PyTorch CPU deployments. Only glibc is tuned; elsewhere this does
nothing. ``CACE_SERVER_MALLOC_TUNING=0`` turns it off.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import threading

_log = logging.getLogger(__name__)

# mallopt parameters, from glibc's <malloc.h>.
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3

#: glibc's largest mmap threshold on 64-bit systems (DEFAULT_MMAP_THRESHOLD_MAX).
MMAP_THRESHOLD = 32 << 20
#: free memory at the heap top beyond this is returned to the kernel.
TRIM_THRESHOLD = 1 << 30
#: extra heap grown per request, so that growth is in few large steps.
TOP_PAD = 64 << 20

_lock = threading.Lock()
_done: bool | None = None


def tune_host_allocator() -> bool:
    """Apply the settings once per process; True when glibc accepted them."""
    global _done
    with _lock:
        if _done is not None:
            return _done
        _done = False
        if os.environ.get("CACE_SERVER_MALLOC_TUNING", "1").strip().lower() in {"0", "false", "no"}:
            _log.debug("host allocator tuning disabled by CACE_SERVER_MALLOC_TUNING")
            return False
        name = ctypes.util.find_library("c")
        try:
            libc = ctypes.CDLL(name or "libc.so.6")
            mallopt = libc.mallopt
        except (OSError, AttributeError):
            _log.debug("no glibc mallopt; host allocator left as is")
            return False
        mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        mallopt.restype = ctypes.c_int
        ok = all(
            mallopt(param, value) == 1
            for param, value in (
                (_M_MMAP_THRESHOLD, MMAP_THRESHOLD),
                (_M_TRIM_THRESHOLD, TRIM_THRESHOLD),
                (_M_TOP_PAD, TOP_PAD),
            )
        )
        _done = ok
        _log.debug("host allocator tuning %s", "applied" if ok else "refused by mallopt")
        return ok
