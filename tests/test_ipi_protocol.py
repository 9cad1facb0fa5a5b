"""The i-PI codec on hand-built byte strings: no sockets, no i-PI."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from cace_server.ipi import protocol as p
from cace_server.ipi.address import parse_address
from cace_server.ipi.convert import extras_json, results_to_wire, structures_from_wire
from cace_server.structures import Prediction, Structure
from cace_server.units import ANGSTROM_PER_BOHR, BOHR_PER_ANGSTROM, HARTREE_PER_EV


def hdr(name: str) -> bytes:
    return name.encode().ljust(12, b" ")


def i32(v: int) -> bytes:
    return struct.pack("<i", v)


def f64(*values: float) -> bytes:
    return struct.pack(f"<{len(values)}d", *values)


H = np.array([[10.0, 1.0, 0.5], [0.0, 9.0, 0.3], [0.0, 0.0, 8.0]])  # i-PI: columns = vectors
POS = np.arange(9, dtype=float).reshape(3, 3) * 0.1


def classic_posdata(h: np.ndarray = H, pos: np.ndarray = POS) -> bytes:
    return (
        hdr("POSDATA")
        + f64(*h.ravel())
        + f64(*np.linalg.inv(h).ravel())
        + i32(len(pos))
        + f64(*pos.ravel())
    )


def test_units_are_ipis() -> None:
    from ipi.utils.units import unit_to_internal

    assert unit_to_internal("length", "angstrom", 1.0) == BOHR_PER_ANGSTROM
    assert unit_to_internal("energy", "electronvolt", 1.0) == HARTREE_PER_EV


def test_simple_messages_and_init() -> None:
    d = p.DriverDecoder()
    text = b" a : 1 , "
    msgs = d.feed(hdr("STATUS") + hdr("INIT") + i32(3) + i32(len(text)) + text + hdr("GETFORCE"))
    assert msgs == [p.Status(), p.Init(3, " a : 1 , "), p.GetForce()]
    assert d.batch_size == 1
    assert d.feed(hdr("EXIT")) == [p.Exit()]


@pytest.mark.parametrize(
    ("text", "size"),
    [(" ", 1), (" batch_size:8", 8), (" a : 1 , , batch_size: 4", 4), ("x:batch_size", 1)],
)
def test_batch_size_from_init_string(text: str, size: int) -> None:
    assert p.parse_batch_size(text) == size


@pytest.mark.parametrize("text", ["batch_size:zero", "batch_size:0", "batch_size:-2"])
def test_bad_batch_size_is_an_error(text: str) -> None:
    with pytest.raises(p.ProtocolError, match="batch_size"):
        p.DriverDecoder().feed(hdr("INIT") + i32(0) + i32(len(text)) + text.encode())


def test_classic_posdata_layout() -> None:
    (msg,) = p.DriverDecoder().feed(classic_posdata())
    assert isinstance(msg, p.PosData) and not msg.batched
    assert msg.natoms == 3 and msg.batch_size == 1
    np.testing.assert_array_equal(msg.cells[0], H)
    np.testing.assert_array_equal(msg.positions[0], POS)
    # the cell's columns are the lattice vectors: ASE's cell is the transpose
    (s,) = structures_from_wire(msg.cells, msg.positions, np.array([8, 1, 1]))
    np.testing.assert_allclose(s.cell, H.T * ANGSTROM_PER_BOHR)
    np.testing.assert_allclose(s.cell[0], [10 * ANGSTROM_PER_BOHR, 0, 0])
    np.testing.assert_allclose(s.positions, POS * ANGSTROM_PER_BOHR)
    assert s.pbc.all()


def test_zero_cell_is_not_periodic() -> None:
    (msg,) = p.DriverDecoder().feed(classic_posdata(h=np.zeros((3, 3)) + 1e-30 * np.eye(3)))
    (s,) = structures_from_wire(msg.cells, msg.positions, np.array([8, 1, 1]))
    assert not s.pbc.any()


def test_byte_by_byte_and_pipelined() -> None:
    """Truncated input waits; messages split anywhere or glued together decode the same."""
    stream = hdr("STATUS") + classic_posdata() + hdr("GETFORCE") + hdr("STATUS")
    d = p.DriverDecoder()
    out = []
    for i in range(len(stream)):
        out += d.feed(stream[i : i + 1])
        if i < 11:
            assert out == [] and d.pending == i + 1
    assert [type(m) for m in out] == [p.Status, p.PosData, p.GetForce, p.Status]
    assert d.pending == 0


def test_batched_posdata_layout() -> None:
    text = b" batch_size:2"
    h2 = H * 1.1
    pos2 = POS + 5.0
    init = hdr("INIT") + i32(0) + i32(len(text)) + text
    posdata = (
        hdr("POSDATA")
        + i32(3)
        + f64(*H.ravel(), *np.linalg.inv(H).ravel())
        + f64(*h2.ravel(), *np.linalg.inv(h2).ravel())
        + f64(*POS.ravel(), *pos2.ravel())
    )
    d = p.DriverDecoder()
    first, msg = d.feed(init + posdata)
    assert isinstance(first, p.Init) and first.batch_size == 2 and d.batch_size == 2
    assert isinstance(msg, p.PosData) and msg.batched and msg.batch_size == 2
    np.testing.assert_array_equal(msg.cells[1], h2)
    np.testing.assert_array_equal(msg.inverse_cells[0], np.linalg.inv(H))
    np.testing.assert_array_equal(msg.positions[1], pos2)
    # our server-side encoders (used by tests and benchmarks) write the same bytes
    assert p.encode_batched_posdata([H, h2], [POS, pos2]) == posdata
    assert p.encode_init(0, text.decode()) == init


def test_shm_posdata_names_only_first() -> None:
    names = [f"ipi_shm_1_2_{k}" for k in p.SHM_SEGMENTS]
    first = hdr("POSDATA") + i32(5) + b"".join(i32(len(n)) + n.encode() for n in names)
    d = p.DriverDecoder(shm=True)
    assert d.feed(first[:-3]) == []
    (msg,) = d.feed(first[-3:])
    assert msg == p.ShmPosData(5, tuple(names))
    (again,) = d.feed(hdr("POSDATA") + i32(5))
    assert again == p.ShmPosData(5, None)


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"HELLO WORLD!", "unknown message header"),
        (b"\x00" * 12, "unknown message header"),
        (hdr("READY"), "driver's message"),
        (hdr("POSDATA") + f64(*H.ravel(), *H.ravel()) + i32(0), "atom count 0"),
        (hdr("POSDATA") + f64(*H.ravel(), *H.ravel()) + i32(-5), "atom count -5"),
        (hdr("POSDATA") + f64(*H.ravel(), *H.ravel()) + i32(2**31 - 1), "atom count"),
        (hdr("INIT") + i32(0) + i32(-1), "INIT string length -1"),
        (hdr("INIT") + i32(0) + i32(1 << 30), "INIT string length"),
        (classic_posdata(pos=np.full((3, 3), np.nan)), "NaN"),
    ],
)
def test_garbage_raises(data: bytes, match: str) -> None:
    d = p.DriverDecoder()
    with pytest.raises(p.ProtocolError, match=match):
        d.feed(data)
    with pytest.raises(p.ProtocolError):  # the stream stays failed
        d.feed(hdr("STATUS"))


def test_shm_bad_name() -> None:
    data = hdr("POSDATA") + i32(1) + i32(3) + b"a/b"
    with pytest.raises(p.ProtocolError, match="segment name"):
        p.DriverDecoder(shm=True).feed(data)


def test_classic_forceready_layout() -> None:
    forces = np.arange(6, dtype=float).reshape(1, 2, 3)
    virial = np.arange(9, dtype=float).reshape(1, 3, 3) + 10
    out = p.encode_forceready([-1.5], forces, virial, ['{"a":1}'], batched=False)
    expected = (
        hdr("FORCEREADY")
        + f64(-1.5)
        + i32(2)
        + f64(*range(6))
        + f64(*range(10, 19))
        + i32(7)
        + b'{"a":1}'
    )
    assert out == expected
    (msg,) = p.ServerDecoder().feed(out)
    assert isinstance(msg, p.ForceReady) and msg.extras == ('{"a":1}',)
    np.testing.assert_array_equal(msg.virials, virial)


def test_batched_forceready_layout() -> None:
    forces = np.arange(12, dtype=float).reshape(2, 2, 3)
    virials = np.stack([np.eye(3), 2 * np.eye(3)])
    out = p.encode_forceready([1.0, 2.0], forces, virials, ["x", ""], batched=True)
    expected = (
        hdr("FORCEREADY")
        + f64(1.0, 2.0)
        + i32(2)
        + f64(*range(12))
        + f64(*np.eye(3).ravel(), *(2 * np.eye(3)).ravel())
        + i32(1)
        + b"x"
        + i32(0)
    )
    assert out == expected
    (msg,) = p.ServerDecoder(batch_size=2).feed(out)
    np.testing.assert_array_equal(msg.energies, [1.0, 2.0])
    assert msg.extras == ("x", "")


def test_shm_forceready_and_status_replies() -> None:
    assert p.encode_shm_forceready(["ab", ""]) == hdr("FORCEREADY") + i32(2) + b"ab" + i32(0)
    assert p.encode_status_reply("ready") == hdr("READY")
    with pytest.raises(ValueError):
        p.encode_status_reply("bogus")
    msgs = p.ServerDecoder().feed(hdr("NEEDINIT") + hdr("HAVEDATA"))
    assert msgs == [p.StatusReply("NEEDINIT"), p.StatusReply("HAVEDATA")]


def test_results_to_wire_units_and_virial() -> None:
    s = Structure.create([1, 8], [[0, 0, 0], [1, 0, 0]], np.diag([5.0, 6.0, 7.0]), True)
    stress = np.array([[1.0, 0.2, 0.0], [0.2, 2.0, 0.0], [0.0, 0.0, 3.0]]) * 1e-3
    pred = Prediction(energy=2.0, forces=np.ones((2, 3)), stress=stress)
    e, f, v = results_to_wire([pred], [s])
    assert e[0] == 2.0 * HARTREE_PER_EV
    np.testing.assert_allclose(f[0], HARTREE_PER_EV / BOHR_PER_ANGSTROM)
    np.testing.assert_allclose(v[0], -stress * s.volume * HARTREE_PER_EV)
    with pytest.raises(ValueError, match="NaN"):
        results_to_wire([Prediction(energy=float("nan"), forces=np.ones((2, 3)))], [s])
    with pytest.raises(ValueError, match="no forces"):
        results_to_wire([Prediction(energy=1.0)], [s])


def test_extras_json() -> None:
    pred = Prediction(
        energy=-3.5,
        forces=np.zeros((2, 3)),
        charges=np.array([0.5, -0.5]),
        extras={"raw": "x", "model": "other", "n": np.int64(3), "bad": object()},
    )
    data = json.loads(extras_json(pred, "water"))
    assert data == {"model": "water", "energy_eV": -3.5, "charges": [0.5, -0.5], "n": 3}
    assert json.loads(extras_json(Prediction(energy=1.0))) == {"energy_eV": 1.0}


@pytest.mark.parametrize(
    ("text", "path", "host", "port", "shm"),
    [
        ("unix:water", "/tmp/ipi_water", None, None, False),
        ("shm:water", "/tmp/ipi_water", None, None, True),
        ("unix:/run/x/sock", "/run/x/sock", None, None, False),
        ("localhost:31415", None, "localhost", 31415, False),
        ("tcp:127.0.0.1:8000", None, "127.0.0.1", 8000, False),
        ("[::1]:9000", None, "::1", 9000, False),
        (":1234", None, "localhost", 1234, False),
    ],
)
def test_addresses(text: str, path: str, host: str, port: int, shm: bool) -> None:
    a = parse_address(text)
    assert (a.path, a.host, a.port, a.shm) == (path, host, port, shm)


@pytest.mark.parametrize(
    "text", ["water", "unix:", "host:port", "host:0", "[::1]9000", "unix:" + "x" * 200]
)
def test_bad_addresses(text: str) -> None:
    with pytest.raises(ValueError, match="i-PI address"):
        parse_address(text)
