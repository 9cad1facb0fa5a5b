"""HTTP clients of a cace-server (sync and asyncio), with timeouts and retries.

Retried, with exponential backoff: failures to connect, connections dropped
mid-request, and 502/503 replies (503 is what the server answers while it starts
or when its queue is full; its ``Retry-After`` is honoured). Calculations are
idempotent, so a retried request is safe. Other errors raise
:class:`CACEServerError` with the server's ``kind``, ``message`` and ``field``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import Any

import httpx

from cace_client import wire

RETRY_STATUS = frozenset({502, 503})
RETRY_ERRORS = (
    httpx.ConnectError,
    httpx.ConnectTimeout,
    httpx.RemoteProtocolError,
    httpx.ReadError,
    httpx.WriteError,
)
MAX_DELAY = 10.0


class CACEServerError(Exception):
    """The server refused or failed a request; ``field`` names the offending input."""

    def __init__(self, status: int, kind: str, message: str, field: str | None = None) -> None:
        super().__init__(f"{status} {kind}: {message}")
        self.status = status
        self.kind = kind
        self.message = message
        self.field = field


def _raise_for(response: httpx.Response) -> None:
    if response.status_code < 400:
        return
    try:
        body = response.json()
        kind, message, field = body["error"], body["message"], body.get("field")
    except Exception:
        kind, message, field = "http_error", response.text[:500], None
    raise CACEServerError(response.status_code, kind, message, field)


def _single_body(
    item: Any,
    properties: Sequence[str] | None,
    model: str | None,
    binary: bool,
    inputs: Sequence[str] = (),
) -> dict[str, Any]:
    body = wire.structure_body(item, binary, inputs)
    if properties is not None:
        body["properties"] = list(properties)
    if model is not None:
        body.setdefault("model", model)
    return body


class _Common:
    def __init__(
        self,
        url: str,
        token: str | None,
        timeout: float,
        retries: int,
        backoff: float,
        binary: bool,
        model: str | None,
    ) -> None:
        if retries < 0:
            raise ValueError("retries must not be negative")
        self.url = url.rstrip("/")
        self.retries = retries
        self.backoff = backoff
        self.binary = binary and wire.have_msgpack()
        self.model = model
        self.headers = {"authorization": f"Bearer {token}"} if token else {}
        self.timeout = httpx.Timeout(timeout, connect=min(timeout, 10.0))

    def _delay(self, attempt: int, response: httpx.Response | None) -> float:
        if response is not None:
            try:
                return min(float(response.headers["retry-after"]), MAX_DELAY)
            except (KeyError, ValueError):
                pass
        return float(min(self.backoff * 2**attempt, MAX_DELAY))

    def _prepare(self, body: dict[str, Any] | None) -> tuple[bytes | None, dict[str, str]]:
        if body is None:
            return None, {}
        return wire.encode(body, self.binary)

    @staticmethod
    def _decode(response: httpx.Response) -> Any:
        _raise_for(response)
        return wire.decode(response.content, response.headers.get("content-type", ""))

    def _calc_body(
        self,
        item: Any,
        properties: Sequence[str] | None,
        model: str | None,
        inputs: Sequence[str] = (),
    ) -> Any:
        return _single_body(item, properties, model or self.model, self.binary, inputs)

    def _batch_body(
        self,
        items: Sequence[Any],
        properties: Sequence[str] | None,
        model: str | None,
        inputs: Sequence[str] = (),
    ) -> dict[str, Any]:
        return wire.batch_body(items, properties, model or self.model, self.binary, inputs)

    @staticmethod
    def _ipi_body(address: str, species: Any, clients: int, model: str | None, **options: Any):
        body: dict[str, Any] = {"address": address, "clients": clients, **options}
        if hasattr(species, "get_atomic_numbers"):
            species = [int(z) for z in species.get_atomic_numbers()]
        key = "symbols" if species and isinstance(species[0], str) else "numbers"
        body[key] = [s if isinstance(s, str) else int(s) for s in species]
        if model is not None:
            body["model"] = model
        return body


class CACEClient(_Common):
    """Blocking client. ``binary=True`` uses msgpack bodies (when msgpack is installed)."""

    def __init__(
        self,
        url: str,
        token: str | None = None,
        *,
        timeout: float = 120.0,
        retries: int = 3,
        backoff: float = 0.25,
        binary: bool = False,
        model: str | None = None,
    ) -> None:
        super().__init__(url, token, timeout, retries, backoff, binary, model)
        self._http = httpx.Client(base_url=self.url, headers=self.headers, timeout=self.timeout)

    def _request(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        content, headers = self._prepare(body)
        for attempt in range(self.retries + 1):
            last = attempt == self.retries
            try:
                response = self._http.request(method, path, content=content, headers=headers)
            except RETRY_ERRORS:
                if last:
                    raise
                time.sleep(self._delay(attempt, None))
                continue
            if response.status_code in RETRY_STATUS and not last:
                time.sleep(self._delay(attempt, response))
                continue
            return self._decode(response)
        raise AssertionError("unreachable")  # pragma: no cover

    def calculate(
        self,
        atoms_or_dict: Any,
        properties: Sequence[str] | None = None,
        model: str | None = None,
        inputs: Sequence[str] = (),
    ) -> dict[str, Any]:
        """One structure (``ase.Atoms`` or a request dict); arrays come back as numpy.

        ``inputs``: per-atom arrays of the atoms that the model reads (its
        ``required_inputs`` in :meth:`models`), sent as the request's ``arrays``.
        """
        raw = self._request(
            "POST", "/v1/calculate", self._calc_body(atoms_or_dict, properties, model, inputs)
        )
        return wire.result(raw)

    def calculate_batch(
        self,
        items: Sequence[Any],
        properties: Sequence[str] | None = None,
        model: str | None = None,
        inputs: Sequence[str] = (),
    ) -> list[dict[str, Any]]:
        """Several structures in one request, evaluated together on the server."""
        raw = self._request(
            "POST", "/v1/calculate/batch", self._batch_body(items, properties, model, inputs)
        )
        return [wire.result(r) for r in raw["results"]]

    def models(self) -> dict[str, Any]:
        return self._request("GET", "/v1/models")  # type: ignore[no-any-return]

    def health(self) -> dict[str, Any]:
        """``{"alive": bool, "ready": bool}``; never raises for a server that is down."""
        try:
            alive = self._http.get("/healthz").status_code == 200
            ready = self._http.get("/readyz").status_code == 200
        except httpx.TransportError:
            return {"alive": False, "ready": False}
        return {"alive": alive, "ready": alive and ready}

    def wait_ready(self, timeout: float = 60.0, interval: float = 0.2) -> None:
        deadline = time.monotonic() + timeout
        while not self.health()["ready"]:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.url} not ready after {timeout} s")
            time.sleep(interval)

    # -- i-PI control
    def ipi_connect(
        self,
        address: str,
        species: Any,
        clients: int = 1,
        model: str | None = None,
        **options: Any,
    ) -> dict[str, Any]:
        """Attach the server to an i-PI run; ``species``: ase.Atoms, symbols or numbers."""
        body = self._ipi_body(address, species, clients, model, **options)
        return self._request("POST", "/v1/ipi/connections", body)  # type: ignore[no-any-return]

    def ipi_connections(self) -> list[dict[str, Any]]:
        return self._request("GET", "/v1/ipi/connections")["groups"]  # type: ignore[no-any-return]

    def ipi_close(self, group_id: str) -> dict[str, Any]:
        return self._request("DELETE", f"/v1/ipi/connections/{group_id}")  # type: ignore[no-any-return]

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> CACEClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class AsyncCACEClient(_Common):
    """The asyncio twin of :class:`CACEClient` (for many concurrent requests)."""

    def __init__(
        self,
        url: str,
        token: str | None = None,
        *,
        timeout: float = 120.0,
        retries: int = 3,
        backoff: float = 0.25,
        binary: bool = False,
        model: str | None = None,
        max_connections: int = 100,
    ) -> None:
        super().__init__(url, token, timeout, retries, backoff, binary, model)
        limits = httpx.Limits(max_connections=max_connections)
        self._http = httpx.AsyncClient(
            base_url=self.url, headers=self.headers, timeout=self.timeout, limits=limits
        )

    async def _request(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        content, headers = self._prepare(body)
        for attempt in range(self.retries + 1):
            last = attempt == self.retries
            try:
                response = await self._http.request(method, path, content=content, headers=headers)
            except RETRY_ERRORS:
                if last:
                    raise
                await asyncio.sleep(self._delay(attempt, None))
                continue
            if response.status_code in RETRY_STATUS and not last:
                await asyncio.sleep(self._delay(attempt, response))
                continue
            return self._decode(response)
        raise AssertionError("unreachable")  # pragma: no cover

    async def calculate(
        self,
        atoms_or_dict: Any,
        properties: Sequence[str] | None = None,
        model: str | None = None,
        inputs: Sequence[str] = (),
    ) -> dict[str, Any]:
        body = self._calc_body(atoms_or_dict, properties, model, inputs)
        return wire.result(await self._request("POST", "/v1/calculate", body))

    async def calculate_batch(
        self,
        items: Sequence[Any],
        properties: Sequence[str] | None = None,
        model: str | None = None,
        inputs: Sequence[str] = (),
    ) -> list[dict[str, Any]]:
        body = self._batch_body(items, properties, model, inputs)
        raw = await self._request("POST", "/v1/calculate/batch", body)
        return [wire.result(r) for r in raw["results"]]

    async def models(self) -> Mapping[str, Any]:
        return await self._request("GET", "/v1/models")  # type: ignore[no-any-return]

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncCACEClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()
