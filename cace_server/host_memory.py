"""Keep freed host memory for reuse instead of handing it back to the kernel.

PyTorch's CPU tensors come straight from ``malloc``. glibc serves large requests
(above a threshold that starts at 128 KiB) with fresh ``mmap`` pages and trims the
heap top when it is freed, so every model call faults in its scratch memory anew: a
192-atom call of the reference water model took ~8,600 page faults, ~45 % of its time
on a 2-core VM. Raising the mmap threshold to glibc's maximum (32 MiB) and the trim
threshold keeps that memory mapped from call to call, which is what jemalloc or
tcmalloc give PyTorch CPU deployments. Only glibc is tuned; elsewhere this does
nothing. ``CACE_SERVER_MALLOC_TUNING=0`` turns it off.

Memory freed in the middle of the heap, or in the arenas of other threads (the engine
worker, the prepare threads), is not trimmed by that threshold: after one huge call
the process kept gigabytes. :class:`GrowthTrim` hands it back (``malloc_trim``) after
a call that grew the process by more than ``KEEP_BYTES``; calls whose scratch memory
is smaller keep theirs for the next call, as tuned above.
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

#: growth of the process over one call beyond which freed memory is handed back
KEEP_BYTES = 1 << 30

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


def rss_bytes() -> int:
    """Resident memory of this process (0 where /proc is missing)."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def release_freed_memory() -> bool:
    """Return every arena's free pages to the kernel (glibc's ``malloc_trim``)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return False
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return bool(trim(0))


class GrowthTrim:
    """Around each call: ``start()`` before, ``end()`` after its memory is freed; a call
    that grew the resident memory by more than ``keep`` bytes has it handed back."""

    def __init__(self, keep: int | None = None) -> None:
        self.keep = KEEP_BYTES if keep is None else keep
        self._start = 0
        #: calls after which memory was handed back
        self.trims = 0

    def start(self) -> None:
        self._start = rss_bytes()

    def end(self) -> None:
        grown = rss_bytes() - self._start
        if self._start and grown > self.keep:
            release_freed_memory()
            self.trims += 1
            _log.debug("handed back freed memory after a call that grew by %d bytes", grown)
