"""HTTP clients of a cace-server (sync and asyncio), with timeouts and retries.

Retried, with exponential backoff: failures to connect, connections dropped
mid-request, 502/503 replies (503 is what the server answers while it starts
or when its queue is full; its ``Retry-After`` is honoured), and a 500 that is not
the server's own error reply: a proxy in front answers so when the server behind it
died mid-request (Ray Serve's proxy, for a replica that died), the same as a dropped
connection. Calculations are idempotent, so a retried request is safe. Other errors raise
:class:`CACEServerError` with the server's ``kind``, ``message`` and ``field``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal

import httpx

from cace_client import wire

if TYPE_CHECKING:
    from ase import Atoms

    from cace_client.jobs import JobHandle

RETRY_STATUS = frozenset({502, 503})
RETRY_ERRORS = (
    httpx.ConnectError,
    httpx.ConnectTimeout,
    httpx.RemoteProtocolError,
    httpx.ReadError,
    httpx.WriteError,
)
MAX_DELAY = 10.0


def retryable(response: httpx.Response) -> bool:
    """Worth retrying: 502/503, or a 500 without the server's ``{error, message}`` body.

    Every error the server itself answers names its kind; a bare 500 comes from a
    proxy whose backend died mid-request (see the module docstring). Reads the body.
    """
    if response.status_code in RETRY_STATUS:
        return True
    if response.status_code != 500:
        return False
    try:
        body = response.json()
    except ValueError:
        return True
    return not (isinstance(body, dict) and "error" in body)


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
    def _step_headers(session: str | None, step_group: tuple[str, int] | None) -> dict[str, str]:
        """``session``: the id of a trajectory whose structures change step by step (the
        server keeps its neighbour list). ``step_group``: (name, members) shared by the
        clients of one path-integral run, one session per bead, so the server evaluates
        a step's beads in one model call."""
        headers = {}
        if session:
            headers["x-cace-session"] = session
        if step_group is not None:
            name, size = step_group
            headers["x-cace-step-group"] = name
            headers["x-cace-step-group-size"] = str(int(size))
        return headers

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

    def _job_body(
        self,
        kind: str,
        images: Sequence[Any],
        params: Mapping[str, Any] | None,
        model: str | None,
        inputs: Sequence[str],
    ) -> dict[str, Any]:
        from cace_client.jobs import job_body

        return job_body(kind, images, params or {}, model or self.model, self.binary, inputs)

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

    def _request(
        self,
        method: str,
        path: str,
        body: dict[str, Any] | None = None,
        extra_headers: Mapping[str, str] | None = None,
    ) -> Any:
        content, headers = self._prepare(body)
        if extra_headers:
            headers = {**headers, **extra_headers}
        for attempt in range(self.retries + 1):
            last = attempt == self.retries
            try:
                response = self._http.request(method, path, content=content, headers=headers)
            except RETRY_ERRORS:
                if last:
                    raise
                time.sleep(self._delay(attempt, None))
                continue
            if not last and retryable(response):
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
        *,
        session: str | None = None,
        step_group: tuple[str, int] | None = None,
    ) -> dict[str, Any]:
        """One structure (``ase.Atoms`` or a request dict); arrays come back as numpy.

        ``inputs``: per-atom arrays of the atoms that the model reads (its
        ``required_inputs`` in :meth:`models`), sent as the request's ``arrays``.
        ``session`` and ``step_group``: see :meth:`_step_headers`.
        """
        raw = self._request(
            "POST",
            "/v1/calculate",
            self._calc_body(atoms_or_dict, properties, model, inputs),
            self._step_headers(session, step_group),
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

    # -- server-side jobs (relax, md): see cace_client.jobs
    def submit_job(
        self,
        kind: str,
        images: Sequence[Any],
        params: Mapping[str, Any] | None = None,
        model: str | None = None,
        inputs: Sequence[str] = (),
    ) -> JobHandle:
        """``POST /v1/jobs``: ``kind`` "relax" or "md", ``params`` by the server's names
        (ASE's; times in fs). Returns at once; the job runs on the server."""
        from cace_client.jobs import JobHandle

        body = self._job_body(kind, images, params, model, inputs)
        return JobHandle(self, self._request("POST", "/v1/jobs", body), images)

    def submit_relax(
        self,
        images: Sequence[Any],
        *,
        fmax: float = 0.05,
        steps: int = 1000,
        optimizer: str = "FIRE",
        maxstep: float | None = None,
        optimizer_args: Mapping[str, float | int | bool] | None = None,
        cell: bool = False,
        scalar_pressure: float = 0.0,
        hydrostatic_strain: bool = False,
        constant_volume: bool = False,
        model: str | None = None,
        inputs: Sequence[str] = (),
        **extra: Any,
    ) -> JobHandle:
        """Start a relaxation of ``images`` on the server with ASE's optimiser ``optimizer``
        (FIRE, LBFGS, BFGS, LBFGSLineSearch, BFGSLineSearch, MDMin) and ASE's meanings
        of ``fmax`` (eV/Å), ``steps``, ``maxstep`` (Å; ASE's default when None) and
        ``optimizer_args``. ``cell=True`` relaxes the cell too (ASE's FrechetCellFilter,
        3-D periodic structures) under ``scalar_pressure`` (eV/Å^3; 1 GPa =
        ``ase.units.GPa``). ``FixAtoms`` constraints of the images hold their atoms.
        Further keywords go to the server as they are (it names a bad one)."""
        params: dict[str, Any] = {
            "optimizer": optimizer,
            "fmax": fmax,
            "steps": steps,
            "cell": cell,
            "scalar_pressure": scalar_pressure,
            "hydrostatic_strain": hydrostatic_strain,
            "constant_volume": constant_volume,
            **extra,
        }
        if maxstep is not None:
            params["maxstep"] = maxstep
        if optimizer_args:
            params["optimizer_args"] = dict(optimizer_args)
        return self.submit_job("relax", images, params, model, inputs)

    def submit_md(
        self,
        images: Sequence[Any],
        *,
        steps: int,
        timestep_fs: float = 0.5,
        integrator: str = "velocity_verlet",
        temperature_K: float | None = None,
        initial_temperature_K: float | None = None,
        zero_momentum: bool = True,
        friction_per_fs: float | None = None,
        taut_fs: float | None = None,
        taup_fs: float | None = None,
        pressure: float | None = None,
        compressibility: float | None = None,
        tdamp_fs: float | None = None,
        tchain: int | None = None,
        stride: int = 10,
        frame_fields: Sequence[str] = ("positions",),
        seed: int = 0,
        model: str | None = None,
        inputs: Sequence[str] = (),
        **extra: Any,
    ) -> JobHandle:
        """Start an MD run of ``steps`` steps of each image on the server, with ASE's
        integrators: ``velocity_verlet`` (NVE), ``langevin``, ``berendsen_nvt``,
        ``nose_hoover_chain`` (NVT, need ``temperature_K``), ``berendsen_npt``.
        Times in fs, friction in 1/fs, ``pressure`` eV/Å^3, ``compressibility``
        Å^3/eV; a keyword left None takes the server's (ASE's) default. An image with
        non-zero velocities starts from them; the others get Maxwell-Boltzmann
        velocities at ``initial_temperature_K`` (default ``temperature_K``; none: at
        rest), seeded by ``seed``. A frame every ``stride`` steps with the per-atom
        ``frame_fields`` (positions, velocities, forces, cell). Further keywords go to
        the server as they are (it names a bad one)."""
        params: dict[str, Any] = {
            "steps": steps,
            "timestep_fs": timestep_fs,
            "integrator": integrator,
            "zero_momentum": zero_momentum,
            "stride": stride,
            "frame_fields": list(frame_fields),
            "seed": seed,
        }
        optional = {
            "temperature_K": temperature_K,
            "initial_temperature_K": initial_temperature_K,
            "friction_per_fs": friction_per_fs,
            "taut_fs": taut_fs,
            "taup_fs": taup_fs,
            "pressure": pressure,
            "compressibility": compressibility,
            "tdamp_fs": tdamp_fs,
            "tchain": tchain,
        }
        params.update({k: v for k, v in optional.items() if v is not None})
        params.update(extra)
        return self.submit_job("md", images, params, model, inputs)

    def job(self, job_id: str, images: Sequence[Any] | None = None) -> JobHandle:
        """A handle on a job the server holds (e.g. after a restart of this process);
        pass the submitted ``images`` to get ASE atoms back from it."""
        from cace_client.jobs import JobHandle

        return JobHandle(self, self._request("GET", f"/v1/jobs/{job_id}"), images)

    def jobs(self) -> list[dict[str, Any]]:
        """The status of every job the server holds."""
        return self._request("GET", "/v1/jobs")["jobs"]  # type: ignore[no-any-return]

    def cancel_job(self, job_id: str, forget: bool = False) -> dict[str, Any]:
        """Cancel a job (``forget``: the server also drops its results); its status."""
        path = f"/v1/jobs/{job_id}" + ("?forget=true" if forget else "")
        return self._request("DELETE", path)  # type: ignore[no-any-return]

    def _wait(self, handle: JobHandle, progress: bool) -> JobHandle:
        try:
            return handle.wait(progress)
        except KeyboardInterrupt:
            with contextlib.suppress(Exception):  # the interrupt is what the caller must see
                handle.cancel()
            raise

    def relax(
        self,
        images: Sequence[Any],
        *,
        progress: bool = False,
        errors: Literal["raise", "keep"] = "raise",
        **params: Any,
    ) -> list[Atoms]:
        """Relax ``images`` on the server and return the relaxed copies, in order (each
        with a SinglePointCalculator and ``info`` converged, steps, fmax); ``params``
        as :meth:`submit_relax`. Blocks until the job ends; ``progress=True`` shows a
        tqdm bar. Ctrl-C (KeyboardInterrupt) cancels the job on the server; a dropped
        connection does not (the stream resumes). ``errors="keep"``: a structure that
        failed is None in its place instead of raising :class:`CACEServerError`."""
        handle = self._wait(self.submit_relax(images, **params), progress)
        return handle.atoms(errors)  # type: ignore[return-value]

    def md(
        self,
        images: Sequence[Any],
        *,
        steps: int,
        progress: bool = False,
        errors: Literal["raise", "keep"] = "raise",
        **params: Any,
    ) -> list[list[Atoms]]:
        """Run MD of ``images`` on the server and return each one's trajectory (frames
        every ``stride`` steps, step 0 first; see :meth:`JobHandle.trajectories`);
        ``params`` as :meth:`submit_md`. Blocking, progress, Ctrl-C and ``errors`` as
        :meth:`relax`; the final states are ``client.submit_md(...).atoms()``."""
        handle = self._wait(self.submit_md(images, steps=steps, **params), progress)
        return handle.trajectories(errors)  # type: ignore[return-value]

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

    async def _request(
        self,
        method: str,
        path: str,
        body: dict[str, Any] | None = None,
        extra_headers: Mapping[str, str] | None = None,
    ) -> Any:
        content, headers = self._prepare(body)
        if extra_headers:
            headers = {**headers, **extra_headers}
        for attempt in range(self.retries + 1):
            last = attempt == self.retries
            try:
                response = await self._http.request(method, path, content=content, headers=headers)
            except RETRY_ERRORS:
                if last:
                    raise
                await asyncio.sleep(self._delay(attempt, None))
                continue
            if not last and retryable(response):
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
        *,
        session: str | None = None,
        step_group: tuple[str, int] | None = None,
    ) -> dict[str, Any]:
        body = self._calc_body(atoms_or_dict, properties, model, inputs)
        headers = self._step_headers(session, step_group)
        return wire.result(await self._request("POST", "/v1/calculate", body, headers))

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

    # -- server-side jobs: start, watch and cancel (the blocking helpers are CACEClient's)
    async def submit_job(
        self,
        kind: str,
        images: Sequence[Any],
        params: Mapping[str, Any] | None = None,
        model: str | None = None,
        inputs: Sequence[str] = (),
    ) -> dict[str, Any]:
        """``POST /v1/jobs`` (as :meth:`CACEClient.submit_job`): the job's status and ``id``."""
        body = self._job_body(kind, images, params, model, inputs)
        return await self._request("POST", "/v1/jobs", body)  # type: ignore[no-any-return]

    async def job(self, job_id: str) -> dict[str, Any]:
        """A job's status: state and progress."""
        return await self._request("GET", f"/v1/jobs/{job_id}")  # type: ignore[no-any-return]

    async def cancel_job(self, job_id: str, forget: bool = False) -> dict[str, Any]:
        path = f"/v1/jobs/{job_id}" + ("?forget=true" if forget else "")
        return await self._request("DELETE", path)  # type: ignore[no-any-return]

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
