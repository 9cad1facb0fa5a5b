"""Settings of the serving engine (one frozen dataclass, validated on creation)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

DTYPES = ("float32", "float64")
_DEVICE = re.compile(r"^(cpu|cuda|mps)(:\d+)?$")


@dataclass(frozen=True)
class EngineSettings:
    """How the engine batches and where it runs the models.

    ``device``/``dtype`` of ``None`` keep an already-built model where and as it
    is; model files are then loaded on ``cpu`` in the dtype they were saved in.
    ``device`` may list several devices (``"cuda:0,cuda:1"``): one worker per device,
    each with its own copy of the models, all taking batches from the one queue.
    """

    device: str | None = None
    dtype: str | None = None
    # Upper bounds of one batch. A single structure larger than a bound still runs
    # alone (and fails with OutOfMemory if it really does not fit).
    max_batch_atoms: int = 8192
    max_batch_pairs: int = 600_000
    # After the first request of a batch arrives, wait this long for more to join
    # (ends early when the batch is full). Concurrent i-PI beads arrive within a
    # millisecond or so of each other.
    batch_wait_ms: float = 2.0
    # Structures accepted but not yet evaluated; beyond this, requests get Overloaded.
    max_queue: int = 4096
    # Atoms accepted but not yet answered (queued or computing), over all requests but
    # i-PI steps; beyond this, requests get Overloaded.
    max_queue_atoms: int = 1_000_000
    # Requests of at most this many atoms in total wait in the "small" lane, which
    # shares the device's time with the "bulk" lane of larger ones (i-PI steps go first).
    small_request_atoms: int = 1024
    # Threads computing neighbour lists (outside the worker thread).
    prepare_threads: int = 2
    # Evaluate one small structure per model at start-up.
    warmup: bool = True
    # torch intra-op threads (process-wide); None leaves torch's default.
    torch_threads: int | None = None
    # Long-range options per model name ("" for every model), e.g.
    # {"": {"mode": "smooth"}}: passed to the model's ``configure_long_range``.
    long_range: dict[str, dict[str, str]] = field(default_factory=dict)
    # An i-PI step's batch closes once every connection of its address has
    # submitted; if one does not within this time of the first, or none arrives for
    # a tenth of it (steps.QUIET_FRACTION), it closes anyway.
    # A safety net only (a connection i-PI stopped using costs it once or twice), so
    # generous: i-PI hands 32 beads out one by one, slowly on a loaded machine.
    step_wait_ms: float = 1000.0
    # Verlet skin (Å) of the neighbour lists kept per i-PI connection and HTTP
    # session; 0 builds every list afresh. Lists of the least recently used sessions
    # beyond ``max_neighbor_lists`` are dropped.
    neighbor_skin: float = 0.5
    max_neighbor_lists: int = 1024

    def long_range_for(self, name: str) -> dict[str, str]:
        return {**self.long_range.get("", {}), **self.long_range.get(name, {})}

    @property
    def devices(self) -> list[str | None]:
        """One entry per worker (``[None]``: the model's own device)."""
        if self.device is None:
            return [None]
        return [d.strip() for d in self.device.split(",")]

    def _device_names(self) -> list[str]:
        return [] if self.device is None else [d.strip() for d in self.device.split(",")]

    def __post_init__(self) -> None:
        if not all(_DEVICE.match(d) for d in self._device_names()):
            raise ValueError(
                f"device must be cpu, cuda, cuda:N or mps, or a comma-separated list of "
                f"them, got {self.device!r}"
            )
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        for name in (
            "max_batch_atoms",
            "max_batch_pairs",
            "max_queue",
            "max_queue_atoms",
            "small_request_atoms",
            "prepare_threads",
            "max_neighbor_lists",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("batch_wait_ms", "neighbor_skin"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative, got {getattr(self, name)}")
        # 0 would close every i-PI step before its second bead arrives (a step timeout
        # each time): the grouping it exists for would never happen.
        if not self.step_wait_ms > 0:
            raise ValueError(f"step_wait_ms must be positive, got {self.step_wait_ms}")
        if self.torch_threads is not None and self.torch_threads < 1:
            raise ValueError(f"torch_threads must be at least 1, got {self.torch_threads}")
