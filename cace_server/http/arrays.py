"""Arrays in request and response bodies: nested lists (JSON) or packed bytes (msgpack).

A packed array is a map ``{"shape": [n, 3], "dtype": "<f8", "data": <bytes>}`` holding
the raw little-endian values in C order. ``dtype`` is ``"<f8"`` for floats (and may
be ``"<i8"``, ``"<i4"`` or ``"|u1"`` for atomic numbers). Reading either form gives a
numpy array of a checked shape; errors name the field.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import numpy.typing as npt

from cace_server.http.errors import invalid

FLOAT_DTYPES = frozenset({"<f8"})
INT_DTYPES = frozenset({"<i8", "<i4", "|u1", "<u1"})
_PACKED_KEYS = frozenset({"shape", "dtype", "data"})


def _unpack(value: Mapping[str, Any], field: str, allowed: frozenset[str]) -> npt.NDArray[Any]:
    if set(value) != _PACKED_KEYS:
        raise invalid(
            f"a packed array is a map with exactly the keys shape, dtype and data, "
            f"got {sorted(map(str, value))}",
            field,
        )
    shape, dtype, data = value["shape"], value["dtype"], value["data"]
    if not isinstance(dtype, str) or dtype not in allowed:
        raise invalid(
            f"packed dtype must be one of {sorted(allowed)}, got {str(dtype)[:40]!r}", field
        )
    if not isinstance(data, bytes | bytearray | memoryview):
        raise invalid("packed data must be raw bytes (msgpack bin)", field)
    if (
        not isinstance(shape, list | tuple)
        or len(shape) > 2
        or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape)
    ):
        raise invalid("packed shape must be a list of at most 2 non-negative integers", field)
    dt = np.dtype(dtype)
    # Python integers: a declared shape such as [2**61, 8] must not wrap around.
    count = math.prod(shape)
    if count * dt.itemsize != len(data):
        raise invalid(
            f"packed data holds {len(data)} bytes, shape {list(shape)} of {dtype} "
            f"needs {count * dt.itemsize}",
            field,
        )
    return np.frombuffer(data, dtype=dt).reshape(shape)


def read_floats(value: Any, field: str) -> npt.NDArray[np.float64]:
    """A float array from nested lists of numbers or a packed array."""
    if isinstance(value, Mapping):
        return _unpack(value, field, FLOAT_DTYPES).astype(np.float64)
    if not isinstance(value, list | tuple):
        raise invalid(f"expected an array of numbers, got {_kind(value)}", field)
    try:
        arr = np.asarray(value)
    except (ValueError, TypeError, OverflowError):
        raise invalid(
            "expected a rectangular array of numbers (rows of equal length)", field
        ) from None
    if arr.dtype.kind not in "iuf" or arr.dtype == np.bool_:
        if arr.size == 0:
            return np.zeros(arr.shape, dtype=np.float64)
        raise invalid("expected numbers only (no strings, booleans or nulls)", field)
    return arr.astype(np.float64)


def read_ints(value: Any, field: str) -> npt.NDArray[np.int64]:
    """A 1-D integer array from a list of integers or a packed array."""
    if isinstance(value, Mapping):
        arr = _unpack(value, field, INT_DTYPES).astype(np.int64)
    else:
        if not isinstance(value, list | tuple):
            raise invalid(f"expected a list of integers, got {_kind(value)}", field)
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            raise invalid("expected a list of integers", field)
        try:
            arr = np.asarray(value, dtype=np.int64)
        except OverflowError:
            raise invalid("atomic numbers must lie in 1..118", field) from None
    if arr.ndim != 1:
        raise invalid(f"expected a flat list, got shape {list(arr.shape)}", field)
    return arr


def pack(array: npt.NDArray[Any]) -> dict[str, Any]:
    """The packed (msgpack) form of a float array."""
    arr = np.ascontiguousarray(array, dtype="<f8")
    return {"shape": list(arr.shape), "dtype": "<f8", "data": arr.tobytes()}


def _kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__
