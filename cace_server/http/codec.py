"""Body formats: JSON (default) and msgpack with packed arrays, chosen per request.

Requests are read by their ``Content-Type``; replies follow ``Accept`` (a request
without one gets the format it sent). Errors are always JSON.

Why msgpack with raw float64 bytes: measured by ``benchmarks/http.py`` on this
project's 2-core CPU machine (float32 water model) for a 12,288-atom box, energy +
forces + stress, concurrency 1:

    body      request   p50 latency   model alone   HTTP share of the latency
    JSON      496 kB    1698 ms       1470 ms       13 %
    msgpack   307 kB    1483 ms       1470 ms        1 %

JSON spends its time formatting and parsing ~74k decimal numbers (repr-exact, so
no precision is lost either way); packed arrays are a memcpy. msgpack rather than
npz: one small map carries the rest of the request (species, cell, options) and of
the reply with the same field names as JSON, no zip container, and msgpack has
clients in every language. JSON stays the default (curl, any tool); the Python
client uses msgpack when it is installed.
"""

from __future__ import annotations

import json
from typing import Any

import msgpack
import numpy as np
import numpy.typing as npt
from starlette.responses import Response

from cace_server.http.arrays import pack
from cace_server.http.errors import ApiError
from cace_server.transcode import load_json

JSON = "application/json"
MSGPACK = "application/msgpack"
MSGPACK_TYPES = frozenset({MSGPACK, "application/x-msgpack", "application/vnd.msgpack"})


def media_type(header: str | None) -> str:
    return (header or "").split(";", 1)[0].strip().lower()


def decode(body: bytes, content_type: str | None, allow_binary: bool) -> dict[str, Any]:
    """The request body as a dict; 400/415 for what cannot be read."""
    kind = media_type(content_type) or JSON
    if not body:
        raise ApiError(400, "empty_body", "the request has no body")
    if kind in MSGPACK_TYPES:
        if not allow_binary:
            raise ApiError(415, "unsupported_media_type", "msgpack is disabled on this server")
        return decode_msgpack(body)
    elif is_json(content_type):
        obj, error = load_json(body)
        if error is not None:
            raise ApiError(400, "bad_json", f"body is not valid JSON: {error}")
    else:
        raise ApiError(
            415,
            "unsupported_media_type",
            f"Content-Type {kind!r} is not supported; use {JSON}"
            + (f" or {MSGPACK}" if allow_binary else ""),
        )
    return _object(obj)


def is_json(content_type: str | None) -> bool:
    kind = media_type(content_type) or JSON
    return kind == JSON or kind.endswith("+json")


def decode_msgpack(body: bytes) -> dict[str, Any]:
    """A msgpack body as a dict (also what :mod:`cace_server.transcode` turns JSON into)."""
    try:
        obj = msgpack.unpackb(body, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises many types (ExtraData, ValueError, ...)
        raise ApiError(400, "bad_msgpack", f"body is not valid msgpack: {exc}") from None
    return _object(obj)


def _object(obj: Any) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise ApiError(422, "invalid_input", f"the body must be an object, got {_name(obj)}")
    return obj


def _name(obj: Any) -> str:
    return {list: "an array", str: "a string", type(None): "null"}.get(type(obj), "a scalar")


def wants_binary(accept: str | None, content_type: str | None, allow_binary: bool) -> bool:
    """Reply in msgpack? Follows Accept; without a preference, the request's own format."""
    if not allow_binary:
        return False
    types = [media_type(part) for part in (accept or "").split(",") if part.strip()]
    for t in types:
        if t in MSGPACK_TYPES:
            return True
        if t == JSON or t.endswith("+json"):
            return False
    return media_type(content_type) in MSGPACK_TYPES


def array_out(arr: npt.NDArray[np.float64] | None, binary: bool) -> Any:
    if arr is None:
        return None
    return pack(arr) if binary else arr.tolist()


def encode(obj: dict[str, Any], binary: bool, status: int = 200) -> Response:
    if binary:
        return Response(msgpack.packb(obj, use_bin_type=True), status, media_type=MSGPACK)
    return Response(
        json.dumps(obj, separators=(",", ":"), allow_nan=False).encode(), status, media_type=JSON
    )
