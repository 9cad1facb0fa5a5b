"""Many driver connections in one process: ``--ipi ADDRESS --ipi-clients N``, repeated.

A :class:`DriverPool` owns the tasks of its :class:`DriverConnection` objects. All of
them call the same ``evaluate`` coroutine, so an engine that batches concurrent calls
evaluates the beads of every connected i-PI run together.
"""

from __future__ import annotations

import asyncio
import logging

from cace_server.ipi.address import IpiAddress, parse_address
from cace_server.ipi.driver import (
    ConnectionStatus,
    DriverConnection,
    DriverOptions,
    Evaluator,
    Peers,
)

logger = logging.getLogger("cace_server.ipi")


class DriverPool:
    """Connections to one or several i-PI servers, started and stopped together."""

    def __init__(self, evaluate: Evaluator, options: DriverOptions) -> None:
        self.evaluate = evaluate
        self.options = options
        self.connections: list[DriverConnection] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._peers: dict[IpiAddress, Peers] = {}
        #: (connection, reason) of every link ended by a refusal (see ``driver``)
        self.refusals: list[tuple[str, str]] = []
        self._refusal: asyncio.Event | None = None

    def _refused(self, connection: str, reason: str) -> None:
        self.refusals.append((connection, reason))
        self.refusal_event.set()

    @property
    def refusal_event(self) -> asyncio.Event:
        """Set once a connection of this pool has refused what i-PI sent."""
        if self._refusal is None:
            self._refusal = asyncio.Event()
        return self._refusal

    def add(
        self,
        address: IpiAddress | str,
        clients: int = 1,
        options: DriverOptions | None = None,
    ) -> list[DriverConnection]:
        """Add ``clients`` connections to ``address`` (started now if the pool runs)."""
        if clients < 1:
            raise ValueError(f"clients must be at least 1, got {clients}")
        opts = options or self.options
        if isinstance(address, IpiAddress):
            parsed = address
        else:
            parsed = parse_address(address, opts.sockets_prefix)
        added = [
            DriverConnection(parsed, self.evaluate, opts, name=f"ipi[{parsed}]#{i}")
            for i in range(clients)
        ]
        self.connections.extend(added)
        peers = self._peers.get(parsed)
        if peers is None:
            peers = self._peers[parsed] = Peers()
            peers.on_refusal = self._refused
        for c in added:
            c.peers = peers
            peers.members.append(c)
        if self._tasks:
            self._tasks.extend(self._spawn(c) for c in added)
        return added

    def _spawn(self, connection: DriverConnection) -> asyncio.Task[None]:
        return asyncio.get_running_loop().create_task(connection.run(), name=connection.name)

    async def start(self) -> None:
        """Start every connection (call from the running event loop)."""
        if self._tasks:
            return
        self._tasks = [self._spawn(c) for c in self.connections]

    def statuses(self) -> list[ConnectionStatus]:
        return [c.status() for c in self.connections]

    @property
    def running(self) -> bool:
        return any(not t.done() for t in self._tasks)

    async def wait(self, timeout: float | None = None) -> bool:
        """Wait until every connection has closed; False if ``timeout`` came first."""
        if not self._tasks:
            return True
        _, pending = await asyncio.wait(self._tasks, timeout=timeout)
        return not pending

    async def stop(self, timeout: float = 10.0) -> None:
        """Cancel every connection and wait (bounded) for them to close their sockets."""
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            _, pending = await asyncio.wait(self._tasks, timeout=timeout)
            if pending:
                logger.warning("%d i-PI connections did not stop in %g s", len(pending), timeout)
        self._tasks = []

    async def __aenter__(self) -> DriverPool:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
