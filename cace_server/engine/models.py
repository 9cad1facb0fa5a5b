"""What the engine needs of a model, how it loads one, and what it reports about it."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from cace_server.structures import Prediction, Structure, StructureError


@runtime_checkable
class PreparedLike(Protocol):
    """A structure with its neighbour list, as returned by ``model.prepare``."""

    @property
    def n_atoms(self) -> int: ...

    @property
    def n_pairs(self) -> int: ...


@runtime_checkable
class ServedModel(Protocol):
    """The part of ``cace_server.model.CACEPotential`` the engine relies on."""

    @property
    def elements(self) -> tuple[int, ...]: ...

    @property
    def cutoff(self) -> float: ...

    def prepare(self, structure: Structure) -> Any: ...

    # The worker passes ``bec`` only as True, and only to a model that lists "bec"
    # among its outputs: a model without BEC need not take the keyword.
    def predict(
        self, structures: Sequence[Any], *, stress: bool = True, bec: bool = False
    ) -> list[Prediction]: ...


#: Every output a served model may offer, in the order they are listed.
OUTPUTS = ("energy", "forces", "stress", "energies", "charges", "dipole", "bec")


ModelSource = ServedModel | str | os.PathLike[str]


@dataclass(frozen=True)
class ModelInfo:
    """Description of one served model (for ``/v1/models`` and logs)."""

    name: str
    default: bool
    elements: tuple[int, ...]
    cutoff: float
    dtype: str
    device: str
    n_parameters: int
    has_charges: bool
    source: str | None
    config: dict[str, Any]
    #: what the model computes (a subset of :data:`OUTPUTS`).
    outputs: tuple[str, ...] = ("energy", "forces", "stress", "energies")
    #: per-atom inputs each structure must carry in ``Structure.arrays``.
    required_inputs: tuple[str, ...] = ()
    #: the model's own description (family, long range, ...), from ``model.describe()``.
    description: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def family(self) -> list[str]:
        """The model families it is built of, e.g. ["cace", "combine"]."""
        value = self.description.get("family", "cace")
        return [str(f) for f in value] if isinstance(value, list) else [str(value)]

    @property
    def long_range(self) -> bool:
        """Whether it has a long-range term (its description says which)."""
        return bool(self.description.get("long_range", self.has_charges))

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def default_name(source: ModelSource) -> str:
    """Name of a model given without one: a file's stem, else ``"default"``."""
    if isinstance(source, (str, os.PathLike)):
        return Path(source).stem or "default"
    return "default"


def materialize(source: ModelSource, device: str | None, dtype: str | None) -> ServedModel:
    """Load a model file, or move a built model to ``device``/``dtype`` (in place).

    Runs on the engine's worker thread: it is the only thread that touches the device.
    """
    if isinstance(source, (str, os.PathLike)):
        from cace_server.model import load_model  # torch-heavy; import where used

        return load_model(str(source), device=device or "cpu", dtype=dtype)  # type: ignore[no-any-return]
    to = getattr(source, "to", None)
    if to is not None and (device is not None or dtype is not None):
        import torch

        kwargs: dict[str, Any] = {}
        if device is not None:
            kwargs["device"] = torch.device(device)
        if dtype is not None:
            kwargs["dtype"] = getattr(torch, dtype)
        # torch.nn.Module.to works in place; the return value is ignored so that a
        # wrapper delegating ``to`` to the module it wraps stays the served object.
        to(**kwargs)
    return source


def describe(name: str, model: ServedModel, *, default: bool, source: str | None) -> ModelInfo:
    """Read a model's description once (on the worker thread, after loading)."""
    config = getattr(model, "config", None)
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        config_dict = dataclasses.asdict(config)
    elif isinstance(config, dict):
        config_dict = dict(config)
    else:
        config_dict = {}
    has_charges = bool(getattr(model, "has_charges", False))
    outputs = getattr(model, "outputs", None)
    if outputs is None:  # a model older than the outputs list: what CACEPotential had
        outputs = ("energy", "forces", "stress", "charges" if has_charges else "energies")
    describe_model = getattr(model, "describe", None)
    # JSON-safe (it is served as is by /v1/models): anything else becomes its str().
    description = (
        json.loads(json.dumps(dict(describe_model()), default=str))
        if callable(describe_model)
        else {}
    )
    return ModelInfo(
        name=name,
        default=default,
        elements=tuple(int(z) for z in model.elements),
        cutoff=float(model.cutoff),
        dtype=str(getattr(model, "dtype", "unknown")).removeprefix("torch."),
        device=str(getattr(model, "device", "unknown")),
        n_parameters=int(getattr(model, "n_parameters", 0)),
        has_charges=has_charges or "charges" in outputs,
        source=source,
        config=config_dict,
        outputs=tuple(o for o in OUTPUTS if o in outputs),
        required_inputs=tuple(str(k) for k in getattr(model, "required_inputs", ())),
        description=description,
    )


def check_inputs(structure: Structure, required: Sequence[str]) -> None:
    """Raise StructureError when a per-atom input the model reads is missing."""
    missing = [name for name in required if name not in structure.arrays]
    if missing:
        raise StructureError(
            f"the model needs the per-atom input(s) {', '.join(map(repr, missing))}, "
            "which the structure does not carry"
        )


def warmup_structure(info: ModelInfo) -> Structure:
    """A small non-periodic cluster with two atoms of every element, all neighbours.

    Per-atom inputs the model needs are zeros (the warm-up checks only that it runs).
    """
    numbers = [z for z in info.elements for _ in range(2)]
    side = math.ceil(len(numbers) ** (1 / 3))
    spacing = min(1.5, 0.4 * info.cutoff)
    grid = np.array([(i, j, k) for i in range(side) for j in range(side) for k in range(side)])
    positions = grid[: len(numbers)] * spacing
    arrays = {name: np.zeros(len(numbers)) for name in info.required_inputs}
    return Structure.create(numbers, positions, arrays=arrays)


def warmup_box(info: ModelInfo, seed: int = 0) -> Structure:
    """A periodic cubic box of 64 atoms (every element, in turn) on a jittered lattice."""
    side = 4
    spacing = min(1.5, 0.4 * info.cutoff)
    grid = np.array([(i, j, k) for i in range(side) for j in range(side) for k in range(side)])
    rng = np.random.default_rng(seed)
    positions = (grid + rng.uniform(-0.1, 0.1, grid.shape)) * spacing
    numbers = [info.elements[i % len(info.elements)] for i in range(len(grid))]
    arrays = {name: np.zeros(len(numbers)) for name in info.required_inputs}
    return Structure.create(numbers, positions, np.eye(3) * side * spacing, True, arrays)


def warmup_batches(
    info: ModelInfo,
    *,
    largest_atoms: int,
    largest_pairs: int,
    prepare: Callable[[Structure], Any],
) -> Iterator[tuple[str, list[Any]]]:
    """(label, prepared structures) of each warm-up call.

    An open cluster, one periodic box, a batch of four boxes, and, when
    ``largest_atoms`` is above that, as many boxes as fit in ``largest_atoms`` atoms
    and ``largest_pairs`` pairs (the largest batch the engine forms).
    """
    yield "open cluster", [prepare(warmup_structure(info))]
    boxes = [prepare(warmup_box(info, seed)) for seed in range(4)]
    yield "periodic box", boxes[:1]
    yield "4 periodic boxes", boxes
    atoms, pairs = boxes[0].n_atoms, max(boxes[0].n_pairs, 1)
    n = min(largest_atoms // atoms, largest_pairs // pairs)
    if n > len(boxes):
        yield f"largest batch ({n} boxes)", [boxes[k % len(boxes)] for k in range(n)]
