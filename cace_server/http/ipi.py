"""i-PI connection groups controlled over HTTP: attach the running server to a new run.

A group is the ``clients`` connections made by one ``POST /v1/ipi/connections``: one
:class:`~cace_server.ipi.DriverPool` of its own, whose evaluator is bound to the
group's model, so that a group can be closed alone. A pool the server was started
with (``--ipi``) is listed as group ``startup``; closing it stops that pool.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from functools import partial

import numpy as np
import numpy.typing as npt

from cace_server.engine import Engine
from cace_server.http.errors import ApiError, invalid
from cace_server.http.settings import HttpSettings
from cace_server.ipi import ConnectionState, DriverOptions, DriverPool, IpiAddress, parse_address
from cace_server.ipi.engine_evaluator import ipi_evaluator
from cace_server.ipi.pinned import AddressRefused, PinnedSocket, pin_socket
from cace_server.validation import check_ipi_geometry

logger = logging.getLogger("cace_server.http")

STARTUP_GROUP = "startup"


@dataclass
class ConnectionGroup:
    """The i-PI connections of one attach (one pool, one model), listed and closed together."""

    id: str
    address: str
    model: str
    pool: DriverPool
    owned: bool  # created through the API (stopped with the app)
    created: float = field(default_factory=lambda: asyncio.get_running_loop().time())

    @property
    def state(self) -> str:
        states = {c.state for c in self.pool.connections}
        if not states or states == {ConnectionState.CLOSED}:
            return "closed"
        if states <= {ConnectionState.CONNECTING, ConnectionState.CLOSED}:
            return "connecting"
        return "running"

    def as_dict(self) -> dict[str, object]:
        return {
            "id": self.id,
            "address": self.address,
            "model": self.model,
            "clients": len(self.pool.connections),
            "state": self.state,
            "connections": [s.as_dict() for s in self.pool.statuses()],
        }


class RateLimit:
    """A token bucket: ``wait()`` returns at most ``rate`` times a second, after a burst."""

    def __init__(self, rate: float, burst: int) -> None:
        self.rate = rate
        self.burst = float(max(1, burst))
        self._tokens = self.burst
        self._last: float | None = None

    async def wait(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            now = loop.time()
            if self._last is not None:
                self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
            self._last = now
            if self._tokens >= 1.0:
                self._tokens -= 1.0
                return
            await asyncio.sleep((1.0 - self._tokens) / self.rate)


class IpiGroups:
    """The groups of this server; every method runs on the server's event loop."""

    def __init__(
        self, engine: Engine, settings: HttpSettings, startup: DriverPool | None = None
    ) -> None:
        self.engine = engine
        self.settings = settings
        self.groups: dict[str, ConnectionGroup] = {}
        self._ids = itertools.count(1)
        self._startup = startup
        self._connects = RateLimit(settings.ipi_connects_per_s, burst=settings.max_ipi_clients)

    def _register_startup(self) -> None:
        # Deferred: ConnectionGroup needs the running loop for its creation time.
        # A pool without connections (no --ipi given) is not listed.
        if self._startup is not None and self._startup.connections:
            addresses = sorted({str(c.address) for c in self._startup.connections})
            self.groups[STARTUP_GROUP] = ConnectionGroup(
                STARTUP_GROUP,
                ", ".join(addresses),
                self._startup.options.model_name or self.engine.default_model,
                self._startup,
                owned=False,
            )
            self._startup = None

    def list(self) -> list[ConnectionGroup]:
        self._register_startup()
        return list(self.groups.values())

    def states(self) -> dict[str, int]:
        """Connections by state, over every group (for /metrics)."""
        counts: Counter[str] = Counter()
        pools = [g.pool for g in self.groups.values()]
        if self._startup is not None:
            pools.append(self._startup)
        for pool in pools:
            for c in pool.connections:
                counts[c.state.value] += 1
        return dict(counts)

    async def add(
        self,
        address: str,
        clients: int,
        model: str,
        numbers: npt.NDArray[np.int64],
        *,
        arrays: dict[str, npt.NDArray[np.float64]] | None = None,
        bec: bool = True,
        pbc: bool | None,
        reconnect: bool,
        connect_timeout: float,
        sockets_prefix: str,
    ) -> ConnectionGroup:
        self._register_startup()
        active = [g for g in self.groups.values() if g.owned and g.state != "closed"]
        if len(active) >= self.settings.max_ipi_groups:
            raise ApiError(
                429,
                "too_many_groups",
                f"{len(active)} i-PI groups are active (limit {self.settings.max_ipi_groups}); "
                "close one first",
                headers={"Retry-After": "5"},
            )
        if clients > self.settings.max_ipi_clients:
            raise invalid(
                f"at most {self.settings.max_ipi_clients} connections per group", "clients"
            )
        if not sockets_prefix.startswith("/"):
            raise invalid("sockets_prefix must be an absolute path", "sockets_prefix")
        try:
            parsed = parse_address(address, sockets_prefix)
        except ValueError as exc:
            raise invalid(str(exc), "address") from None
        refusal = self.refusal(parsed)
        if refusal is not None:
            raise ApiError(403, "address_not_allowed", refusal, field="address")
        options = DriverOptions(
            numbers=[int(z) for z in numbers],
            arrays=arrays or {},
            pbc=pbc,
            model_name=model,
            reconnect=reconnect,
            connect_timeout=connect_timeout,
            sockets_prefix=sockets_prefix,
            before_connect=self._before_connect,
            check_socket=partial(self._socket_refusal, given=parsed.path or ""),
            validate=partial(
                check_ipi_geometry,
                cutoff=self.engine.model_info(model).cutoff,
                limits=self.settings.geometry,
            ),
        )
        pool = DriverPool(ipi_evaluator(self.engine, model, bec), options)
        group_id = f"g{next(self._ids)}"
        pool.add(parsed, clients)
        for i, connection in enumerate(pool.connections):
            connection.name = f"{group_id}#{i}"
        await pool.start()
        group = ConnectionGroup(group_id, str(parsed), model, pool, owned=True)
        self.groups[group_id] = group
        self._forget_old_closed()
        logger.info(
            "i-PI group %s: %d connection(s) to %s, model %s", group_id, clients, parsed, model
        )
        return group

    def refusal(self, address: IpiAddress) -> str | None:
        """Why the allow-list refuses ``address`` (None: allowed)."""
        settings = self.settings
        if address.path is not None:
            # An early answer for the client; what binds is the check of every
            # connection attempt, on the file it connects to (_socket_refusal).
            try:
                with pin_socket(address.path) as pinned:
                    return self._socket_refusal(pinned, address.path)
            except AddressRefused as exc:
                return str(exc)
            except OSError:  # no socket there yet (i-PI not started): where it would be
                try:
                    real = os.path.realpath(address.path)
                except OSError:  # a path being renamed meanwhile
                    real = address.path
                return self._path_refusal(real, address.path)
        hosts = settings.ipi_allowed_hosts
        if hosts is not None and address.host not in hosts:
            listed = ", ".join(hosts)
            return f"this server connects only to i-PI on {listed} (got host {address.host!r})"
        port = address.port or 0
        if not any(lo <= port <= hi for lo, hi in settings.ipi_allowed_ports):
            ranges = ", ".join(
                f"{lo}-{hi}" if hi > lo else str(lo) for lo, hi in settings.ipi_allowed_ports
            )
            return f"this server connects only to i-PI ports {ranges} (got {port})"
        return None

    def _path_refusal(self, real: str, given: str) -> str | None:
        # names the path as given: where a symlink leads is not the client's business
        prefix = self.settings.ipi_socket_prefix
        if real.startswith(prefix):
            return None
        return f"this server connects only to UNIX sockets under {prefix!r} (got {given[:200]!r})"

    def _socket_refusal(self, socket: PinnedSocket, given: str) -> str | None:
        """The allow-list on the socket file an attempt is about to connect to.

        The driver opened the path once and connects through that open file
        (:func:`~cace_server.ipi.pinned.pin_socket`), so the real path checked here
        is where the connection goes, whatever a local user swaps (the symlink, a
        directory on the way) between this check and the connect. A second hard
        link would put a file from elsewhere under the prefix: one link only.
        """
        refusal = self._path_refusal(socket.real_path, given)
        if refusal is None and socket.links != 1:
            refusal = f"the socket file has {socket.links} hard links (expected 1)"
        return refusal

    async def _before_connect(self, address: IpiAddress) -> bool:
        """Every attempt of every attached connection: rate limit, then the TCP
        allow-list (UNIX sockets are checked on the file itself: ``check_socket``)."""
        await self._connects.wait()
        return address.path is not None or self.refusal(address) is None

    def _forget_old_closed(self) -> None:
        """Keep the listing bounded: only the newest closed groups stay listed."""
        closed = [g for g in self.groups.values() if g.owned and g.state == "closed"]
        for g in closed[: max(0, len(closed) - 4 * self.settings.max_ipi_groups)]:
            del self.groups[g.id]

    async def remove(self, group_id: str) -> ConnectionGroup:
        self._register_startup()
        group = self.groups.pop(group_id, None)
        if group is None:
            raise ApiError(404, "not_found", f"no i-PI group {group_id!r}", field="id")
        await group.pool.stop()
        logger.info("i-PI group %s closed", group_id)
        return group

    async def close(self) -> None:
        """Stop the groups created through the API (the startup pool is not ours)."""
        owned = [g for g in self.groups.values() if g.owned]
        await asyncio.gather(*(g.pool.stop() for g in owned), return_exceptions=True)
