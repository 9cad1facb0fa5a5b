"""Repeated log records are rate-limited: a burst of failures cannot flood the log."""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap

from cace_server.log_rate import PER_SECOND, RateLimitFilter, install


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_burst_passes_a_few_per_second_then_says_how_many_were_suppressed() -> None:
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = Keep()
    clock = Clock()
    rate = RateLimitFilter(clock=clock)
    handler.addFilter(rate)
    logger = logging.getLogger("tests.log_rate.burst")
    logger.addHandler(handler)
    logger.propagate = False
    logger.setLevel(logging.INFO)
    try:
        for i in range(10_000):
            try:
                raise OSError(24, "Too many open files")
            except OSError:
                logger.error("accept() failed on fd %d", i, exc_info=True)
            logger.info("routine line %d", i)  # below WARNING: never limited
        errors = [r for r in records if r.levelno == logging.ERROR]
        assert len(errors) == PER_SECOND and rate.suppressed == 10_000 - PER_SECOND
        assert sum(r.levelno == logging.INFO for r in records) == 10_000
        logger.warning("another kind of message")  # its own budget
        assert records[-1].getMessage() == "another kind of message"
        for fd in range(10):  # numbers formatted in by the caller: still one kind
            logger.warning(f"accept() failed on fd={fd} at 0x{fd:x}7f")
        assert sum("fd=" in r.getMessage() for r in records) == PER_SECOND
        clock.now += 1.0  # the next second: the next one passes and tells the count
        logger.error("accept() failed on fd %d", 7)
        assert records[-1].getMessage() == (
            f"accept() failed on fd 7 [{10_000 - PER_SECOND} similar messages suppressed]"
        )
        logger.error("accept() failed on fd %d", 8)
        assert records[-1].getMessage() == "accept() failed on fd 8"
    finally:
        logger.removeHandler(handler)


_FLOOD = textwrap.dedent(
    """
    import logging, time
    import uvicorn
    from cace_server.server import setup_logging

    setup_logging("info", False)
    # uvicorn configures its own loggers and handlers, as `cace-server serve` does
    uvicorn.Config(lambda scope, receive, send: None, log_level="info")
    for name in ("asyncio", "uvicorn.error"):
        for _ in range(20000):
            try:
                raise OSError(24, "Too many open files")
            except OSError:
                logging.getLogger(name).error("socket.accept() out of system resource",
                                              exc_info=True)
    time.sleep(1.05)
    logging.getLogger("asyncio").error("socket.accept() out of system resource")
    """
)


def test_the_server_log_setup_limits_asyncio_and_uvicorn_floods() -> None:
    """As ``cace-server serve`` sets logging up: 20,000 accept() failures each from
    asyncio (root handler) and uvicorn (its own handler) leave a few tracebacks."""
    out = subprocess.run(
        [sys.executable, "-c", _FLOOD], capture_output=True, text=True, check=True, timeout=120
    )
    log = out.stderr
    # a few per second for each of the two (the loops may take a few seconds)
    assert log.count("Traceback") <= 10 * PER_SECOND, log[:2000]
    assert "similar messages suppressed]" in log.splitlines()[-1], log[-500:]
    assert len(log) < 50_000


def test_install_replaces_its_filter_on_named_loggers() -> None:
    handler = logging.NullHandler()
    first = install(handler, ("tests.log_rate.named",))
    second = install(handler, ("tests.log_rate.named",))
    filters = logging.getLogger("tests.log_rate.named").filters
    assert second in filters and first not in filters
