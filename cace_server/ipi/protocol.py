"""The i-PI socket protocol as a pure codec: bytes in, messages out, no sockets.

i-PI (the *server*) listens; a force code (the *driver*, us) connects and answers.
Every message starts with a 12-byte ASCII header, upper case, space padded
(``b"POSDATA     "``). Numbers travel in the machine's native byte order, as numpy's
``tobytes()`` writes them: ``int32`` counts and ``float64`` values, atomic units
(Bohr, Hartree). The layouts below were read from ``ipi/interfaces/sockets.py``
(server side) and the ``i-pi-py_driver`` script (driver side) of ipi 3.3.1, and are
checked against the real ``i-pi`` program by ``tests/test_ipi_driver.py``.

Server -> driver::

    STATUS                                   (driver answers with a bare header)
    INIT      int32 bead_index, int32 n, n bytes init string
    POSDATA   classic:  float64[9] h, float64[9] h^-1, int32 natoms,
                        float64[3*natoms] positions
              batched:  int32 natoms, batch x (float64[9] h, float64[9] h^-1),
                        float64[batch*3*natoms] positions           (batch from INIT)
              shm:      int32 natoms, and on the first POSDATA of a connection only,
                        6 x (int32 n, n bytes name) naming the shared-memory
                        segments pos, h, ih, pot, force, vir
    GETFORCE
    EXIT

Driver -> server::

    NEEDINIT | READY | HAVEDATA               (answers to STATUS)
    FORCEREADY  classic:  float64 energy, int32 natoms, float64[3*natoms] forces,
                          float64[9] virial, int32 n, n bytes extras
                batched:  float64[batch] energies, int32 natoms,
                          float64[batch*3*natoms] forces, float64[batch*9] virials,
                          batch x (int32 n, n bytes extras)
                shm:      batch x (int32 n, n bytes extras); the numbers were
                          written to the pot/force/vir segments before the header

Batching is announced by i-PI in the INIT string: ``"<pars>, batch_size:N"`` (the
token is only present when N > 1; i-PI pads a short batch with copies of its last
structure). ``shm`` is not announced on the wire: both ends are configured for it
(i-PI ``<ffsocket mode="shm">``, our address ``shm:NAME``); its control channel is
the UNIX socket and it uses the batch size from INIT (1 when absent).

``h`` is i-PI's cell matrix, whose *columns* are the lattice vectors; a 3x3 block read
in C order from the wire is ``h`` itself, so ASE's cell (rows) is its transpose. The
virial is sent the same way ASE's and i-PI's own drivers send it: ``virial.T`` in C
order, ``virial = -stress * volume`` (i-PI then reports ``virial/V`` as the potential
part of its ``stress_md``; see the tests).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

HEADER_LEN = 12

_F64 = np.dtype(np.float64)
_I32 = struct.Struct("=i")
_F64S = struct.Struct("=d")


def _header(name: str) -> bytes:
    return name.upper().ljust(HEADER_LEN).encode("ascii")


STATUS = _header("STATUS")
INIT = _header("INIT")
POSDATA = _header("POSDATA")
GETFORCE = _header("GETFORCE")
EXIT = _header("EXIT")
NEEDINIT = _header("NEEDINIT")
READY = _header("READY")
HAVEDATA = _header("HAVEDATA")
FORCEREADY = _header("FORCEREADY")

SERVER_HEADERS = frozenset({STATUS, INIT, POSDATA, GETFORCE, EXIT})
DRIVER_HEADERS = frozenset({NEEDINIT, READY, HAVEDATA, FORCEREADY})

#: Order of the shared-memory segment names in the first shm POSDATA.
SHM_SEGMENTS = ("pos", "h", "ih", "pot", "force", "vir")

DEFAULT_MAX_ATOMS = 1_000_000
DEFAULT_MAX_BATCH = 4096
DEFAULT_MAX_STRING = 1 << 20  # INIT and extras strings
DEFAULT_MAX_PAYLOAD = 1 << 30  # one message's numeric payload, bytes
_MAX_SHM_NAME = 255


class ProtocolError(Exception):
    """The peer sent bytes that are not a valid i-PI message here; the message says why."""


# ---------------------------------------------------------------- messages


@dataclass(frozen=True)
class Status:
    """STATUS: the server asks the driver for its state."""


@dataclass(frozen=True)
class Init:
    """INIT: bead (replica) index and the free-form init string."""

    bead_index: int
    init_string: str

    @property
    def batch_size(self) -> int:
        """The batch size announced in the init string (1 when absent)."""
        return parse_batch_size(self.init_string)


@dataclass(frozen=True)
class PosData:
    """POSDATA over the socket, classic (batch of 1) or batched.

    ``cells`` are i-PI's ``h`` matrices as they come off the wire (columns are the
    lattice vectors), ``positions`` has shape ``(batch, natoms, 3)``; all in Bohr.
    """

    cells: npt.NDArray[np.float64]
    inverse_cells: npt.NDArray[np.float64]
    positions: npt.NDArray[np.float64]
    batched: bool

    @property
    def natoms(self) -> int:
        return int(self.positions.shape[1])

    @property
    def batch_size(self) -> int:
        return int(self.positions.shape[0])


@dataclass(frozen=True)
class ShmPosData:
    """POSDATA of the shm transport: the structures wait in shared memory.

    ``segment_names`` (in :data:`SHM_SEGMENTS` order) is only sent with the first
    POSDATA of a connection; later ones carry ``None``.
    """

    natoms: int
    segment_names: tuple[str, ...] | None


@dataclass(frozen=True)
class GetForce:
    """GETFORCE: the server asks for the results of the last POSDATA."""


@dataclass(frozen=True)
class Exit:
    """EXIT: the server is done with this driver."""


@dataclass(frozen=True)
class StatusReply:
    """NEEDINIT, READY or HAVEDATA (``state`` is the header without padding)."""

    state: str


@dataclass(frozen=True)
class ForceReady:
    """FORCEREADY over the socket (classic: batch of 1). Atomic units.

    ``virials`` are the 3x3 blocks as read from the wire (C order).
    """

    energies: npt.NDArray[np.float64]
    forces: npt.NDArray[np.float64]
    virials: npt.NDArray[np.float64]
    extras: tuple[str, ...]


@dataclass(frozen=True)
class ShmForceReady:
    """FORCEREADY of the shm transport: only the extras strings travel."""

    extras: tuple[str, ...]


ServerMessage = Status | Init | PosData | ShmPosData | GetForce | Exit
DriverMessage = StatusReply | ForceReady | ShmForceReady


def parse_batch_size(init_string: str) -> int:
    """Read ``batch_size:N`` from a comma-separated INIT string; 1 when absent.

    Raises :class:`ProtocolError` when the token is present but not a positive integer.
    """
    for token in init_string.split(","):
        key, sep, value = token.partition(":")
        if sep and key.strip() == "batch_size":
            try:
                size = int(value.strip())
            except ValueError:
                raise ProtocolError("INIT string has a non-integer batch_size") from None
            if size < 1:
                raise ProtocolError(f"INIT string has batch_size {size} < 1")
            return size
    return 1


def _show(header: bytes) -> str:
    """A header for an error message: a protocol word by name, anything else not at all.

    Error messages reach logs and the HTTP status of connections; echoing what a
    peer sent would let anyone who can attach the server to an address read the
    first bytes of whatever service listens there.
    """
    if header in SERVER_HEADERS or header in DRIVER_HEADERS:
        return repr(bytes(header).decode("ascii").strip())
    return f"({len(header)} bytes that are no i-PI message)"


# ---------------------------------------------------------------- decoding


class _Reader:
    """Cursor over a byte buffer; every read returns None when the bytes are not there yet."""

    __slots__ = ("buf", "pos")

    def __init__(self, buf: bytearray, pos: int) -> None:
        self.buf = buf
        self.pos = pos

    def have(self, n: int) -> bool:
        return len(self.buf) - self.pos >= n

    def int32(self) -> int | None:
        if not self.have(4):
            return None
        (value,) = _I32.unpack_from(self.buf, self.pos)
        self.pos += 4
        return int(value)

    def f64(self, count: int) -> npt.NDArray[np.float64] | None:
        nbytes = 8 * count
        if not self.have(nbytes):
            return None
        out = np.frombuffer(self.buf, dtype=_F64, count=count, offset=self.pos).copy()
        self.pos += nbytes
        return out

    def raw(self, n: int) -> bytes | None:
        if not self.have(n):
            return None
        out = bytes(self.buf[self.pos : self.pos + n])
        self.pos += n
        return out


class _Decoder:
    """Common incremental machinery: feed bytes, get whole messages back."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._pos = 0
        self._failed: ProtocolError | None = None

    @property
    def pending(self) -> int:
        """Bytes received that do not form a whole message yet."""
        return len(self._buf) - self._pos

    def feed(self, data: bytes) -> list[ServerMessage | DriverMessage]:
        """Add received bytes; return every message they complete, in order.

        An incomplete message stays buffered until more bytes come. Invalid bytes raise
        :class:`ProtocolError`, and so does every later call: a stream that went wrong
        once has lost its framing.
        """
        if self._failed is not None:
            raise self._failed
        self._buf += data
        out: list[ServerMessage | DriverMessage] = []
        try:
            while len(self._buf) - self._pos >= HEADER_LEN:
                reader = _Reader(self._buf, self._pos + HEADER_LEN)
                header = bytes(self._buf[self._pos : self._pos + HEADER_LEN])
                message = self._parse(header, reader)
                if message is None:
                    break
                out.append(message)
                self._pos = reader.pos
        except ProtocolError as exc:
            self._failed = exc
            raise
        if self._pos > 0 and (self._pos == len(self._buf) or self._pos > 1 << 16):
            del self._buf[: self._pos]
            self._pos = 0
        return out

    def _parse(self, header: bytes, reader: _Reader) -> ServerMessage | DriverMessage | None:
        raise NotImplementedError

    @staticmethod
    def _string(reader: _Reader, what: str, limit: int) -> str | None:
        n = reader.int32()
        if n is None:
            return None
        if n < 0 or n > limit:
            raise ProtocolError(f"{what} length {n} outside 0..{limit}")
        raw = reader.raw(n)
        if raw is None:
            return None
        return raw.decode("utf-8", errors="replace")


class DriverDecoder(_Decoder):
    """Decodes what i-PI sends to a driver (STATUS, INIT, POSDATA, GETFORCE, EXIT).

    The POSDATA layout depends on the transport (``shm``) and on the batch size
    announced by the last INIT, which this decoder tracks itself.
    """

    def __init__(
        self,
        *,
        shm: bool = False,
        max_atoms: int = DEFAULT_MAX_ATOMS,
        max_batch: int = DEFAULT_MAX_BATCH,
        max_string: int = DEFAULT_MAX_STRING,
        max_payload: int = DEFAULT_MAX_PAYLOAD,
    ) -> None:
        super().__init__()
        self.shm = shm
        self.batch_size = 1
        self.max_atoms = max_atoms
        self.max_batch = max_batch
        self.max_string = max_string
        self.max_payload = max_payload
        self._shm_names_seen = False

    def _parse(self, header: bytes, reader: _Reader) -> ServerMessage | None:
        if header == STATUS:
            return Status()
        if header == GETFORCE:
            return GetForce()
        if header == EXIT:
            return Exit()
        if header == INIT:
            return self._parse_init(reader)
        if header == POSDATA:
            if self.shm:
                return self._parse_shm_posdata(reader)
            if self.batch_size > 1:
                return self._parse_batched_posdata(reader)
            return self._parse_classic_posdata(reader)
        if header in DRIVER_HEADERS:
            raise ProtocolError(f"got the driver's message {_show(header)} from the server")
        raise ProtocolError(f"unknown message header {_show(header)}")

    def _parse_init(self, reader: _Reader) -> Init | None:
        bead = reader.int32()
        if bead is None:
            return None
        text = self._string(reader, "INIT string", self.max_string)
        if text is None:
            return None
        message = Init(bead, text)
        size = message.batch_size
        if size > self.max_batch:
            raise ProtocolError(f"INIT batch_size {size} exceeds the limit {self.max_batch}")
        if self.shm and self._shm_names_seen and size != self.batch_size:
            raise ProtocolError("batch_size changed after the shared memory was attached")
        self.batch_size = size
        return message

    def _check_natoms(self, natoms: int, batch: int) -> None:
        if natoms < 1 or natoms > self.max_atoms:
            raise ProtocolError(f"POSDATA atom count {natoms} outside 1..{self.max_atoms}")
        if 8 * (18 + 3 * natoms) * batch > self.max_payload:
            raise ProtocolError(
                f"POSDATA of {batch} x {natoms} atoms exceeds {self.max_payload} bytes"
            )

    @staticmethod
    def _check_finite(message: PosData) -> PosData:
        if not (np.isfinite(message.cells).all() and np.isfinite(message.positions).all()):
            raise ProtocolError("POSDATA contains NaN or infinite cell or positions")
        return message

    def _parse_classic_posdata(self, reader: _Reader) -> PosData | None:
        if not reader.have(2 * 72 + 4):
            return None
        cell = reader.f64(9)
        inverse = reader.f64(9)
        natoms = reader.int32()
        assert cell is not None and inverse is not None and natoms is not None
        self._check_natoms(natoms, 1)
        positions = reader.f64(3 * natoms)
        if positions is None:
            return None
        return self._check_finite(
            PosData(
                cells=cell.reshape(1, 3, 3),
                inverse_cells=inverse.reshape(1, 3, 3),
                positions=positions.reshape(1, natoms, 3),
                batched=False,
            )
        )

    def _parse_batched_posdata(self, reader: _Reader) -> PosData | None:
        batch = self.batch_size
        natoms = reader.int32()
        if natoms is None:
            return None
        self._check_natoms(natoms, batch)
        if not reader.have(8 * batch * (18 + 3 * natoms)):
            return None
        cells = reader.f64(18 * batch)
        positions = reader.f64(3 * natoms * batch)
        assert cells is not None and positions is not None
        blocks = cells.reshape(batch, 2, 3, 3)
        return self._check_finite(
            PosData(
                cells=blocks[:, 0].copy(),
                inverse_cells=blocks[:, 1].copy(),
                positions=positions.reshape(batch, natoms, 3),
                batched=True,
            )
        )

    def _parse_shm_posdata(self, reader: _Reader) -> ShmPosData | None:
        natoms = reader.int32()
        if natoms is None:
            return None
        self._check_natoms(natoms, self.batch_size)
        if self._shm_names_seen:
            return ShmPosData(natoms, None)
        names = []
        for kind in SHM_SEGMENTS:
            name = self._string(reader, f"shared-memory name for {kind!r}", _MAX_SHM_NAME)
            if name is None:
                return None
            if not name or not name.isprintable() or "/" in name:
                raise ProtocolError(f"invalid shared-memory segment name ({len(name)} characters)")
            names.append(name)
        self._shm_names_seen = True
        return ShmPosData(natoms, tuple(names))


class ServerDecoder(_Decoder):
    """Decodes what a driver sends to i-PI (NEEDINIT, READY, HAVEDATA, FORCEREADY).

    The driver side does not need it; tests and benchmarks that play i-PI do.
    """

    def __init__(
        self,
        *,
        batch_size: int = 1,
        shm: bool = False,
        max_atoms: int = DEFAULT_MAX_ATOMS,
        max_string: int = DEFAULT_MAX_STRING,
    ) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.shm = shm
        self.max_atoms = max_atoms
        self.max_string = max_string

    def _parse(self, header: bytes, reader: _Reader) -> DriverMessage | None:
        if header in (NEEDINIT, READY, HAVEDATA):
            return StatusReply(header.decode("ascii").strip())
        if header == FORCEREADY:
            if self.shm:
                extras = self._extras(reader, self.batch_size)
                return None if extras is None else ShmForceReady(extras)
            return self._parse_forceready(reader)
        if header in SERVER_HEADERS:
            raise ProtocolError(f"got the server's message {_show(header)} from the driver")
        raise ProtocolError(f"unknown message header {_show(header)}")

    def _extras(self, reader: _Reader, count: int) -> tuple[str, ...] | None:
        out = []
        for _ in range(count):
            text = self._string(reader, "extras string", self.max_string)
            if text is None:
                return None
            out.append(text)
        return tuple(out)

    def _parse_forceready(self, reader: _Reader) -> ForceReady | None:
        batch = self.batch_size
        batched = batch > 1
        if batched:
            energies = reader.f64(batch)
            natoms = reader.int32()
        else:
            energies = reader.f64(1)
            natoms = reader.int32()
        if energies is None or natoms is None:
            return None
        if natoms < 0 or natoms > self.max_atoms:
            raise ProtocolError(f"FORCEREADY atom count {natoms} outside 0..{self.max_atoms}")
        forces = reader.f64(3 * natoms * batch)
        if forces is None:
            return None
        virials = reader.f64(9 * batch)
        if virials is None:
            return None
        extras = self._extras(reader, batch)
        if extras is None:
            return None
        return ForceReady(
            energies=energies,
            forces=forces.reshape(batch, natoms, 3),
            virials=virials.reshape(batch, 3, 3),
            extras=extras,
        )


# ---------------------------------------------------------------- encoding


def _f64_bytes(array: npt.ArrayLike) -> bytes:
    return np.ascontiguousarray(array, dtype=_F64).tobytes()


def _string_bytes(text: str) -> bytes:
    raw = text.encode("utf-8")
    return _I32.pack(len(raw)) + raw


def encode_status_reply(state: str) -> bytes:
    """NEEDINIT, READY or HAVEDATA."""
    header = _header(state)
    if header not in (NEEDINIT, READY, HAVEDATA):
        raise ValueError(f"not a status reply: {state!r}")
    return header


def _check_results(
    energies: npt.ArrayLike, forces: npt.ArrayLike, virials: npt.ArrayLike, extras: Sequence[str]
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    e = np.asarray(energies, dtype=_F64).reshape(-1)
    batch = e.shape[0]
    f = np.asarray(forces, dtype=_F64).reshape(batch, -1, 3)
    v = np.asarray(virials, dtype=_F64).reshape(batch, 3, 3)
    if len(extras) != batch:
        raise ValueError(f"{len(extras)} extras strings for {batch} structures")
    return e, f, v


def encode_forceready(
    energies: npt.ArrayLike,
    forces: npt.ArrayLike,
    virials: npt.ArrayLike,
    extras: Sequence[str],
    *,
    batched: bool,
) -> bytes:
    """FORCEREADY with its payload, atomic units, one bytes object (written at once).

    ``energies`` (batch,), ``forces`` (batch, natoms, 3), ``virials`` (batch, 3, 3)
    exactly as they must appear on the wire (callers transpose the virial).
    ``batched=False`` writes the classic layout and needs a batch of one.
    """
    e, f, v = _check_results(energies, forces, virials, extras)
    natoms = f.shape[1]
    if not batched:
        if e.shape[0] != 1:
            raise ValueError("the classic FORCEREADY carries exactly one structure")
        return b"".join(
            (
                FORCEREADY,
                _F64S.pack(float(e[0])),
                _I32.pack(natoms),
                f.tobytes(),
                v.tobytes(),
                _string_bytes(extras[0]),
            )
        )
    return b"".join(
        (
            FORCEREADY,
            e.tobytes(),
            _I32.pack(natoms),
            f.tobytes(),
            v.tobytes(),
            *(_string_bytes(x) for x in extras),
        )
    )


def encode_shm_forceready(extras: Sequence[str]) -> bytes:
    """FORCEREADY of the shm transport: header and one extras string per structure."""
    return FORCEREADY + b"".join(_string_bytes(x) for x in extras)


def encode_status() -> bytes:
    return STATUS


def encode_getforce() -> bytes:
    return GETFORCE


def encode_exit() -> bytes:
    return EXIT


def encode_init(bead_index: int, init_string: str) -> bytes:
    return INIT + _I32.pack(bead_index) + _string_bytes(init_string)


def encode_posdata(cell_h: npt.ArrayLike, positions: npt.ArrayLike) -> bytes:
    """Classic POSDATA (Bohr): ``cell_h`` columns are the lattice vectors."""
    h = np.asarray(cell_h, dtype=_F64).reshape(3, 3)
    pos = np.asarray(positions, dtype=_F64).reshape(-1, 3)
    return b"".join(
        (POSDATA, _f64_bytes(h), _f64_bytes(_safe_inverse(h)), _I32.pack(len(pos)), _f64_bytes(pos))
    )


def encode_batched_posdata(cells_h: npt.ArrayLike, positions: npt.ArrayLike) -> bytes:
    """Batched POSDATA (Bohr): ``cells_h`` (batch, 3, 3), ``positions`` (batch, natoms, 3)."""
    hs = np.asarray(cells_h, dtype=_F64).reshape(-1, 3, 3)
    pos = np.asarray(positions, dtype=_F64)
    pos = pos.reshape(hs.shape[0], -1, 3)
    blocks = b"".join(_f64_bytes(h) + _f64_bytes(_safe_inverse(h)) for h in hs)
    return POSDATA + _I32.pack(pos.shape[1]) + blocks + _f64_bytes(pos)


def encode_shm_posdata(natoms: int, segment_names: Sequence[str] | None) -> bytes:
    """shm POSDATA: atom count, and the segment names on the first one."""
    out = POSDATA + _I32.pack(natoms)
    if segment_names is not None:
        if len(segment_names) != len(SHM_SEGMENTS):
            raise ValueError(f"need {len(SHM_SEGMENTS)} segment names")
        out += b"".join(_string_bytes(name) for name in segment_names)
    return out


def _safe_inverse(h: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    if abs(np.linalg.det(h)) < 1e-300:
        return np.zeros((3, 3))
    return np.asarray(np.linalg.inv(h), dtype=np.float64)
