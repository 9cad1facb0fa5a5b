"""Request bodies from ASE atoms or dicts, and replies back to numpy (JSON or msgpack)."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

try:  # optional: the compact binary format
    import msgpack
except ImportError:  # pragma: no cover - exercised only without msgpack
    msgpack = None

JSON = "application/json"
MSGPACK = "application/msgpack"
PER_ATOM = (
    "forces",
    "energies",
    "charges",
    "bec",
    "forces_uncertainty",
    "committee_energies",
    "committee_forces",
)
MATRICES = ("stress", "stress_tensor", "virial", "dipole", "committee_virials")


def have_msgpack() -> bool:
    return msgpack is not None


def _packed(array: Any) -> dict[str, Any]:
    arr = np.ascontiguousarray(array, dtype="<f8")
    return {"shape": list(arr.shape), "dtype": "<f8", "data": arr.tobytes()}


def structure_body(item: Any, binary: bool, inputs: Sequence[str] = ()) -> dict[str, Any]:
    """The structure fields of a request from ``ase.Atoms`` or a ready dict.

    ``inputs``: names of per-atom arrays of the atoms (``atoms.arrays``) that the model
    reads; they are sent as the request's ``arrays``.
    """
    if isinstance(item, Mapping):
        return dict(item)
    if not hasattr(item, "get_positions"):
        raise TypeError(f"expected ase.Atoms or a dict, got {type(item).__name__}")
    positions = item.get_positions()
    body: dict[str, Any] = {
        "numbers": [int(z) for z in item.get_atomic_numbers()],
        "positions": _packed(positions) if binary else positions.tolist(),
        "pbc": [bool(p) for p in item.get_pbc()],
    }
    cell = np.asarray(item.get_cell())
    if cell.any():
        body["cell"] = cell.tolist()
    if inputs:
        arrays = {}
        for name in inputs:
            if name not in item.arrays:
                raise ValueError(
                    f"the model needs the per-atom input {name!r}: set atoms.arrays[{name!r}] "
                    "(one value per atom)"
                )
            value = np.asarray(item.arrays[name], dtype=np.float64)
            arrays[name] = _packed(value) if binary else value.tolist()
        body["arrays"] = arrays
    return body


def encode(body: dict[str, Any], binary: bool) -> tuple[bytes, dict[str, str]]:
    if binary:
        assert msgpack is not None
        content = msgpack.packb(body, use_bin_type=True)
        return content, {"content-type": MSGPACK, "accept": MSGPACK}
    return json.dumps(body).encode(), {"content-type": JSON, "accept": JSON}


def decode(content: bytes, content_type: str) -> Any:
    if content_type.split(";")[0].strip() == MSGPACK:
        if msgpack is None:  # pragma: no cover
            raise RuntimeError("the server replied in msgpack, which is not installed")
        return msgpack.unpackb(content, raw=False)
    return json.loads(content)


def _array(value: Any) -> np.ndarray | None:
    if value is None:
        return None
    if isinstance(value, Mapping):
        return np.frombuffer(value["data"], dtype=value["dtype"]).reshape(value["shape"]).copy()
    return np.asarray(value, dtype=np.float64)


def result(raw: Mapping[str, Any]) -> dict[str, Any]:
    """One result with numpy arrays (per-atom arrays, stress and virial)."""
    out = dict(raw)
    for key in (*PER_ATOM, *MATRICES):
        if key in out:
            out[key] = _array(out[key])
    return out


def batch_body(
    items: Sequence[Any],
    properties: Sequence[str] | None,
    model: str | None,
    binary: bool,
    inputs: Sequence[str] = (),
) -> dict[str, Any]:
    body: dict[str, Any] = {"structures": [structure_body(i, binary, inputs) for i in items]}
    if properties is not None:
        body["properties"] = list(properties)
    if model is not None:
        body["model"] = model
    return body
