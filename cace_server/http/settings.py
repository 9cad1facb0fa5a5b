"""Settings of the HTTP frontend (one frozen dataclass, validated on creation)."""

from __future__ import annotations

from dataclasses import dataclass

from cace_server.validation import GeometryLimits

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


@dataclass(frozen=True)
class HttpSettings:
    """Limits, authentication and i-PI control of the HTTP API.

    ``token``: when set, every route but ``/healthz`` requires
    ``Authorization: Bearer <token>``.
    """

    token: str | None = None
    #: largest request body accepted (bytes); checked before any parsing.
    max_request_bytes: int = 64 * 1024 * 1024
    #: bytes of request bodies being received or processed at once, over all
    #: requests (503 above; one request alone is always admitted).
    max_pending_bytes: int = 512 * 1024 * 1024
    #: JSON bodies of at least this many bytes are parsed in a worker process (see
    #: :mod:`cace_server.transcode`), smaller ones on a thread.
    process_body_bytes: int = 8 * 1024 * 1024
    #: atoms in one structure.
    max_atoms: int = 100_000
    #: structures in one batch request.
    max_structures: int = 1024
    #: atoms in one request, summed over its structures.
    max_request_atoms: int = 200_000
    #: seconds a calculation may take (queueing included) before the client gets 504.
    request_timeout_s: float = 120.0
    #: atoms closer than this (Å, periodic images included) make a structure invalid.
    min_distance: float = 0.1
    #: upper bound of the neighbours per atom within the model cutoff, as estimated on
    #: a grid (about 6x the true count); denser input would exhaust memory, not inform.
    max_neighbors_per_atom: int = 4000
    #: accept and return ``application/msgpack`` next to JSON.
    allow_binary: bool = True
    #: let clients attach the server to i-PI runs (``POST /v1/ipi/connections``). Off
    #: by default: the route makes the server connect where a client says.
    allow_ipi_control: bool = False
    #: hosts a TCP i-PI address may name; None allows any (the server then connects
    #: wherever a client says: only for trusted networks).
    ipi_allowed_hosts: tuple[str, ...] | None = LOOPBACK_HOSTS
    #: TCP ports (inclusive ranges) an attached i-PI address may name.
    ipi_allowed_ports: tuple[tuple[int, int], ...] = ((31415, 31514),)
    #: UNIX sockets an attached i-PI address may name: their real path (symlinks and
    #: ``..`` resolved) must start with this (i-PI's default ``sockets_prefix``; end
    #: it with ``/`` to allow a whole directory).
    ipi_socket_prefix: str = "/tmp/ipi_"
    #: connection attempts per second, over all attached connections (reconnects
    #: included); bursts up to ``max_ipi_clients`` (one group connecting at once).
    ipi_connects_per_s: float = 2.0
    #: connection groups attached through the API at once, and connections per group.
    max_ipi_groups: int = 16
    max_ipi_clients: int = 64
    #: one JSON line per request on the ``cace_server.http.access`` logger.
    access_log: bool = True

    @property
    def geometry(self) -> GeometryLimits:
        """The geometry checks shared with the other frontends."""
        return GeometryLimits(self.min_distance, self.max_neighbors_per_atom)

    def __post_init__(self) -> None:
        positive = (
            "max_request_bytes",
            "max_pending_bytes",
            "max_atoms",
            "max_structures",
            "max_request_atoms",
            "max_neighbors_per_atom",
            "max_ipi_groups",
            "max_ipi_clients",
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
