"""Where an i-PI server listens: ``unix:NAME``, ``shm:NAME``, ``HOST:PORT``.

``unix:NAME`` is i-PI's ``<ffsocket mode="unix"><address>NAME</address>``: the socket
file is i-PI's ``sockets_prefix`` (``/tmp/ipi_`` unless the input's
``<simulation sockets_prefix=...>`` says otherwise) followed by NAME. An absolute path
(``unix:/run/ipi/water``) is used as is, for runs with another prefix.
``shm:NAME`` is the same UNIX socket for i-PI's ``mode="shm"``: the bulk data then
travels through shared memory. ``HOST:PORT``, ``tcp:HOST:PORT`` or ``[IPv6]:PORT``
is i-PI's ``mode="inet"``.
"""

from __future__ import annotations

from dataclasses import dataclass

IPI_SOCKETS_PREFIX = "/tmp/ipi_"
# sun_path holds 108 bytes on Linux, including the terminating NUL.
_MAX_UNIX_PATH = 107


@dataclass(frozen=True)
class IpiAddress:
    """A parsed address; ``path`` for UNIX sockets, ``host``/``port`` for TCP."""

    text: str
    path: str | None = None
    host: str | None = None
    port: int | None = None
    shm: bool = False

    @property
    def is_unix(self) -> bool:
        return self.path is not None

    def __str__(self) -> str:
        return self.text


def parse_address(text: str, sockets_prefix: str = IPI_SOCKETS_PREFIX) -> IpiAddress:
    """Parse an address string; raise ``ValueError`` naming what is wrong."""
    raw = text.strip()
    scheme, sep, rest = raw.partition(":")
    if sep and scheme in ("unix", "shm"):
        if not rest:
            raise ValueError(f"i-PI address {text!r}: no socket name after '{scheme}:'")
        path = rest if rest.startswith("/") else sockets_prefix + rest
        if "\x00" in path:
            raise ValueError(f"i-PI address {text!r}: NUL in the socket path")
        if len(path.encode()) > _MAX_UNIX_PATH:
            raise ValueError(
                f"i-PI address {text!r}: UNIX socket path {path!r} is longer than "
                f"{_MAX_UNIX_PATH} bytes"
            )
        return IpiAddress(text=raw, path=path, shm=scheme == "shm")
    raw_hostport = rest if sep and scheme == "tcp" else raw
    if raw_hostport.startswith("["):
        host, bracket, port_text = raw_hostport[1:].partition("]")
        if not bracket or not port_text.startswith(":"):
            raise ValueError(f"i-PI address {text!r}: expected [IPv6]:PORT")
        port_text = port_text[1:]
    else:
        host, colon, port_text = raw_hostport.rpartition(":")
        if not colon:
            raise ValueError(f"i-PI address {text!r}: expected unix:NAME, shm:NAME or HOST:PORT")
    host = host or "localhost"
    try:
        port = int(port_text)
    except ValueError:
        raise ValueError(f"i-PI address {text!r}: port {port_text!r} is not a number") from None
    if not 0 < port < 65536:
        raise ValueError(f"i-PI address {text!r}: port {port} outside 1..65535")
    return IpiAddress(text=raw, host=host, port=port)
