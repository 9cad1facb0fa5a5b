"""Rate-limit repeated log records, so that a failure in a loop cannot flood the log.

Under file-descriptor exhaustion asyncio logs every failed ``accept()`` with its
traceback: tens of thousands of records a second. :class:`RateLimitFilter` lets at
most ``per_second`` records of one kind through per second, a kind being the logger
and the message template (the text before ``%`` arguments are filled in), and counts
the rest; the next record of that kind let through says how many were suppressed.
Numbers in the template count as one kind (asyncio formats its messages itself, a file
descriptor or an address in each). Only warnings and above are limited.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable

#: records of one kind let through per second
PER_SECOND = 5
#: kinds remembered (the least recently seen are forgotten beyond this)
MAX_KINDS = 1024

_NUMBERS = re.compile(r"0x[0-9a-fA-F]+|\d+")
_KEY_CHARS = 200  # of the template, that tell kinds apart
_CHECKED = "_cace_rate_checked"  # a record met by the filter twice (logger and handler)


class RateLimitFilter(logging.Filter):
    """Let ``per_second`` records of each (logger, message template) through per second."""

    def __init__(
        self,
        per_second: int = PER_SECOND,
        level: int = logging.WARNING,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__()
        self.per_second = per_second
        self.level = level
        self._clock = clock
        self._lock = threading.Lock()
        # kind -> [start of its current second, records passed in it, suppressed since]
        self._kinds: OrderedDict[tuple[str, str], list[float]] = OrderedDict()
        #: records suppressed since the filter was made
        self.suppressed = 0

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < self.level:
            return True
        decided = getattr(record, _CHECKED, None)
        if decided is not None:
            return bool(decided)
        key = (record.name, _NUMBERS.sub("#", str(record.msg)[:_KEY_CHARS]))
        now = self._clock()
        with self._lock:
            state = self._kinds.get(key)
            if state is None:
                state = self._kinds[key] = [now, 0, 0]
                if len(self._kinds) > MAX_KINDS:
                    self._kinds.popitem(last=False)
            self._kinds.move_to_end(key)
            if now - state[0] >= 1.0:
                state[0], state[1] = now, 0
            passed = state[1] < self.per_second
            if passed:
                state[1] += 1
                dropped, state[2] = int(state[2]), 0
            else:
                state[2] += 1
                self.suppressed += 1
        if passed and dropped:
            record.msg = f"{record.msg} [{dropped} similar messages suppressed]"
        setattr(record, _CHECKED, passed)
        return passed


def install(handler: logging.Handler, loggers: tuple[str, ...] = ()) -> RateLimitFilter:
    """One filter on ``handler`` and on the named loggers (whose records may reach
    handlers of their own, as uvicorn's do); returns it."""
    rate = RateLimitFilter()
    handler.addFilter(rate)
    for name in loggers:
        logger = logging.getLogger(name)
        for old in [f for f in logger.filters if isinstance(f, RateLimitFilter)]:
            logger.removeFilter(old)  # set up again (tests, a second serve in one process)
        logger.addFilter(rate)
    return rate
