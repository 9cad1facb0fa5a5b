"""Server-side jobs (``/v1/jobs``): relaxations and short MD runs of many structures.

The server runs ASE's own optimisers and integrators on every structure of a job,
all in lockstep (one model call per iteration for the whole batch); the client sends
the job once and reads the results as the structures finish. :class:`JobHandle` is
what :meth:`CACEClient.submit_relax` and :meth:`CACEClient.submit_md` return.

Units are ASE's, except on the wire: times in fs and velocities in Å/fs (converted
to and from ASE's units here), pressures in eV/Å^3.

A dropped connection never cancels a job: the server keeps running it, and the
results stream resumes where it stopped (``start=``). Only :meth:`JobHandle.cancel`
(or an interrupt of the blocking :meth:`CACEClient.relax`/``md``) cancels.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any, Literal

import httpx
import numpy as np
from ase import Atoms, units
from ase.calculators.singlepoint import SinglePointCalculator
from ase.constraints import FixAtoms

from cace_client import wire
from cace_client.client import RETRY_ERRORS, CACEServerError, _raise_for, retryable

if TYPE_CHECKING:
    from cace_client.client import CACEClient

Errors = Literal["raise", "keep"]
#: what a record or frame carries as arrays (the rest are numbers, strings, flags)
_ARRAYS = ("positions", "forces", "cell", "velocities", "stress")
#: how often (s) the progress bar asks for the job's iterations and max force
_POLL_S = 1.0


def _fixed(atoms: Atoms) -> list[int]:
    fixed: list[int] = []
    for constraint in atoms.constraints:
        if not isinstance(constraint, FixAtoms):
            raise ValueError(
                f"a job honours only FixAtoms constraints, not {type(constraint).__name__}"
            )
        fixed.extend(int(i) for i in constraint.get_indices())
    return sorted(set(fixed))


def job_structure(item: Any, kind: str, binary: bool, inputs: Sequence[str] = ()) -> dict[str, Any]:
    """A structure of a job: as ``/v1/calculate/batch``, plus what ASE keeps beside it.

    From ``ase.Atoms``: ``fixed`` (its ``FixAtoms`` constraints), ``masses`` (only when
    the atoms carry custom masses) and, for MD, ``velocities`` in Å/fs (when non-zero).
    A dict is sent as it is.
    """
    body = wire.structure_body(item, binary, inputs)
    if isinstance(item, Mapping):
        return body
    fixed = _fixed(item)
    if fixed:
        body["fixed"] = fixed
    if item.has("masses"):
        masses = np.asarray(item.get_masses(), dtype=np.float64)
        body["masses"] = wire._packed(masses) if binary else masses.tolist()
    if kind == "md":
        velocities = item.get_velocities()
        if velocities is not None and np.any(velocities):
            v = np.asarray(velocities, dtype=np.float64) * units.fs  # ASE unit -> Å/fs
            body["velocities"] = wire._packed(v) if binary else v.tolist()
    return body


def job_body(
    kind: str,
    images: Sequence[Any],
    params: Mapping[str, Any],
    model: str | None,
    binary: bool,
    inputs: Sequence[str] = (),
) -> dict[str, Any]:
    """The body of ``POST /v1/jobs``."""
    if kind not in ("relax", "md"):
        raise ValueError(f"kind must be 'relax' or 'md', got {kind!r}")
    body: dict[str, Any] = {
        "kind": kind,
        "structures": [job_structure(i, kind, binary, inputs) for i in images],
        kind: dict(params),
    }
    if model is not None:
        body["model"] = model
    return body


def _record(raw: Mapping[str, Any]) -> dict[str, Any]:
    """A result record (or frame) with numpy arrays."""
    out = dict(raw)
    for key in _ARRAYS:
        if out.get(key) is not None:
            out[key] = wire._array(out[key])
    if out.get("frames") is not None:
        out["frames"] = [_record(f) for f in out["frames"]]
    return out


def _template(item: Any, record: Mapping[str, Any]) -> Atoms:
    """A copy of the input structure (constraints, info, masses kept) to fill in."""
    if isinstance(item, Atoms):
        return item.copy()
    if "numbers" in item:
        numbers = wire._array(item["numbers"])
        assert numbers is not None
        return Atoms(numbers=np.asarray(numbers, dtype=int), pbc=record.get("pbc"))
    return Atoms(symbols=item["symbols"], pbc=record.get("pbc"))


def _fill(atoms: Atoms, state: Mapping[str, Any]) -> Atoms:
    """Positions, cell, velocities and a single-point calculator from a record or frame."""
    if state.get("cell") is not None:
        atoms.set_cell(state["cell"])
    if state.get("positions") is not None:
        atoms.set_positions(state["positions"], apply_constraint=False)
    if state.get("velocities") is not None:
        atoms.set_velocities(state["velocities"] / units.fs)  # Å/fs -> ASE's unit
    results: dict[str, Any] = {"energy": state.get("energy"), "forces": state.get("forces")}
    if state.get("stress") is not None:
        results["stress"] = state["stress"]
    atoms.calc = SinglePointCalculator(atoms, **{k: v for k, v in results.items() if v is not None})
    return atoms


class JobHandle:
    """A job on the server: its state, its results as they come, ASE atoms at the end.

    ``images``: the structures as submitted (needed by :meth:`atoms` and
    :meth:`trajectories`, which fill copies of them in; a handle re-attached by id
    without them gives only :meth:`results`).
    """

    def __init__(
        self, client: CACEClient, status: Mapping[str, Any], images: Sequence[Any] | None = None
    ) -> None:
        self.client = client
        self.id: str = status["id"]
        self.kind: str = status["kind"]
        self.n_structures: int = int(status["n_structures"])
        self.last_status: dict[str, Any] = dict(status)
        self.images = list(images) if images is not None else None
        self._arrived: list[dict[str, Any]] = []  # in the order they finished
        self._end: dict[str, Any] | None = None
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"JobHandle(id={self.id!r}, kind={self.kind!r}, state={self.last_status['state']!r})"

    # -- state
    def status(self) -> dict[str, Any]:
        """``GET /v1/jobs/{id}``: state and progress (finished structures, iterations, fmax)."""
        self.last_status = self.client._request("GET", f"/v1/jobs/{self.id}")
        return self.last_status

    def cancel(self) -> dict[str, Any]:
        """Cancel the job; what finished before stays readable (:meth:`results`)."""
        self.last_status = self.client.cancel_job(self.id)
        return self.last_status

    def forget(self) -> dict[str, Any]:
        """Cancel the job and have the server drop it and its results."""
        self.last_status = self.client.cancel_job(self.id, forget=True)
        return self.last_status

    # -- results
    def iter_results(self, start: int = 0, progress: bool = False) -> Iterator[dict[str, Any]]:
        """Each structure's result record as it finishes (numpy arrays, ASE units but
        velocities in Å/fs), in the order they finish; returns when the job has ended.

        Streams ``GET /v1/jobs/{id}/results`` (msgpack frames when msgpack is installed,
        else NDJSON). A dropped connection is resumed with ``start=`` under the client's
        retry policy; the job is never cancelled by it. Raises :class:`CACEServerError`
        (kind ``job_failed``) when the job failed. ``progress=True`` shows a tqdm bar of
        finished structures with the job's iterations and max force.
        """
        bar = _Progress(self) if progress else None
        try:
            seen = start
            for record in self._stream(start):
                seen += 1
                if bar is not None:
                    bar.finished(seen)
                yield record
        finally:
            if bar is not None:
                bar.close()

    def _stream(self, start: int) -> Iterator[dict[str, Any]]:
        client = self.client
        binary = wire.have_msgpack()
        headers = {"accept": wire.MSGPACK if binary else "application/x-ndjson"}
        seen, attempt = start, 0
        while True:
            opened = False
            try:
                with client._http.stream(
                    "GET",
                    f"/v1/jobs/{self.id}/results",
                    params={"start": seen},
                    headers=headers,
                ) as response:
                    opened = True
                    if response.status_code >= 500 and attempt < client.retries:
                        response.read()
                        if retryable(response):
                            time.sleep(client._delay(attempt, response))
                            attempt += 1
                            continue
                    if response.status_code >= 400:
                        response.read()
                        _raise_for(response)
                    for raw in _frames(response, binary):
                        if raw.get("end"):
                            self._finish(raw)
                            return
                        seen += 1
                        attempt = 0
                        yield _record(raw)
            except httpx.ReadTimeout:
                # A silent stream is normal (nothing finished for a while): reconnect.
                if not opened:  # no answer at all: the server is unwell, a failure
                    if attempt >= client.retries:
                        raise
                    time.sleep(client._delay(attempt, None))
                    attempt += 1
            except RETRY_ERRORS:
                if attempt >= client.retries:
                    raise
                time.sleep(client._delay(attempt, None))
                attempt += 1

    def _finish(self, end: Mapping[str, Any]) -> None:
        self.last_status = {**self.last_status, "state": end.get("state")}
        if end.get("state") == "failed":
            raise CACEServerError(500, "job_failed", str(end.get("error")), None)

    def _collect(self, progress: bool = False) -> None:
        """Read the results not yet read, up to the end of the job."""
        with self._lock:
            if self._end is not None:
                return
            for record in self.iter_results(len(self._arrived), progress):
                self._arrived.append(record)
            self._end = {"state": self.last_status.get("state")}

    def wait(self, progress: bool = False) -> JobHandle:
        """Block until the job has ended (its results are then read and kept)."""
        self._collect(progress)
        return self

    def results(self, progress: bool = False) -> list[dict[str, Any]]:
        """Every finished structure's record, sorted by index (waits for the job's end).

        A cancelled job gives those that finished before the cancellation.
        """
        self._collect(progress)
        return sorted(self._arrived, key=lambda r: int(r["index"]))

    def _by_index(self, errors: Errors, progress: bool) -> list[dict[str, Any] | None]:
        if errors not in ("raise", "keep"):
            raise ValueError(f"errors must be 'raise' or 'keep', got {errors!r}")
        if self.images is None:
            raise ValueError("this handle has no input images (re-attached by id): use results()")
        by_index: list[dict[str, Any] | None] = [None] * self.n_structures
        for record in self.results(progress):
            by_index[int(record["index"])] = record
        if errors == "raise":
            for i, found in enumerate(by_index):
                if found is None:
                    state = self.last_status.get("state")
                    raise CACEServerError(
                        409, f"job_{state}", f"structure {i} has no result (job {state})", None
                    )
                if found["status"] == "failed":
                    error = found.get("error") or {}
                    raise CACEServerError(
                        422,
                        str(error.get("error", "failed")),
                        str(error.get("message", "")),
                        f"structures.{i}",
                    )
        return [r if r is not None and r["status"] != "failed" else None for r in by_index]

    def atoms(self, errors: Errors = "raise", progress: bool = False) -> list[Atoms | None]:
        """The final structures in job order (waits for the job's end).

        Each is a copy of the input image with the final positions (and cell) and a
        ``SinglePointCalculator`` holding energy and forces (and stress for a cell
        relaxation or NPT). Relax: ``info["converged"]``, ``info["steps"]``,
        ``info["fmax"]``. MD: velocities are set (ASE units), ``info["steps"]``.

        A failed structure, or one without result (cancelled job), raises
        :class:`CACEServerError` (``field`` names it); with ``errors="keep"`` it is
        ``None`` in its place instead.
        """
        out: list[Atoms | None] = []
        for i, record in enumerate(self._by_index(errors, progress)):
            if record is None:
                out.append(None)
                continue
            assert self.images is not None
            atoms = _fill(_template(self.images[i], record), record)
            atoms.info["steps"] = record.get("steps")
            if self.kind == "relax":
                atoms.info["converged"] = bool(record.get("converged"))
                atoms.info["fmax"] = record.get("fmax")
            out.append(atoms)
        return out

    def trajectories(
        self, errors: Errors = "raise", progress: bool = False
    ) -> list[list[Atoms] | None]:
        """MD: each structure's frames (every ``stride``-th step, step 0 included), in job
        order: positions and cell (those asked for in ``frame_fields``; the input's
        otherwise), velocities when sent, and a ``SinglePointCalculator`` with the
        energy (and forces when sent). ``info``: step, time_fs, kinetic_energy,
        temperature_K. With ``stride=0`` a trajectory is its final state alone.
        Failed structures as in :meth:`atoms`.
        """
        if self.kind != "md":
            raise ValueError(f"a {self.kind} job has no trajectories: use atoms()")
        out: list[list[Atoms] | None] = []
        for i, record in enumerate(self._by_index(errors, progress)):
            if record is None:
                out.append(None)
                continue
            assert self.images is not None
            frames = record.get("frames") or [record]
            trajectory = []
            for frame in frames:
                atoms = _fill(_template(self.images[i], record), frame)
                for key in ("step", "time_fs", "kinetic_energy", "temperature_K"):
                    atoms.info[key] = frame.get(key)
                trajectory.append(atoms)
            out.append(trajectory)
        return out

    def future(
        self,
        result: Literal["atoms", "trajectories", "results"] = "atoms",
        errors: Errors = "raise",
    ) -> Future[Any]:
        """A ``concurrent.futures.Future`` resolved on a background thread with
        :meth:`atoms` (or :meth:`trajectories`, :meth:`results`): submit many jobs,
        then gather (``concurrent.futures.wait``). Cancelling the future does not
        cancel the job: :meth:`cancel` does."""
        future: Future[Any] = Future()

        def run() -> None:
            if not future.set_running_or_notify_cancel():
                return
            try:
                if result == "results":
                    value: Any = self.results()
                elif result == "trajectories":
                    value = self.trajectories(errors)
                else:
                    value = self.atoms(errors)
            except BaseException as exc:
                future.set_exception(exc)
            else:
                future.set_result(value)

        threading.Thread(target=run, name=f"cace-job-{self.id}", daemon=True).start()
        return future


def _frames(response: httpx.Response, binary: bool) -> Iterator[dict[str, Any]]:
    """The objects of a results stream as they arrive (msgpack or NDJSON)."""
    content_type = response.headers.get("content-type", "").split(";")[0].strip()
    if binary and content_type == wire.MSGPACK:
        assert wire.msgpack is not None
        unpacker = wire.msgpack.Unpacker(raw=False)
        for chunk in response.iter_bytes():
            unpacker.feed(chunk)
            yield from unpacker
        return
    for line in response.iter_lines():
        if line.strip():
            yield json.loads(line)


class _Progress:
    """A tqdm bar: structures finished of the total; iterations and max force beside.

    A daemon thread asks for the job's status every second; the results stream
    itself is not touched (the path without a bar does no more than read it).
    """

    def __init__(self, handle: JobHandle) -> None:
        from tqdm.auto import tqdm

        self.handle = handle
        self.bar = tqdm(total=handle.n_structures, desc=f"{handle.kind} {handle.id[:8]}", unit="st")
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._watch, name="cace-job-progress", daemon=True)
        self.thread.start()

    def finished(self, count: int) -> None:
        with self.bar.get_lock():
            if count > self.bar.n:
                self.bar.update(count - self.bar.n)

    def _watch(self) -> None:
        while not self.stop.wait(_POLL_S):
            self.poll()

    def poll(self) -> None:
        try:
            status = self.handle.client._request("GET", f"/v1/jobs/{self.handle.id}")
        except (CACEServerError, httpx.HTTPError):
            return  # the bar is a view: the stream reports real failures
        postfix: dict[str, Any] = {"it": status.get("iterations")}
        if status.get("max_force") is not None:
            postfix["fmax"] = f"{status['max_force']:.3g}"
        self.bar.set_postfix(postfix, refresh=False)
        self.finished(int(status.get("finished_structures", 0)))

    def close(self) -> None:
        self.stop.set()
        self.thread.join()
        self.poll()
        self.bar.close()
