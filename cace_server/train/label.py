"""Reference labels for captured structures (``cace-server label``).

Any ASE calculator, given by import path and keyword arguments, computes the
energy, forces and (for periodic structures) stress of each input structure: the
records of capture files (:func:`cace_server.capture.read_capture`, which skips a
torn last record) or the frames of any extended XYZ file ASE reads. Each labelled
structure is appended to the output as one extended-XYZ frame with the plain keys
``energy``, ``forces`` and ``stress`` that ``cace-server train`` reads by default;
a capture's predictions keep their own names (``mean_energy``, ``mean_forces``),
which ASE never takes for labels.

Resumable: every frame records ``label_key``, a hash of the input structure's
atomic numbers, positions, cell and periodicity (exact, before the output's
rounding), and reaches the kernel whole with one ``os.write`` on an append-only
descriptor. A rerun drops a torn last frame of the output and skips every
structure whose key it already holds, so nothing labelled is computed again.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import io
import json
import logging
import os
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cace_server.capture import complete_frames, read_capture

logger = logging.getLogger("cace_server.label")

#: Inputs read with :func:`read_capture` (plain text; a torn last record is skipped).
PLAIN_SUFFIXES = (".xyz", ".extxyz")
_KEY = re.compile(r"(?:^|\s)label_key=\"?([0-9a-f]+)")


class LabelError(ValueError):
    """Labelling cannot start as asked (a bad calculator, input or output)."""


def calculator_factory(spec: str, arguments: str | None = None) -> Callable[[], Any]:
    """A function that builds the ASE calculator ``MODULE:CLASS(**arguments)``.

    ``arguments`` is a JSON object of keyword arguments. The class is imported and
    checked here, so a typo is an error before any structure is read.
    """
    module_name, sep, attribute = spec.partition(":")
    if not sep or not module_name or not attribute:
        raise LabelError(
            f"--calculator must be MODULE:CLASS (e.g. ase.calculators.emt:EMT), got {spec!r}"
        )
    try:
        target: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise LabelError(f"--calculator: cannot import {module_name!r}: {exc}") from exc
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise LabelError(f"--calculator: {module_name!r} has no attribute {attribute!r}")
        target = getattr(target, part)
    if not callable(target):
        raise LabelError(f"--calculator: {spec} is not a class or function")
    kwargs: dict[str, Any] = {}
    if arguments:
        try:
            kwargs = json.loads(arguments)
        except json.JSONDecodeError as exc:
            raise LabelError(f"--calculator-args is not valid JSON: {exc}") from exc
        if not isinstance(kwargs, dict):
            raise LabelError("--calculator-args must be a JSON object of keyword arguments")

    def build() -> Any:
        return target(**kwargs)

    return build


def structure_key(atoms: Any) -> str:
    """A stable identity of a structure: SHA-256 over numbers, positions, cell, pbc."""
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(atoms.get_atomic_numbers(), dtype="<i8").tobytes())
    h.update(np.ascontiguousarray(atoms.get_positions(), dtype="<f8").tobytes())
    h.update(np.ascontiguousarray(np.asarray(atoms.get_cell()), dtype="<f8").tobytes())
    h.update(np.ascontiguousarray(atoms.get_pbc(), dtype=np.uint8).tobytes())
    return h.hexdigest()[:32]


@dataclass
class InputStructure:
    atoms: Any  # ase.Atoms
    key: str
    source: str  # "file:seq N" or "file:frame N", for messages


def read_inputs(paths: Sequence[str | Path]) -> tuple[list[InputStructure], list[str]]:
    """The structures of the input files, and notes on what was skipped (torn records)."""
    from ase.io import read

    out: list[InputStructure] = []
    notes: list[str] = []
    for path in map(Path, paths):
        if not path.is_file():
            raise LabelError(f"input file {path} does not exist")
        try:
            if path.suffix in PLAIN_SUFFIXES:
                contents = read_capture(path)
                frames = contents.records
                if contents.torn_bytes:
                    notes.append(
                        f"{path}: skipped a torn last record ({contents.torn_bytes} bytes)"
                    )
            else:
                loaded = read(str(path), index=":")
                frames = loaded if isinstance(loaded, list) else [loaded]
        except Exception as exc:  # ASE raises many types for malformed files
            raise LabelError(f"{path}: cannot read as extended XYZ ({exc})") from exc
        for i, atoms in enumerate(frames):
            seq = atoms.info.get("seq")
            where = f"{path}:seq {seq}" if seq is not None else f"{path}:frame {i}"
            atoms.calc = None  # labels or predictions read from the input are not kept
            out.append(InputStructure(atoms, structure_key(atoms), where))
    return out, notes


def open_output(path: Path) -> tuple[set[str], int, int]:
    """Prepare the output for appending: drop a torn last frame.

    Returns the ``label_key`` values already there, the number of complete frames
    and the bytes dropped.
    """
    if path.suffix not in PLAIN_SUFFIXES:
        raise LabelError(f"output {path} must be a plain extended XYZ file (.xyz or .extxyz)")
    if not path.exists():
        return set(), 0, 0
    data = path.read_bytes()
    try:
        frames, torn = complete_frames(data)
    except ValueError as exc:
        raise LabelError(f"output {path} is not an extended XYZ file to append to: {exc}") from exc
    if torn:
        with open(path, "r+b") as f:
            f.truncate(len(data) - torn)
    return set(_keys(frames)), len(frames), torn


def _keys(frames: Sequence[str]) -> Iterator[str]:
    for frame in frames:
        match = _KEY.search(frame.split("\n", 2)[1])
        if match:
            yield match.group(1)


@dataclass
class LabelReport:
    total: int = 0
    labelled: int = 0
    already: int = 0  # skipped: the output holds them (or an earlier input frame did)
    failures: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def compute_labels(atoms: Any, calculator: Any) -> dict[str, Any]:
    """Energy, forces and, for a periodic structure, stress from ``calculator``."""
    from ase.calculators.calculator import PropertyNotImplementedError

    atoms.calc = calculator
    try:
        results: dict[str, Any] = {
            "energy": float(atoms.get_potential_energy()),
            "forces": np.array(atoms.get_forces(), dtype=np.float64),
        }
        if atoms.pbc.all():
            # a calculator without stress still labels energy and forces
            with contextlib.suppress(PropertyNotImplementedError):
                results["stress"] = np.array(atoms.get_stress(), dtype=np.float64)
    finally:
        atoms.calc = None
    bad = [name for name, value in results.items() if not np.all(np.isfinite(value))]
    if bad:
        raise FloatingPointError(f"the calculator returned non-finite {', '.join(bad)}")
    return results


def encode_frame(atoms: Any, results: dict[str, Any], key: str, calculator: str) -> bytes:
    """One extended-XYZ frame of ``atoms`` with its labels as ASE single-point results."""
    from ase.calculators.singlepoint import SinglePointCalculator
    from ase.io import write

    labelled = atoms.copy()
    for name in ("energy", "forces", "stress", "free_energy"):
        labelled.info.pop(name, None)
        labelled.arrays.pop(name, None)
    labelled.info["label_key"] = key
    labelled.info["label_calculator"] = calculator
    labelled.calc = SinglePointCalculator(labelled, **results)
    buffer = io.StringIO()
    write(buffer, labelled, format="extxyz")
    return buffer.getvalue().encode()


def _append(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def label(
    inputs: Sequence[str | Path],
    output: str | Path,
    factory: Callable[[], Any],
    *,
    calculator_name: str = "",
    report_failure: Callable[[str], None] | None = None,
    progress: Callable[[str], None] | None = None,
) -> LabelReport:
    """Label every input structure not already in ``output``, appending each one whole.

    A structure whose calculation fails is reported (``report_failure``), not
    written, and retried by the next run; the calculator is then built anew.
    ``progress`` is told of each structure written.
    """
    output = Path(output)
    if any(Path(path).resolve() == output.resolve() for path in inputs):
        raise LabelError(f"output {output} is also an input")
    structures, notes = read_inputs(inputs)
    done, _, torn = open_output(output)
    report = LabelReport(total=len(structures), notes=notes)
    if torn:
        report.notes.append(f"{output}: dropped a torn last frame ({torn} bytes)")
    pending = []
    for item in structures:
        if item.key in done:
            report.already += 1
        else:
            done.add(item.key)
            pending.append(item)
    if not pending:
        return report
    try:
        calculator: Any = factory()
    except Exception as exc:
        raise LabelError(f"cannot build the calculator: {type(exc).__name__}: {exc}") from exc
    output.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(output, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        for count, item in enumerate(pending, 1):
            try:
                if calculator is None:
                    calculator = factory()
                results = compute_labels(item.atoms, calculator)
            except Exception as exc:  # any calculator error costs this structure only
                calculator = None
                message = f"{item.source}: {type(exc).__name__}: {exc}"
                report.failures.append(message)
                if report_failure is not None:
                    report_failure(message)
                continue
            _append(fd, encode_frame(item.atoms, results, item.key, calculator_name))
            report.labelled += 1
            if progress is not None:
                progress(f"labelled {item.source} ({count}/{len(pending)})")
    finally:
        os.fsync(fd)
        os.close(fd)
    return report


def labelled_keys(path: str | Path) -> Iterator[str]:
    """The ``label_key`` of every complete frame of a labelled file."""
    frames, _ = complete_frames(Path(path).read_bytes())
    return _keys(frames)


def summary(report: LabelReport, output: str | Path) -> str:
    done = report.labelled + report.already
    text = (
        f"labelled {report.labelled}, already labelled {report.already}, "
        f"failed {len(report.failures)} of {report.total} structures -> {output}"
    )
    if done != report.total:
        text += f" ({report.total - done} to retry)"
    return text
