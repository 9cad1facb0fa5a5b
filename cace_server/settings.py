"""Server settings: defaults, then a TOML file, then ``CACE_SERVER_*`` variables, then flags.

Every field has one name used everywhere: the TOML key, the environment variable
``CACE_SERVER_<NAME>`` (upper case) and the flag ``--<name>`` (dashes). List fields
take comma-separated values from the environment.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

ENV_PREFIX = "CACE_SERVER_"


@dataclass
class ServerSettings:
    # Models: "PATH" or "NAME=PATH"; empty means the bundled default model.
    model: list[str] = field(default_factory=list)
    default_model: str | None = None
    device: str = "cpu"
    dtype: str = "float64"
    # Long-range (Ewald) evaluation, "VALUE" for every model or "NAME=VALUE" for one:
    # mode parity|smooth, method auto|direct|mesh.
    long_range_mode: list[str] = field(default_factory=list)
    long_range_method: list[str] = field(default_factory=list)
    # HTTP
    http: bool = True
    host: str = "127.0.0.1"
    port: int = 8000
    token: str | None = None
    max_request_bytes: int = 256 * 1024 * 1024
    max_pending_bytes: int = 512 * 1024 * 1024
    process_body_bytes: int = 8 * 1024 * 1024
    max_atoms: int = 200_000
    max_structures: int = 4096
    request_timeout_s: float = 600.0
    min_distance: float = 0.1
    # HTTP connections: the request head must arrive within header_timeout_s, a body
    # may pause at most body_timeout_s; idle keep-alive connections close after
    # keep_alive_timeout_s. At shutdown, requests already received finish (each
    # bounded by request_timeout_s), then the rest get shutdown_timeout_s.
    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    keep_alive_timeout_s: float = 5.0
    shutdown_timeout_s: float = 5.0
    # i-PI: addresses (unix:NAME or host:port), connections per address, and the
    # structure file giving the species of each address (one for all, or one each).
    ipi: list[str] = field(default_factory=list)
    ipi_clients: int = 1
    ipi_template: list[str] = field(default_factory=list)
    ipi_reconnect: bool = True
    ipi_model: str | None = None
    # Born effective charges for i-PI (its field-driven MD reads them from the extras):
    # computed when the model has them, unless this is off (they cost backward passes).
    ipi_bec: bool = True
    # POST /v1/ipi/connections (attach to a new i-PI run): off unless enabled, and
    # then only to these UNIX socket paths, hosts and ports, rate-limited.
    ipi_attach: bool = False
    ipi_attach_socket_prefix: str = "/tmp/ipi_"
    ipi_attach_hosts: list[str] = field(default_factory=lambda: ["127.0.0.1", "localhost", "::1"])
    ipi_attach_ports: list[str] = field(default_factory=lambda: ["31415-31514"])
    ipi_attach_connects_per_s: float = 2.0
    # Engine
    max_batch_atoms: int = 8192
    max_batch_pairs: int = 600_000
    batch_wait_ms: float = 2.0
    max_queue: int = 4096
    max_queue_atoms: int = 1_000_000
    small_request_atoms: int = 1024
    # i-PI step batches and Verlet neighbour lists (cace_server.engine.settings).
    step_wait_ms: float = 1000.0
    neighbor_skin: float = 0.5
    max_neighbor_lists: int = 1024
    # None: default_torch_threads() (half the cores).
    torch_threads: int | None = None
    # Logging
    log_level: str = "info"
    log_json: bool = False

    def validate(self) -> None:
        if self.dtype not in ("float32", "float64"):
            raise ValueError(f"dtype must be float32 or float64, got {self.dtype!r}")
        if self.ipi and not self.ipi_template:
            raise ValueError(
                "--ipi needs --ipi-template FILE: i-PI does not send atomic species, so the "
                "server reads them from a structure file with the same atoms as i-PI's input"
            )
        if self.ipi_template and len(self.ipi_template) not in (1, len(self.ipi)):
            raise ValueError("give one --ipi-template for all --ipi addresses, or one for each")
        if self.ipi_clients < 1:
            raise ValueError("ipi_clients must be at least 1")
        if not 0 < self.port < 65536:
            raise ValueError(f"port must be in 1..65535, got {self.port}")
        for name in ("header_timeout_s", "body_timeout_s", "keep_alive_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.shutdown_timeout_s < 0:
            raise ValueError(
                f"shutdown_timeout_s must not be negative, got {self.shutdown_timeout_s}"
            )
        for setting, allowed in (
            ("long_range_mode", LONG_RANGE_MODES),
            ("long_range_method", LONG_RANGE_METHODS),
        ):
            for value in _per_model(getattr(self, setting), setting).values():
                if value not in allowed:
                    raise ValueError(f"{setting} must be one of {allowed}, got {value!r}")

    def long_range_for(self, name: str) -> dict[str, str]:
        """Long-range options given for model ``name`` ("" : those for every model)."""
        out = {}
        for key, setting in (("mode", "long_range_mode"), ("method", "long_range_method")):
            values = _per_model(getattr(self, setting), setting)
            if name in values:
                out[key] = values[name]
        return out

    def model_sources(self) -> dict[str, str]:
        """NAME -> PATH for the models to load (names default to the file stem)."""
        out: dict[str, str] = {}
        for spec in self.model:
            name, sep, path = spec.partition("=")
            if not sep:
                name, path = Path(spec).stem, spec
            if name in out:
                raise ValueError(f"two models named {name!r}; use NAME=PATH to tell them apart")
            out[name] = path
        return out


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


# The choices of cace_server.model.longrange (not imported here: it needs torch).
LONG_RANGE_MODES = ("parity", "smooth")
LONG_RANGE_METHODS = ("auto", "direct", "mesh")


def _per_model(values: list[str], setting: str) -> dict[str, str]:
    """["VALUE", "NAME=VALUE", ...] -> {"": VALUE, NAME: VALUE}."""
    out: dict[str, str] = {}
    for item in values:
        name, _, value = item.rpartition("=")
        if name in out:
            raise ValueError(f"{setting} given twice for {name or 'all models'!r}")
        out[name] = value.strip()
    return out


def _convert(value: Any, annotation: Any) -> Any:
    """Convert a string (from the environment) or TOML value to the field's type."""
    origin = get_origin(annotation)
    args = [a for a in get_args(annotation) if a is not type(None)]
    if value is None:
        return None
    if origin is list:
        items = value.split(",") if isinstance(value, str) else list(value)
        return [_convert(v.strip() if isinstance(v, str) else v, args[0]) for v in items if v != ""]
    if args and origin is not list:  # Optional[X]
        if isinstance(value, str) and value.lower() in ("", "none", "null"):
            return None
        return _convert(value, args[0])
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if str(value).lower() in ("1", "true", "yes", "on"):
            return True
        if str(value).lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"not a boolean: {value!r}")
    if annotation in (int, float, str):
        return annotation(value)
    return value


def load_settings(
    toml_path: str | Path | None = None,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> ServerSettings:
    """Merge the layers; ``overrides`` (from flags) holds only what the user gave."""
    hints = get_type_hints(ServerSettings)
    names = {f.name for f in fields(ServerSettings)}
    values: dict[str, Any] = {}
    if toml_path is not None:
        with open(toml_path, "rb") as f:
            data = tomllib.load(f)
        unknown = set(data) - names
        if unknown:
            raise ValueError(f"{toml_path}: unknown settings {sorted(unknown)}")
        values.update({k: _convert(v, hints[k]) for k, v in data.items()})
    env = os.environ if environ is None else environ
    for name in names:
        key = ENV_PREFIX + name.upper()
        if key in env:
            try:
                values[name] = _convert(env[key], hints[name])
            except ValueError as exc:
                raise ValueError(f"{key}: {exc}") from exc
    for name, value in (overrides or {}).items():
        if name not in names:
            raise ValueError(f"unknown setting {name!r}")
        values[name] = value
    settings = dataclasses.replace(ServerSettings(), **values)
    settings.validate()
    return settings
