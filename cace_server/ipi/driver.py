"""One asyncio driver connection to an i-PI server.

A :class:`DriverConnection` connects (retrying with backoff while i-PI is not up),
answers i-PI's messages through the codec of :mod:`cace_server.ipi.protocol`, and
hands every POSDATA's structures to an injected ``evaluate`` coroutine. Each socket
connection to i-PI is a *link* (one i-PI run, with its own protocol state); when i-PI
goes away (EOF, EXIT, reset) the link ends cleanly and, if configured, the connection
waits for the next i-PI at the same address. Invalid bytes, truncated messages and
failed evaluations end that link with a logged reason. Nothing escapes
:meth:`DriverConnection.run` but cancellation, so one connection can never take the
process or its neighbours down.

A link counts once i-PI has *accepted* it (sent its first message): i-PI accepts a
few connections per poll, so others wait in its listen backlog, and the kernel may
queue one while i-PI exits. i-PI closing (EOF or reset) a link it never accepted, or
one between messages, is i-PI ending it ("closed by i-PI"), not a lost connection;
only a reset in the middle of an exchange is. The connections of one pool to one
address share a :class:`Peers`: the step group waits only for accepted ones, and
without reconnecting, once i-PI has ended one accepted link the others that it never
accepted give up (its run is over).

i-PI has no error message. A *refusal* (a structure the server will not evaluate, a
protocol error, a failed evaluation) ends the link with an error in the log and in
``last_error``; i-PI keeps the structure for the next client, so the refusal is also
reported to the pool (:attr:`Peers.refused`), where the server ends visibly instead
of leaving i-PI waiting (see ``server.serve``).

Replies are encoded whole before the first byte is written, and written with a single
``write``: a cancelled connection leaves either a whole reply or none on the wire.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, cast

import numpy as np
import numpy.typing as npt

from cace_server.ipi import protocol as p
from cace_server.ipi.address import IpiAddress, parse_address
from cace_server.ipi.convert import extras_json, results_to_wire, structures_from_wire
from cace_server.ipi.pinned import AddressRefused, PinnedSocket, pin_socket
from cace_server.ipi.shm import ShmSegments
from cace_server.structures import Prediction, Structure, StructureError

logger = logging.getLogger("cace_server.ipi")


@dataclass(frozen=True)
class Source:
    """Who asks for an evaluation: one connection, and the i-PI address it serves.

    An engine uses ``connection`` to keep per-connection state (a Verlet neighbour
    list of the bead it drives) and ``address``/``peers`` to close a batch as soon as
    every connection of that i-PI has submitted its bead for the step.
    """

    connection: str
    address: str
    #: connections of this pool to the same address that i-PI has accepted (at least 1)
    peers: int


class Evaluator(Protocol):
    """What connections call with every POSDATA's structures."""

    def __call__(
        self, structures: list[Structure], *, source: Source
    ) -> Awaitable[list[Prediction]]: ...


_READ_CHUNK = 1 << 20


class ConnectionState(str, enum.Enum):
    CONNECTING = "connecting"  # waiting for i-PI to accept
    CONNECTED = "connected"  # socket open, no INIT yet
    IDLE = "idle"  # initialised, waiting for positions
    COMPUTING = "computing"  # evaluating a POSDATA
    CLOSED = "closed"  # done; will not reconnect


@dataclass
class DriverOptions:
    """How connections behave. ``numbers`` is required: i-PI never sends species."""

    numbers: Sequence[int]
    #: per-atom model inputs (``Structure.arrays``) of every structure: i-PI sends
    #: none, so they come from the species template.
    arrays: Mapping[str, npt.NDArray[np.float64]] = field(default_factory=dict)
    #: periodicity of the structures; None: periodic unless i-PI's cell is zero.
    pbc: bool | None = None
    #: name reported in the extras (``model`` key); None leaves it to the evaluator.
    model_name: str | None = None
    #: send the JSON extras string; False sends empty strings.
    extras: bool = True
    #: after i-PI goes away (or the link fails), connect again for the next run.
    reconnect: bool = True
    #: give up connecting after this many seconds without success (None: never).
    connect_timeout: float | None = None
    backoff_initial: float = 0.05
    backoff_max: float = 2.0
    #: seconds the rest of a started message may take to arrive.
    message_timeout: float = 60.0
    #: seconds a closing socket may take to flush a reply already written.
    close_timeout: float = 5.0
    #: evaluate consecutive identical structures once (i-PI pads short batches).
    dedupe: bool = True
    #: i-PI's ``sockets_prefix`` used for ``unix:NAME`` addresses.
    sockets_prefix: str = "/tmp/ipi_"
    #: checks every structure i-PI sends before it is evaluated (the geometry checks
    #: of :func:`cace_server.validation.check_ipi_geometry`); a StructureError refuses
    #: it (ends the link), a returned string is a warning (logged, rate-limited) and
    #: the structure is evaluated.
    validate: Callable[[Structure], str | None] | None = None
    #: awaited before every connection attempt (rate limits, allow-lists); returning
    #: False gives the connection up (it closes, with ``last_error`` saying why).
    before_connect: Callable[[IpiAddress], Awaitable[bool]] | None = None
    #: checks the UNIX socket file each attempt connects to, as opened
    #: (:func:`~cace_server.ipi.pinned.pin_socket`: the attempt then connects to that
    #: very file); a string refuses (the reason) and gives the connection up.
    check_socket: Callable[[PinnedSocket], str | None] | None = None
    max_atoms: int = p.DEFAULT_MAX_ATOMS


@dataclass
class ConnectionStatus:
    """A snapshot of one connection, for status endpoints and tests."""

    name: str
    address: str
    transport: str
    state: ConnectionState
    steps: int
    structures: int
    sessions: int  # links served so far (the wire name of the counter)
    bead_index: int | None
    batch_size: int
    last_error: str | None
    last_step_seconds: float | None

    def as_dict(self) -> dict[str, object]:
        out = dict(self.__dict__)
        out["state"] = self.state.value
        return out


class LinkEnded(Exception):
    """A link ended; the message is the reason (logged, kept as ``last_error``)."""


class StructureRefused(Exception):
    """i-PI sent a structure the server does not evaluate (the message says why)."""


class Peers:
    """The connections of one pool to one i-PI address, and what they have in common."""

    def __init__(self) -> None:
        self.members: list[DriverConnection] = []
        #: (connection, reason) of every link ended by a refusal
        self.refused: list[tuple[str, str]] = []
        self.on_refusal: Callable[[str, str], None] | None = None
        self._run_over: asyncio.Event | None = None

    @property
    def accepted(self) -> int:
        return sum(1 for c in self.members if c.accepted)

    @property
    def run_over(self) -> asyncio.Event:
        """Set when i-PI has ended an accepted link of a connection that will not
        reconnect: the run these connections were made for is over."""
        if self._run_over is None:
            self._run_over = asyncio.Event()
        return self._run_over

    def refusal(self, connection: str, reason: str) -> None:
        self.refused.append((connection, reason))
        if self.on_refusal is not None:
            self.on_refusal(connection, reason)


# Checking this many atoms or more per message moves to a thread (off the event loop).
_THREAD_CHECK_ATOMS = 4096

#: a connection logs at most one structure warning (close contacts) per this many seconds
WARNING_INTERVAL_S = 60.0


@dataclass
class _Link:
    """Protocol state of one link: one socket connection, from connect to close."""

    decoder: p.DriverDecoder
    accepted: bool = False  # i-PI has sent a message on it
    initialized: bool = False
    reply: bytes | None = None  # FORCEREADY waiting for GETFORCE
    shm: ShmSegments | None = None
    shm_results: tuple[npt.NDArray[np.float64], ...] | None = None
    extras: list[str] = field(default_factory=list)
    reader: asyncio.StreamReader | None = None
    # bytes read while a step was computed (i-PI's STATUS polls), handled after it
    early: bytearray = field(default_factory=bytearray)


#: bytes read ahead while a step is computed; beyond this, reading waits for the step
_EARLY_MAX = 1 << 20


class DriverConnection:
    """One driver connection to one i-PI address; :meth:`run` it as a task."""

    def __init__(
        self,
        address: IpiAddress | str,
        evaluate: Evaluator,
        options: DriverOptions,
        name: str | None = None,
    ) -> None:
        self.address = (
            address
            if isinstance(address, IpiAddress)
            else parse_address(address, options.sockets_prefix)
        )
        self.evaluate = evaluate
        self.options = options
        self.numbers = np.asarray(options.numbers, dtype=np.int64).reshape(-1)
        if self.numbers.size == 0:
            raise ValueError("DriverOptions.numbers is empty: i-PI does not send species")
        self.name = name or f"ipi[{self.address}]"
        self.state = ConnectionState.CONNECTING
        self.steps = 0
        self.structures = 0
        self.links = 0
        self.bead_index: int | None = None
        self.batch_size = 1
        self.last_error: str | None = None
        self.last_step_seconds: float | None = None
        #: the connections to the same address in this connection's pool (the pool's)
        self.peers = Peers()
        self.peers.members.append(self)
        self._link: _Link | None = None
        self._warned_at: float | None = None
        self._warnings_unlogged = 0

    # ------------------------------------------------------------ public

    @property
    def accepted(self) -> bool:
        """i-PI has accepted the current link (sent it a message)."""
        return self._link is not None and self._link.accepted

    @property
    def source(self) -> Source:
        return Source(self.name, str(self.address), max(self.peers.accepted, 1))

    def status(self) -> ConnectionStatus:
        transport = "shm" if self.address.shm else ("unix" if self.address.is_unix else "tcp")
        return ConnectionStatus(
            name=self.name,
            address=str(self.address),
            transport=transport,
            state=self.state,
            steps=self.steps,
            structures=self.structures,
            sessions=self.links,  # links i-PI accepted
            bead_index=self.bead_index,
            batch_size=self.batch_size,
            last_error=self.last_error,
            last_step_seconds=self.last_step_seconds,
        )

    async def run(self) -> None:
        """Connect, serve, reconnect as configured; returns when the connection is closed."""
        backoff = self.options.backoff_initial
        try:
            while True:
                self.state = ConnectionState.CONNECTING
                if self._run_is_over():
                    return
                streams = await self._connect()
                if streams is None:
                    return
                steps_before = self.steps
                await self._serve(*streams)
                if not self.options.reconnect:
                    return
                if self.steps > steps_before:
                    backoff = self.options.backoff_initial
                else:  # a link that served nothing: do not spin on a bad peer
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, self.options.backoff_max)
        finally:
            self.state = ConnectionState.CLOSED

    def _run_is_over(self) -> bool:
        """Without reconnecting: i-PI ended another link of this address (its run is
        over), so this connection, which i-PI never accepted, gives up."""
        if self.options.reconnect or not self.peers.run_over.is_set():
            return False
        logger.info("%s: i-PI's run ended before it accepted this connection", self.name)
        return True

    async def _backoff(self, seconds: float) -> None:
        """Sleep, cut short when the run is over (see :meth:`_run_is_over`)."""
        if self.options.reconnect:
            await asyncio.sleep(seconds)
            return
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self.peers.run_over.wait(), seconds)

    # ------------------------------------------------------------ connecting

    async def _open(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self.address.path is None:
            return await asyncio.open_connection(
                self.address.host, self.address.port, limit=_READ_CHUNK
            )
        check = self.options.check_socket
        if check is None:
            reader, writer = await asyncio.open_unix_connection(
                self.address.path, limit=_READ_CHUNK
            )
        else:
            # Checked and connected through one open file: a symlink or directory
            # swapped after the check cannot redirect the connect.
            with pin_socket(self.address.path) as pinned:
                refusal = check(pinned)
                if refusal is not None:
                    raise AddressRefused(refusal)
                reader, writer = await asyncio.open_unix_connection(
                    pinned.connect_path, limit=_READ_CHUNK
                )
        # A non-blocking AF_UNIX connect to a full listen backlog (i-PI's <slots>) fails
        # with EAGAIN, which asyncio takes for "in progress" and then reports as done:
        # the socket is not connected (recv gives EINVAL). Check, and retry if so.
        try:
            writer.get_extra_info("socket").getpeername()
        except OSError as exc:
            writer.transport.abort()
            raise ConnectionRefusedError(f"i-PI's listen backlog is full ({exc})") from exc
        return reader, writer

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
        backoff = self.options.backoff_initial
        start = time.monotonic()
        attempts = 0
        while True:
            attempts += 1
            gate = self.options.before_connect
            if gate is not None and not await gate(self.address):
                self.last_error = f"connecting to {self.address} is not allowed (any more)"
                logger.warning("%s: %s", self.name, self.last_error)
                return None
            try:
                streams = await asyncio.wait_for(self._open(), timeout=10.0)
            except AddressRefused as exc:
                self.last_error = f"connecting to {self.address} is not allowed: {exc}"
                logger.warning("%s: %s", self.name, self.last_error)
                return None
            except (OSError, asyncio.TimeoutError) as exc:
                waited = time.monotonic() - start
                limit = self.options.connect_timeout
                if limit is not None and waited + backoff > limit:
                    self.last_error = (
                        f"could not connect to {self.address} in {waited:.1f} s: {exc}"
                    )
                    logger.warning("%s: %s", self.name, self.last_error)
                    return None
                if attempts == 1:
                    logger.info("%s: waiting for i-PI at %s (%s)", self.name, self.address, exc)
                await self._backoff(backoff)
                if self._run_is_over():
                    return None
                backoff = min(backoff * 2, self.options.backoff_max)
                continue
            logger.info("%s: connected to %s", self.name, self.address)
            return streams

    # ------------------------------------------------------------ serving

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.state = ConnectionState.CONNECTED
        self.bead_index = None
        self.batch_size = 1
        link = self._link = _Link(
            p.DriverDecoder(shm=self.address.shm, max_atoms=self.options.max_atoms),
            reader=reader,
        )
        ended_by_ipi = False
        try:
            await self._link_loop(link, reader, writer)
        except LinkEnded as end:
            ended_by_ipi = True
            logger.info("%s: %s", self.name, end)
        except p.ProtocolError as exc:
            self._refuse(f"protocol error: {exc}")
        except StructureRefused as exc:
            self._refuse(str(exc))
        except (ConnectionError, BrokenPipeError) as exc:
            if not link.accepted:
                ended_by_ipi = True
                logger.info("%s: closed by i-PI before it accepted this connection", self.name)
            elif (
                link.decoder.pending
                or link.reply is not None
                or self.state is ConnectionState.COMPUTING
            ):
                self._fail(f"connection lost: {exc}", level=logging.INFO)
            else:  # between messages: i-PI went away (the end of a run, or killed)
                ended_by_ipi = True
                logger.info("%s: closed by i-PI between messages (%s)", self.name, exc)
        except Exception as exc:  # the evaluator's or a bug: never past this connection
            self._refuse(f"evaluation failed: {type(exc).__name__}: {exc}")
            logger.debug("%s: traceback", self.name, exc_info=exc)
        finally:
            self._link = None
            if link.shm is not None:
                link.shm.close()
            await self._close_writer(writer)
        if ended_by_ipi and link.accepted and not self.options.reconnect:
            self.peers.run_over.set()

    def _fail(self, reason: str, level: int = logging.WARNING) -> None:
        self.last_error = reason
        logger.log(level, "%s: %s", self.name, reason)

    def _refuse(self, reason: str) -> None:
        """End the link for a reason of ours, loudly: i-PI has no error message and keeps
        waiting for a client that computes what it asked for."""
        then = (
            "the connection reconnects, and i-PI will hand it the same structure"
            if self.options.reconnect
            else "the connection closes for good"
        )
        self._fail(
            f"{reason}; closing the connection (i-PI has no error message: it waits for "
            f"another client to compute this; {then})",
            level=logging.ERROR,
        )
        self.peers.refusal(self.name, reason)

    def _warn(self, message: str) -> None:
        """Log a structure warning, at most one per WARNING_INTERVAL_S per connection."""
        now = time.monotonic()
        if self._warned_at is not None and now - self._warned_at < WARNING_INTERVAL_S:
            self._warnings_unlogged += 1
            return
        more = self._warnings_unlogged
        suffix = f" ({more} more structures warned about since the last warning)" if more else ""
        logger.warning("%s: %s%s", self.name, message, suffix)
        self._warned_at = now
        self._warnings_unlogged = 0

    async def _close_writer(self, writer: asyncio.StreamWriter) -> None:
        writer.close()
        try:
            await asyncio.wait_for(writer.wait_closed(), self.options.close_timeout)
        except (asyncio.TimeoutError, OSError):
            writer.transport.abort()
        except asyncio.CancelledError:
            writer.transport.abort()
            raise

    async def _link_loop(
        self, link: _Link, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        decoder = link.decoder
        while True:
            if link.early:  # read while the last step was computed
                data, link.early = bytes(link.early), bytearray()
            elif decoder.pending:
                try:
                    data = await asyncio.wait_for(
                        reader.read(_READ_CHUNK), self.options.message_timeout
                    )
                except asyncio.TimeoutError:
                    raise p.ProtocolError(
                        f"truncated message: {decoder.pending} bytes and nothing more "
                        f"for {self.options.message_timeout:g} s"
                    ) from None
            else:
                data = await reader.read(_READ_CHUNK)
            if not data:
                if decoder.pending:
                    raise p.ProtocolError(
                        f"truncated message: i-PI closed the connection "
                        f"{decoder.pending} bytes into a message"
                    )
                if not link.accepted:
                    raise LinkEnded("closed by i-PI before it accepted this connection")
                raise LinkEnded("i-PI closed the connection")
            if not link.accepted:
                link.accepted = True
                self.links += 1
            for message in decoder.feed(data):
                # a ServerDecoder only ever yields server messages
                reply = await self._handle(link, cast(p.ServerMessage, message))
                if reply:
                    writer.write(reply)
                    await writer.drain()

    async def _handle(self, link: _Link, message: p.ServerMessage) -> bytes | None:
        if isinstance(message, p.Status):
            if not link.initialized:
                return p.NEEDINIT
            if link.reply is not None:
                return p.HAVEDATA
            return p.READY
        if isinstance(message, p.Init):
            link.initialized = True
            self.bead_index = message.bead_index
            self.batch_size = message.batch_size
            self.state = ConnectionState.IDLE
            logger.debug("%s: INIT bead %d, %r", self.name, message.bead_index, message.init_string)
            return None
        if isinstance(message, p.PosData):
            self._check_idle(link)
            numbers = self._numbers_for(message.natoms)
            structures = await self._structures(message.cells, message.positions, numbers)
            predictions = await self._evaluate_watched(link, structures)
            energies, forces, virials = results_to_wire(predictions, structures)
            extras = self._extras(predictions)
            link.reply = p.encode_forceready(
                energies, forces, virials, extras, batched=message.batched
            )
            return None
        if isinstance(message, p.ShmPosData):
            self._check_idle(link)
            if message.segment_names is not None:
                link.shm = ShmSegments(
                    message.segment_names, message.natoms, link.decoder.batch_size
                )
            if link.shm is None or link.shm.natoms != message.natoms:
                raise p.ProtocolError("shm POSDATA before the segments were named")
            cells, positions = link.shm.read()
            structures = await self._structures(cells, positions, self._numbers_for(message.natoms))
            predictions = await self._evaluate_watched(link, structures)
            link.shm_results = results_to_wire(predictions, structures)
            link.reply = p.encode_shm_forceready(self._extras(predictions))
            return None
        if isinstance(message, p.GetForce):
            if link.reply is None:
                raise p.ProtocolError("GETFORCE before any POSDATA")
            reply, link.reply = link.reply, None
            if link.shm_results is not None and link.shm is not None:
                # the numbers must be in place before i-PI sees FORCEREADY
                link.shm.write(*link.shm_results)
                link.shm_results = None
            return reply
        if isinstance(message, p.Exit):
            raise LinkEnded("i-PI sent EXIT")
        raise p.ProtocolError(f"unexpected message {message!r}")  # pragma: no cover

    async def _structures(
        self,
        cells: npt.NDArray[np.float64],
        positions: npt.NDArray[np.float64],
        numbers: npt.NDArray[np.int64],
    ) -> list[Structure]:
        """The message's structures, checked; raises StructureRefused."""

        warnings: list[str] = []

        def build() -> list[Structure]:
            structures = []
            for k, (cell, pos) in enumerate(zip(cells, positions, strict=True)):
                where = f" {k} of {len(cells)}" if len(cells) > 1 else ""
                try:
                    (structure,) = structures_from_wire(
                        cell[None], pos[None], numbers, self.options.pbc, self.options.arrays
                    )
                    if self.options.validate is not None:
                        warning = self.options.validate(structure)
                        if warning:
                            warnings.append(f"the structure{where} i-PI sent: {warning}")
                except StructureError as exc:
                    raise StructureRefused(
                        f"refusing the structure{where} i-PI sent: {exc}"
                    ) from None
                structures.append(structure)
            return structures

        if positions.size // 3 >= _THREAD_CHECK_ATOMS and self.options.validate is not None:
            structures = await asyncio.to_thread(build)
        else:
            structures = build()
        if warnings:
            self._warn(warnings[0])
            self._warnings_unlogged += len(warnings) - 1
        return structures

    def _check_idle(self, link: _Link) -> None:
        if link.reply is not None:
            raise p.ProtocolError("POSDATA while the previous results were not collected")
        # a server that skips INIT (allowed by some engines) gets the classic protocol
        link.initialized = True

    def _numbers_for(self, natoms: int) -> npt.NDArray[np.int64]:
        if natoms != self.numbers.size:
            raise p.ProtocolError(
                f"i-PI sent {natoms} atoms but the species template has {self.numbers.size}"
            )
        return self.numbers

    def _extras(self, predictions: Sequence[Prediction]) -> list[str]:
        if not self.options.extras:
            return [""] * len(predictions)
        return [extras_json(pred, self.options.model_name) for pred in predictions]

    async def _evaluate_watched(self, link: _Link, structures: list[Structure]) -> list[Prediction]:
        """:meth:`_evaluate`, reading the socket meanwhile: if i-PI closes the connection
        before the step is answered, the step is cancelled (the engine drops what it has
        not started computing) and the link ends. Bytes read meanwhile (i-PI's STATUS
        polls) wait in ``link.early`` for the step to end."""
        evaluation = asyncio.ensure_future(self._evaluate(structures))
        if link.reader is None:
            return await evaluation
        reader = link.reader
        reading: asyncio.Future[bytes] | None = None
        try:
            while len(link.early) < _EARLY_MAX:
                reading = asyncio.ensure_future(reader.read(_READ_CHUNK))
                waiting: set[asyncio.Future[Any]] = {evaluation, reading}
                await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
                if not reading.done():
                    break
                data = reading.result()  # a reset raises here: the link ends
                if not data:
                    if evaluation.done():
                        break  # answered already; the loop then meets the end of file
                    raise LinkEnded("i-PI closed the connection while its step was computed")
                link.early += data
                if evaluation.done():
                    break
            return await evaluation
        finally:
            for task in (reading, evaluation):
                if task is not None and not task.done():
                    # a read cancelled before data came leaves it in the reader's buffer
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await task

    async def _evaluate(self, structures: list[Structure]) -> list[Prediction]:
        """Evaluate, sending consecutive duplicates (i-PI's batch padding) once."""
        self.state = ConnectionState.COMPUTING
        start = time.perf_counter()
        unique: list[Structure] = []
        index: list[int] = []
        for structure in structures:
            if self.options.dedupe and unique and _same(unique[-1], structure):
                index.append(len(unique) - 1)
            else:
                unique.append(structure)
                index.append(len(unique) - 1)
        try:
            results = await self.evaluate(unique, source=self.source)
        finally:
            self.state = ConnectionState.IDLE
        if len(results) != len(unique):
            raise ValueError(f"evaluator returned {len(results)} results for {len(unique)}")
        self.steps += 1
        self.structures += len(structures)
        self.last_step_seconds = time.perf_counter() - start
        return [results[i] for i in index]


def _same(a: Structure, b: Structure) -> bool:
    return (
        np.array_equal(a.positions, b.positions)
        and np.array_equal(a.cell, b.cell)
        and np.array_equal(a.pbc, b.pbc)
    )
