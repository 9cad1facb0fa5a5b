"""Settings of the serving engine (one frozen dataclass, validated on creation)."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from cace_server.options import option

if TYPE_CHECKING:
    from cace_server.model.io import ModelFilePolicy

DTYPES = ("float32", "float64")
_DEVICE = re.compile(r"^(cpu|cuda|mps)(:\d+)?$")
# The choices of cace_server.model.longrange (not imported here: it needs torch).
LONG_RANGE_MODES = ("parity", "smooth")
COMPILE_MODES = ("off", "on", "reduce-overhead")
LONG_RANGE_METHODS = ("auto", "direct", "mesh")


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask: containers, taskset)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def default_torch_threads(device: str = "cpu") -> int:
    """torch intra-op threads when ``--torch-threads`` is not given: half the cores.

    Measured with ``benchmarks/http.py --contention``: torch's own default (one
    thread per core, OpenMP spinning at its barriers) collapses when anything else
    wants a core, and the server itself always does: the event loop, the
    neighbour-list threads, other processes. Half the cores leaves room for them (on
    2 cores: 1 thread). The same on GPUs, where torch's CPU threads do only host-side
    bookkeeping and the neighbour lists run on the prepare threads.
    """
    del device  # the same rule everywhere, see above
    return max(1, available_cores() // 2)


def per_model(values: tuple[str, ...], setting: str) -> dict[str, str]:
    """("VALUE", "NAME=VALUE", ...) -> {"": VALUE, NAME: VALUE}."""
    out: dict[str, str] = {}
    for item in values:
        name, _, value = item.rpartition("=")
        if name in out:
            raise ValueError(f"{setting} given twice for {name or 'all models'!r}")
        out[name] = value.strip()
    return out


@dataclass(frozen=True)
class EngineSettings:
    """How the engine batches and where it runs the models.

    The defaults are the server's: models run on ``cpu`` in ``float64``, with half
    the cores as torch threads. ``device``/``dtype``/``torch_threads`` of ``None``
    keep an already-built model where and as it is and torch's threads as they are
    (``Engine(model)`` without settings does that); model files are then loaded on
    ``cpu`` in the dtype they were saved in. ``device`` may list several devices
    (``"cuda:0,cuda:1"``): one worker per device, each with its own copy of the
    models, all taking batches from the one queue.
    """

    device: str | None = option(
        "cpu", help="cpu, cuda, cuda:N, or a list cuda:0,cuda:1 (one worker each)"
    )
    dtype: str | None = option("float64", help="float32 or float64")
    # Long-range (Ewald) options: "VALUE" for every model or "NAME=VALUE" for one;
    # passed to the model's ``configure_long_range``. Empty: the model's own.
    long_range_mode: tuple[str, ...] = option(
        (),
        show="parity",
        help="Ewald k-space sum: parity (the original's) or smooth (in the cell, for NPT); "
        "MODE for all models or NAME=MODE",
    )
    long_range_method: tuple[str, ...] = option(
        (), show="auto", help="Ewald back end: auto, direct or mesh; METHOD or NAME=METHOD"
    )
    # Compiled model calls (model/compiled.py): "MODE" for every model or "NAME=MODE".
    compile: tuple[str, ...] = option(
        (),
        show="off",
        help="compile the model call (energy, forces and stress as one Inductor graph): "
        "off, on, or reduce-overhead (with CUDA graphs on a GPU); MODE or NAME=MODE",
    )
    compile_warmup: tuple[str, ...] = option(
        (),
        show="none",
        help="structure file (any format ASE reads) whose shape is compiled during warm-up, "
        "before /readyz turns ready; PATH:COUNT compiles COUNT copies as one batch (the "
        "beads of an i-PI step); repeatable",
    )
    compile_cache_dir: str | None = option(
        None,
        show="Inductor's (/tmp/torchinductor_USER)",
        help="directory of Inductor's on-disk cache of compiled graphs (keep it on a volume: "
        "a restart then loads instead of compiling)",
    )
    # Upper bounds of one batch. A single structure larger than a bound still runs
    # alone (and fails with OutOfMemory if it really does not fit).
    max_batch_atoms: int = option(8192, help="most atoms in one engine batch")
    max_batch_pairs: int = option(600_000, help="most neighbour pairs in one engine batch")
    # After the first request of a batch arrives, wait this long for more to join
    # (ends early when the batch is full). Concurrent i-PI beads arrive within a
    # millisecond or so of each other.
    batch_wait_ms: float = option(2.0, help="wait this long for a batch to fill")
    # Structures accepted but not yet evaluated; beyond this, requests get Overloaded.
    max_queue: int = option(4096, help="most structures waiting in the engine")
    # Atoms accepted but not yet answered (queued or computing), over all requests but
    # i-PI steps; beyond this, requests get Overloaded.
    max_queue_atoms: int = option(
        1_000_000, help="most atoms accepted and not yet answered (i-PI steps exempt)"
    )
    # Requests of at most this many atoms in total wait in the "small" lane, which
    # shares the device's time with the "bulk" lane of larger ones and the "jobs" lane
    # (i-PI steps go first).
    small_request_atoms: int = option(
        1024, help="requests up to this many atoms share device time with larger ones"
    )
    # An i-PI step's batch closes once every connection of its address has
    # submitted; if one does not within this time of the first, or none arrives for
    # a tenth of it (steps.QUIET_FRACTION), it closes anyway.
    # A safety net only (a connection i-PI stopped using costs it once or twice), so
    # generous: i-PI hands 32 beads out one by one, slowly on a loaded machine.
    step_wait_ms: float = option(
        1000.0,
        help="an i-PI step's batch waits this long for every connection of its address "
        "(or a tenth of it after the last bead), then runs with the beads it has",
    )
    # Verlet skin (Å) of the neighbour lists kept per trajectory (an i-PI connection,
    # an HTTP X-CACE-Session); 0 builds every list afresh. Lists of the least recently
    # used trajectories beyond ``max_neighbor_lists`` are dropped.
    neighbor_skin: float = option(
        0.5,
        help="Verlet skin (A) of the neighbour lists reused per i-PI connection and HTTP "
        "session; 0 builds every list afresh",
    )
    max_neighbor_lists: int = option(
        1024, help="most Verlet neighbour lists kept; the least recently used go first"
    )
    # Bytes of the kept lists (pairs and reference structures), over all trajectories.
    neighbor_list_bytes: int = option(
        512 * 1024 * 1024,
        help="most bytes the kept Verlet neighbour lists hold; the least recently used go first",
    )
    # torch intra-op threads (process-wide); None leaves torch's default.
    torch_threads: int | None = option(
        default_factory=default_torch_threads,
        # a user's 0 (as before the sections) asks for the default too
        parse=lambda threads: threads or default_torch_threads(),
        show="half the cores",
        help="torch intra-op threads",
    )
    # Model files: format version 1 (config not covered by a checksum) is refused
    # unless allowed; with a key file, every file must carry a signature made with it.
    allow_legacy_model_files: bool = option(
        False,
        help="load model files of format version 1, whose config no checksum covers "
        "(re-save them instead: cace-server resave FILE)",
    )
    model_signing_key_file: str | None = option(
        None,
        show="none",
        help="file holding the HMAC-SHA256 key every model file must be signed with "
        "(cace-server resave FILE --signing-key-file KEY)",
    )
    # Threads computing neighbour lists (outside the worker thread).
    prepare_threads: int = 2
    # Evaluate one small structure per model at start-up.
    warmup: bool = True

    def model_file_policy(self) -> ModelFilePolicy:
        """What model files must show to be loaded (reads the signing key file)."""
        from cace_server.model.io import ModelFilePolicy  # torch-heavy; import where used

        return ModelFilePolicy.from_settings(
            self.allow_legacy_model_files, self.model_signing_key_file
        )

    def compile_for(self, name: str) -> str | None:
        """The compile mode of model ``name`` (``default`` or ``reduce-overhead``), or None."""
        values = per_model(self.compile, "compile")
        value = values.get(name, values.get("", "off"))
        return {"off": None, "on": "default"}.get(value, value)

    def compile_warmup_batches(self) -> list[tuple[str, int]]:
        """(path, copies) of each ``compile_warmup`` entry."""
        out = []
        for item in self.compile_warmup:
            path, _, count = item.rpartition(":")
            if not path or not count.isdigit():
                path, count = item, "1"
            out.append((path, int(count)))
        return out

    def long_range_for(self, name: str) -> dict[str, str]:
        """The long-range options of model ``name``: its own over those for every model."""
        out = {}
        for key, setting in (("mode", "long_range_mode"), ("method", "long_range_method")):
            values = per_model(getattr(self, setting), setting)
            value = values.get(name, values.get(""))
            if value is not None:
                out[key] = value
        return out

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
            raise ValueError(f"dtype must be {' or '.join(DTYPES)}, got {self.dtype!r}")
        for setting, allowed in (
            ("compile", COMPILE_MODES),
            ("long_range_mode", LONG_RANGE_MODES),
            ("long_range_method", LONG_RANGE_METHODS),
        ):
            for value in per_model(getattr(self, setting), setting).values():
                if value not in allowed:
                    raise ValueError(f"{setting} must be one of {allowed}, got {value!r}")
        for name in (
            "max_batch_atoms",
            "max_batch_pairs",
            "max_queue",
            "max_queue_atoms",
            "small_request_atoms",
            "prepare_threads",
            "max_neighbor_lists",
            "neighbor_list_bytes",
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
        for path, count in self.compile_warmup_batches():
            if count < 1:
                raise ValueError(f"compile_warmup {path!r}: the copy count must be at least 1")
        if self.torch_threads is not None and self.torch_threads < 1:
            raise ValueError(f"torch_threads must be at least 1, got {self.torch_threads}")
