"""Capture of what a committee does not know: the records, the writer thread, the reader.

With ``--capture DIR``, every structure a committee evaluates, from any frontend, is
tested against the thresholds on the model thread (:meth:`Capture.consider`: a few
comparisons, a token bucket per source); a structure above them is queued (bounded)
to the writer thread, which encodes it as one extended-XYZ frame and appends it to
``DIR/capture-<start time>-<pid>.xyz`` with one ``os.write`` on an ``O_APPEND``
descriptor. Each record reaches the kernel whole before the next one is encoded, so
a process killed at any moment leaves every earlier record readable and at most
the last one torn; :func:`read_capture` returns the complete records and skips a
torn last one. Records are numbered (``seq``, 1, 2, ...) in the order written, so a
gap would mean a lost record.

The predicted energy and forces are stored as ``mean_energy`` and ``mean_forces``,
not ``energy``/``forces``: ASE would read those as the structure's labels, and these
are the model's guesses, to be replaced by reference calculations.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import os
import queue
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from cace_server.options import option
from cace_server.outputs import Outputs
from cace_server.structures import Prediction, Structure

logger = logging.getLogger("cace_server.capture")

#: What a committee must offer to be captured from.
NEEDED = ("energy_uncertainty", "committee_energies")
#: Outcomes of a structure over the thresholds (the ``outcome`` label of ``captured_total``).
OUTCOMES = ("written", "dropped_rate", "dropped_queue", "dropped_size", "dropped_error")
#: Buckets of the energy uncertainty per atom (eV/atom).
UNCERTAINTY_BUCKETS = (
    1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25, 1.0,
)  # fmt: skip
#: Most sources (i-PI connections, HTTP sessions or clients) with a token bucket kept.
MAX_SOURCES = 4096
FILE_GLOB = "capture-*.xyz"


class CaptureError(ValueError):
    """Capture cannot work as configured (a start-up error naming the setting)."""


@dataclass(frozen=True)
class CaptureSettings:
    """Where and when to capture the structures a committee is unsure of."""

    directory: str | None = option(
        None,
        name="capture",
        show="off",
        help="directory to append the structures a committee is unsure of to (extended XYZ)",
    )
    threshold: float | None = option(
        None,
        name="capture_threshold",
        help="capture a structure whose energy uncertainty per atom exceeds this (eV/atom)",
    )
    force_threshold: float | None = option(
        None,
        name="capture_force_threshold",
        help="capture a structure whose largest atomic force uncertainty exceeds this (eV/A)",
    )
    max_mb: float = option(
        100.0,
        name="capture_max_mb",
        help="capture files in the directory may grow to this many MB; further records "
        "are dropped and counted",
    )
    rate: float = option(
        10.0,
        name="capture_rate",
        help="most records per second from one source (an i-PI connection, an HTTP "
        "session or client); the excess is dropped and counted",
    )
    #: records waiting for the writer thread; beyond this they are dropped and counted.
    queue_size: int = 1024

    @property
    def enabled(self) -> bool:
        return self.directory is not None

    def __post_init__(self) -> None:
        for name, value in (
            ("capture_threshold", self.threshold),
            ("capture_force_threshold", self.force_threshold),
        ):
            if value is not None and not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number of at least 0, got {value}")
        given = self.threshold is not None or self.force_threshold is not None
        if self.directory is not None and not given:
            raise ValueError(
                "capture needs capture_threshold (eV/atom) and/or capture_force_threshold "
                "(eV/A): without one, nothing would be captured"
            )
        if self.directory is None and given:
            raise ValueError(
                "capture_threshold/capture_force_threshold are set but capture (the "
                "directory to write to) is not"
            )
        if self.directory is not None and not self.directory.strip():
            raise ValueError("capture must name a directory")
        if not (math.isfinite(self.max_mb) and self.max_mb > 0):
            raise ValueError(f"capture_max_mb must be a positive number, got {self.max_mb}")
        if not (math.isfinite(self.rate) and self.rate > 0):
            raise ValueError(f"capture_rate must be a positive number, got {self.rate}")
        if self.queue_size < 1:
            raise ValueError(f"queue_size must be at least 1, got {self.queue_size}")


@dataclass(frozen=True)
class Origin:
    """Where an evaluated structure came from (written into its capture record).

    ``source`` is what the rate limit counts by: an i-PI connection, an HTTP session
    or an HTTP client.
    """

    frontend: str  # "ipi", "http", "python"
    source: str
    address: str | None = None  # i-PI address
    step: int | None = None  # i-PI: the connection's step count
    request: str | None = None  # HTTP request id

    def info(self) -> dict[str, str | int]:
        out: dict[str, str | int] = {"origin": self.frontend, "origin_source": self.source}
        if self.address is not None:
            out["origin_address"] = self.address
        if self.step is not None:
            out["origin_step"] = self.step
        if self.request is not None:
            out["origin_request"] = self.request
        return out


PYTHON_ORIGIN = Origin("python", "python")


@dataclass(frozen=True)
class Record:
    """One captured structure, as queued by the model thread for the writer."""

    model: str
    structure: Structure
    mean_energy: float
    member_energies: npt.NDArray[np.float64]
    energy_uncertainty: float
    mean_forces: npt.NDArray[np.float64] | None
    forces_uncertainty: npt.NDArray[np.float64] | None
    origin: Origin
    #: position of the structure in its request (an i-PI batch: the bead)
    index: int
    wall_time: float


@dataclass(frozen=True)
class CaptureSnapshot:
    """Capture's counters: (model, outcome) -> count, and per model the histogram of
    the energy uncertainty per atom as (upper bound, cumulative count) pairs and sum."""

    captured: dict[tuple[str, str], int]
    uncertainty: dict[str, tuple[tuple[tuple[float, int], ...], float]]
    path: str | None


class _Histogram:
    def __init__(self) -> None:
        self.counts = [0] * (len(UNCERTAINTY_BUCKETS) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        i = 0
        while i < len(UNCERTAINTY_BUCKETS) and value > UNCERTAINTY_BUCKETS[i]:
            i += 1
        self.counts[i] += 1
        self.sum += value

    def cumulative(self) -> tuple[tuple[tuple[float, int], ...], float]:
        out, running = [], 0
        for bound, n in zip((*UNCERTAINTY_BUCKETS, math.inf), self.counts, strict=True):
            running += n
            out.append((bound, running))
        return tuple(out), self.sum


@dataclass
class _Bucket:
    tokens: float
    last: float


class Capture:
    """The thresholds, the rate limit and the writer thread of one server.

    :meth:`start` opens the file and starts the writer, :meth:`consider` is called on
    the model thread with every evaluated structure, :meth:`close` writes what is
    queued and stops. Thread-safe: several workers may share one capture.
    """

    def __init__(
        self, settings: CaptureSettings, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if settings.directory is None:
            raise CaptureError("capture is off (no directory)")
        self.settings = settings
        self.directory = Path(settings.directory)
        names = list(NEEDED)
        if settings.force_threshold is not None:
            names.append("forces_uncertainty")
        #: what every batch of a captured model computes besides what its callers asked
        self.outputs = Outputs(names)
        self.path: Path | None = None
        self._clock = clock
        self._max_bytes = int(settings.max_mb * 1_000_000)
        self._queue: queue.Queue[Record | None] = queue.Queue(settings.queue_size)
        self._lock = threading.Lock()
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()
        self._counts: Counter[tuple[str, str]] = Counter()
        self._histograms: dict[str, _Histogram] = {}
        # writer thread's state
        self._fd: int | None = None
        self._bytes = 0  # of every capture file in the directory
        self._seq = 0
        self._stopped: str | None = None  # why the writer writes no more
        self._thread: threading.Thread | None = None

    # -- life cycle ------------------------------------------------------------------------------
    def start(self) -> None:
        """Create the directory and this run's file, start the writer thread."""
        if self._thread is not None:
            return
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            self._bytes = sum(p.stat().st_size for p in self.directory.glob(FILE_GLOB))
            path = self.directory / f"capture-{stamp}-{os.getpid()}.xyz"
            self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        except OSError as exc:
            raise CaptureError(f"capture: cannot write to {self.directory}: {exc}") from exc
        self.path = path
        if self._bytes >= self._max_bytes:
            logger.warning(
                "capture directory %s already holds %.1f MB of capture files "
                "(capture_max_mb %g): nothing will be captured",
                self.directory,
                self._bytes / 1e6,
                self.settings.max_mb,
            )
        self._thread = threading.Thread(target=self._run, name="cace-capture-writer", daemon=True)
        self._thread.start()
        logger.info("capturing uncertain structures to %s", path)

    def close(self, timeout: float | None = None) -> None:
        """Write what is queued, then stop the writer and close the file."""
        thread = self._thread
        if thread is None:
            return
        self._queue.put(None)
        thread.join(timeout)
        if thread.is_alive():
            logger.warning("capture writer still busy after %s s; leaving it behind", timeout)
            return
        self._thread = None
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.fsync(self._fd)
            os.close(self._fd)
            self._fd = None

    def check_model(self, name: str, offered: Iterable[str]) -> None:
        """Refuse (at start-up) a served model capture cannot judge."""
        missing = [n for n in (*NEEDED, *self.outputs) if n not in set(offered)]
        if missing:
            raise CaptureError(
                f"capture is on but model {name!r} is not a committee (it does not compute "
                f"{', '.join(dict.fromkeys(missing))}); serve committees only, or leave "
                "capture off"
            )

    # -- on the model thread ---------------------------------------------------------------------
    def consider(
        self,
        model: str,
        structure: Structure,
        prediction: Prediction,
        origin: Origin | None,
        index: int = 0,
    ) -> bool:
        """Test one evaluated structure; queue it for writing when it is over a threshold.

        Returns whether it was queued. Called before the caller's outputs are trimmed
        (the arrays kept are copied: the caller owns the prediction).
        """
        uncertainty = prediction.energy_uncertainty
        members = prediction.committee_energies
        if uncertainty is None or members is None:
            return False
        per_atom = uncertainty / len(structure)
        spread = prediction.forces_uncertainty
        largest = float(spread.max()) if spread is not None and spread.size else None
        settings = self.settings
        over = (settings.threshold is not None and per_atom > settings.threshold) or (
            settings.force_threshold is not None
            and largest is not None
            and largest > settings.force_threshold
        )
        origin = origin or PYTHON_ORIGIN
        with self._lock:
            histogram = self._histograms.get(model)
            if histogram is None:
                histogram = self._histograms[model] = _Histogram()
            histogram.observe(per_atom)
            if not over:
                return False
            if not self._take_token(origin.source):
                self._counts[model, "dropped_rate"] += 1
                return False
        record = Record(
            model=model,
            structure=structure,
            mean_energy=float(prediction.energy),
            member_energies=np.array(members, dtype=np.float64),
            energy_uncertainty=float(uncertainty),
            mean_forces=None if prediction.forces is None else np.array(prediction.forces),
            forces_uncertainty=None if spread is None else np.array(spread),
            origin=origin,
            index=index,
            wall_time=time.time(),
        )
        try:
            self._queue.put_nowait(record)
        except queue.Full:
            self._count(model, "dropped_queue")
            return False
        return True

    def _take_token(self, source: str) -> bool:
        """One token of ``source``'s bucket (``rate`` per second, a burst of one
        second's worth); the caller holds the lock."""
        now = self._clock()
        rate = self.settings.rate
        capacity = max(1.0, rate)
        bucket = self._buckets.get(source)
        if bucket is None:
            bucket = self._buckets[source] = _Bucket(capacity, now)
            if len(self._buckets) > MAX_SOURCES:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(source)
            bucket.tokens = min(capacity, bucket.tokens + (now - bucket.last) * rate)
            bucket.last = now
        if bucket.tokens < 1.0:
            return False
        bucket.tokens -= 1.0
        return True

    # -- counters --------------------------------------------------------------------------------
    def _count(self, model: str, outcome: str) -> None:
        with self._lock:
            self._counts[model, outcome] += 1

    def snapshot(self) -> CaptureSnapshot:
        with self._lock:
            return CaptureSnapshot(
                dict(self._counts),
                {model: h.cumulative() for model, h in self._histograms.items()},
                None if self.path is None else str(self.path),
            )

    # -- the writer thread -----------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            record = self._queue.get()
            if record is None:
                return
            try:
                self._write(record)
            except Exception:  # a bug here must cost one record, not the capture
                logger.exception("capture: encoding a record failed")
                self._count(record.model, "dropped_error")

    def _write(self, record: Record) -> None:
        if self._stopped is not None:
            self._count(record.model, self._stopped)
            return
        data = encode_record(self._seq + 1, record)
        if self._bytes + len(data) > self._max_bytes:
            logger.warning(
                "capture: %s reached capture_max_mb (%g MB); further records are dropped",
                self.directory,
                self.settings.max_mb,
            )
            self._stopped = "dropped_size"
            self._count(record.model, "dropped_size")
            return
        assert self._fd is not None
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(self._fd, view) :]
        except OSError as exc:
            # A partly written record would make the next one unreadable: stop here.
            logger.error("capture: writing %s failed, capture stops: %s", self.path, exc)
            self._stopped = "dropped_error"
            self._count(record.model, "dropped_error")
            return
        self._seq += 1
        self._bytes += len(data)
        self._count(record.model, "written")


# -- the record format ---------------------------------------------------------------------------
def _text(value: str) -> str:
    """A string value, quoted; characters extended XYZ cannot carry become ``_``."""
    safe = "".join(c if c.isprintable() and c not in '"\\' else "_" for c in value[:256])
    return f'"{safe}"'


def _floats(values: Any) -> str:
    return '"' + " ".join(repr(float(v)) for v in np.asarray(values).reshape(-1)) + '"'


def _utc(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1000):03d}Z"


def encode_record(seq: int, record: Record) -> bytes:
    """One extended-XYZ frame (ASE reads it), ending in a newline."""
    from ase.data import chemical_symbols

    s = record.structure
    n = len(s)
    spread = record.forces_uncertainty
    info: dict[str, str] = {}
    if np.any(s.cell != 0):
        info["Lattice"] = _floats(s.cell)
    properties = "species:S:1:pos:R:3"
    columns = [s.positions]
    if record.mean_forces is not None:
        properties += ":mean_forces:R:3"
        columns.append(record.mean_forces)
    if spread is not None:
        properties += ":forces_uncertainty:R:1"
        columns.append(spread.reshape(n, 1))
    info["Properties"] = properties
    info["seq"] = str(seq)
    info["model"] = _text(record.model)
    info["mean_energy"] = repr(record.mean_energy)
    info["member_energies"] = _floats(record.member_energies)
    info["energy_uncertainty"] = repr(record.energy_uncertainty)
    info["energy_uncertainty_per_atom"] = repr(record.energy_uncertainty / n)
    if spread is not None:
        info["forces_uncertainty_max"] = repr(float(spread.max()))
    for key, value in record.origin.info().items():
        info[key] = str(value) if isinstance(value, int) else _text(value)
    info["origin_index"] = str(record.index)
    info["wall_time"] = _utc(record.wall_time)
    info["pbc"] = '"' + " ".join("T" if p else "F" for p in s.pbc) + '"'
    table = np.hstack(columns)
    symbols = [chemical_symbols[z] for z in s.numbers]
    out = io.StringIO()
    out.write(f"{n}\n")
    out.write(" ".join(f"{k}={v}" for k, v in info.items()) + "\n")
    for symbol, row in zip(symbols, table, strict=True):
        out.write(symbol + " " + " ".join(repr(float(v)) for v in row) + "\n")
    return out.getvalue().encode()


def complete_frames(data: bytes) -> tuple[list[str], int]:
    """The complete extended-XYZ frames of a capture file's bytes, and how many bytes
    at its end belong to a torn (partly written) last record."""
    text = data.decode("utf-8", errors="replace")
    end = text.rfind("\n") + 1
    lines = text[:end].split("\n")[:-1]  # only lines that end in a newline
    frames: list[str] = []
    i = used = 0
    while i < len(lines):
        head = lines[i].strip()
        if not head.isdigit():
            raise ValueError(f"line {i + 1} should be an atom count, got {head[:40]!r}")
        n = int(head)
        if i + n + 2 > len(lines):
            break
        frame = "\n".join(lines[i : i + n + 2]) + "\n"
        frames.append(frame)
        used += len(frame.encode())
        i += n + 2
    return frames, len(data) - used


@dataclass
class CaptureContents:
    """What :func:`read_capture` found: the records, and the bytes of a torn last one."""

    records: list[Any] = field(default_factory=list)  # ase.Atoms
    torn_bytes: int = 0


def read_capture(path: str | Path) -> CaptureContents:
    """The complete records of a capture file as ``ase.Atoms`` (``atoms.info`` holds
    ``seq``, ``model``, ``mean_energy``, ``member_energies``, the uncertainties and
    the origin; ``atoms.arrays`` ``mean_forces`` and ``forces_uncertainty``); a torn
    last record is skipped (``torn_bytes``)."""
    import ase.io

    frames, torn = complete_frames(Path(path).read_bytes())
    if not frames:
        return CaptureContents([], torn)
    records = ase.io.read(io.StringIO("".join(frames)), index=":", format="extxyz")
    return CaptureContents(list(records), torn)
