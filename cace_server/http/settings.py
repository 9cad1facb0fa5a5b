"""Settings of the HTTP frontend (one frozen dataclass, validated on creation)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from cace_server.options import option

if TYPE_CHECKING:
    from cace_server.validation import GeometryLimits

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
#: the bind addresses that name no one host (every interface)
WILDCARD_ADDRESSES = ("", "0.0.0.0", "::")


def host_name(host: str) -> str:
    """A Host header's or allowed-hosts entry's name: lower case, no port, no brackets."""
    host = host.strip().lower().rstrip(".")
    if host.startswith("["):  # [::1] or [::1]:8000
        return host[1 : host.find("]")] if "]" in host else host[1:]
    if host.count(":") == 1:  # name:port (a bare IPv6 address has several colons)
        return host.partition(":")[0]
    return host


def _allowed_hosts(items: list[str]) -> tuple[str, ...] | None:
    return tuple(items) or None


def parse_port_ranges(items: list[str]) -> tuple[tuple[int, int], ...]:
    """``["31415", "40000-40010"]`` -> ``((31415, 31415), (40000, 40010))``."""
    out = []
    for item in items:
        lo, sep, hi = item.strip().partition("-")
        try:
            first = int(lo)
            last = int(hi) if sep else first
        except ValueError:
            raise ValueError(f"not a port or a port range: {item!r}") from None
        if not 0 < first <= last < 65536:
            raise ValueError(f"port range {item!r} outside 1..65535")
        out.append((first, last))
    return tuple(out)


def format_port_ranges(ranges: tuple[tuple[int, int], ...]) -> str:
    return ",".join(str(lo) if lo == hi else f"{lo}-{hi}" for lo, hi in ranges)


@dataclass(frozen=True)
class HttpSettings:
    """Where the HTTP API listens, its limits, authentication and i-PI control.

    ``token``: when set, every route but ``/healthz`` requires
    ``Authorization: Bearer <token>``. ``enabled``, ``host``, ``port`` and the
    connection timeouts are the server's (``create_app`` does not read them).
    """

    enabled: bool = option(True, name="http", help="serve the HTTP API")
    host: str = option("127.0.0.1", help="HTTP bind address")
    port: int = option(8000, format=str, help="HTTP port")
    token: str | None = option(
        None, help="bearer token required by HTTP routes (prefer CACE_SERVER_TOKEN)"
    )
    #: largest request body accepted (bytes); checked before any parsing.
    max_request_bytes: int = option(256 * 1024 * 1024, help="largest HTTP request body")
    #: bytes of request bodies being received or processed at once, over all
    #: requests (503 above; one request alone is always admitted).
    max_pending_bytes: int = option(
        512 * 1024 * 1024, help="bytes of HTTP request bodies held at once, over all requests"
    )
    #: JSON bodies of at least this many bytes are parsed in a worker process (see
    #: :mod:`cace_server.transcode`), smaller ones on a thread.
    process_body_bytes: int = option(
        8 * 1024 * 1024,
        help="JSON bodies of at least this many bytes are parsed in a worker process",
    )
    #: atoms in one structure.
    max_atoms: int = option(200_000, help="most atoms in one structure")
    #: structures in one batch request.
    max_structures: int = option(4096, help="most structures in one batch request")
    #: atoms in one request, summed over its structures.
    max_request_atoms: int = 200_000
    #: seconds a calculation may take (queueing included) before the client gets 504.
    request_timeout_s: float = option(600.0, help="HTTP request timeout in seconds")
    #: atoms closer than this (Å, periodic images included) make a structure invalid;
    #: the server's i-PI connections check it too.
    min_distance: float = option(
        0.1,
        help="refuse structures (HTTP and i-PI) with atoms closer than this (A)",
    )
    #: upper bound of the neighbours per atom within the model cutoff, as estimated on
    #: a grid (about 6x the true count); denser input would exhaust memory, not inform.
    max_neighbors_per_atom: int = 4000
    # Connections: the request head must arrive within header_timeout_s, a body may
    # pause at most body_timeout_s; idle keep-alive connections close after
    # keep_alive_timeout_s. At shutdown, requests already received finish (each
    # bounded by request_timeout_s), then the rest get shutdown_timeout_s.
    header_timeout_s: float = option(10.0, help="seconds an HTTP request head may take to arrive")
    body_timeout_s: float = option(
        30.0,
        help="seconds an HTTP request body may pause, and its grace before "
        "--min-body-bytes-per-s applies, before the client is dropped",
    )
    #: after ``body_timeout_s``, a body must keep this average rate: it has to be
    #: complete ``body_timeout_s + received / min_body_bytes_per_s`` after its head,
    #: so a client that declares a large body and trickles it is dropped in time.
    min_body_bytes_per_s: int = option(
        1024 * 1024, help="slowest average rate of an HTTP request body after its grace"
    )
    keep_alive_timeout_s: float = option(
        5.0, help="seconds an idle HTTP keep-alive connection stays open"
    )
    shutdown_timeout_s: float = option(
        5.0,
        help="at shutdown, seconds open HTTP connections get after the requests already "
        "received are answered",
    )
    #: let clients replace a served model (``PUT /v1/models/{name}``, ``POST
    #: /v1/models/{name}/reload``; SIGHUP reloads every model). Off by default.
    allow_model_updates: bool = option(
        False,
        help="allow PUT /v1/models/NAME and POST /v1/models/NAME/reload (hot model swaps) "
        "and reload every model on SIGHUP",
    )
    #: the directory a ``{"path": ...}`` model update may name (real path inside it);
    #: uploaded model files are written there too. None: paths are refused and
    #: uploads go to a private temporary directory.
    model_update_dir: str | None = option(
        None, help="directory whose model files PUT /v1/models/NAME may name"
    )
    #: largest uploaded model file (bytes).
    max_model_bytes: int = option(
        512 * 1024 * 1024, help="largest model file PUT /v1/models/NAME accepts"
    )
    #: names a request's ``Host`` (and a state-changing request's ``Origin``) may
    #: carry, against DNS rebinding and cross-site requests from a browser; None:
    #: the loopback names plus ``host`` when it binds one non-loopback address;
    #: ``*`` allows any.
    allowed_hosts: tuple[str, ...] | None = option(
        None,
        raw=list[str],
        parse=_allowed_hosts,
        show="localhost,127.0.0.1,[::1] and --host",
        help="names the Host and Origin headers of HTTP requests may carry ('*': any)",
    )
    #: accept and return ``application/msgpack`` next to JSON.
    allow_binary: bool = True
    #: let clients attach the server to i-PI runs (``POST /v1/ipi/connections``). Off
    #: by default: the route makes the server connect where a client says.
    allow_ipi_control: bool = option(
        False,
        name="ipi_attach",
        help="allow POST /v1/ipi/connections (attach to a new i-PI run)",
    )
    #: UNIX sockets an attached i-PI address may name: their real path (symlinks and
    #: ``..`` resolved) must start with this (i-PI's default ``sockets_prefix``; end
    #: it with ``/`` to allow a whole directory).
    ipi_socket_prefix: str = option(
        "/tmp/ipi_",
        name="ipi_attach_socket_prefix",
        help="UNIX sockets the attach route may use: real path prefix",
    )
    #: hosts a TCP i-PI address may name; None allows any (the server then connects
    #: wherever a client says: only for trusted networks; Python API only).
    ipi_allowed_hosts: tuple[str, ...] | None = option(
        LOOPBACK_HOSTS,
        name="ipi_attach_hosts",
        raw=list[str],
        parse=tuple,
        help="TCP hosts the attach route may use",
    )
    #: TCP ports (inclusive ranges) an attached i-PI address may name.
    ipi_allowed_ports: tuple[tuple[int, int], ...] = option(
        ((31415, 31514),),
        name="ipi_attach_ports",
        raw=list[str],
        parse=parse_port_ranges,
        format=format_port_ranges,
        help="TCP ports (N or N-M) the attach route may use",
    )
    #: connection attempts per second, over all attached connections (reconnects
    #: included); bursts up to ``max_ipi_clients`` (one group connecting at once).
    ipi_connects_per_s: float = option(
        2.0,
        name="ipi_attach_connects_per_s",
        help="connection attempts per second of attached i-PI connections",
    )
    #: connection groups attached through the API at once, and connections per group.
    max_ipi_groups: int = 16
    max_ipi_clients: int = 64
    #: one JSON line per request on the ``cace_server.http.access`` logger.
    access_log: bool = True

    @property
    def host_names(self) -> frozenset[str] | None:
        """The host names requests may name (see ``allowed_hosts``); None: any."""
        if self.allowed_hosts is None:
            names = {host_name(h) for h in LOOPBACK_HOSTS}
            if self.host not in WILDCARD_ADDRESSES:
                names.add(host_name(self.host))
            return frozenset(names)
        if "*" in self.allowed_hosts:
            return None
        return frozenset(host_name(h) for h in self.allowed_hosts)

    @property
    def geometry(self) -> GeometryLimits:
        """The geometry checks shared with the other frontends."""
        # validation needs vesin and torch: not imported with the settings
        from cace_server.validation import GeometryLimits

        return GeometryLimits(self.min_distance, self.max_neighbors_per_atom)

    def __post_init__(self) -> None:
        if not 0 < self.port < 65536:
            raise ValueError(f"port must be in 1..65535, got {self.port}")
        positive = (
            "max_request_bytes",
            "max_pending_bytes",
            "max_atoms",
            "max_structures",
            "max_request_atoms",
            "max_neighbors_per_atom",
            "max_ipi_groups",
            "max_ipi_clients",
            "min_body_bytes_per_s",
        )
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not self.ipi_connects_per_s > 0:
            raise ValueError(f"ipi_connects_per_s must be positive, got {self.ipi_connects_per_s}")
        if not self.ipi_socket_prefix.startswith("/"):
            raise ValueError(f"ipi_socket_prefix must be absolute, got {self.ipi_socket_prefix!r}")
        for lo, hi in self.ipi_allowed_ports:
            if not 0 < lo <= hi < 65536:
                raise ValueError(f"bad i-PI port range {lo}-{hi}")
        if not self.request_timeout_s > 0:
            raise ValueError(f"request_timeout_s must be positive, got {self.request_timeout_s}")
        if self.min_distance < 0:
            raise ValueError(f"min_distance must not be negative, got {self.min_distance}")
        if self.token is not None and not self.token.strip():
            raise ValueError("token must not be empty (use None for no authentication)")
        for name in self.allowed_hosts or ():
            if not host_name(name):
                raise ValueError(f"allowed_hosts: empty host name in {self.allowed_hosts}")
        for name in ("header_timeout_s", "body_timeout_s", "keep_alive_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.shutdown_timeout_s < 0:
            raise ValueError(
                f"shutdown_timeout_s must not be negative, got {self.shutdown_timeout_s}"
            )
