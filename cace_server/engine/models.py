"""What the engine needs of a model, how it loads one, and what it reports about it."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np

from cace_server.outputs import SERVED, Outputs
from cace_server.structures import BatchCost, Prediction, Structure, StructureError

if TYPE_CHECKING:
    from cace_server.model.io import ModelFilePolicy


class NeighborListCache(Protocol):
    """A reusable neighbour list of one evolving structure (Verlet list with a skin)."""

    @property
    def nbytes(self) -> int:
        """Bytes it holds (the engine budgets kept lists by them)."""
        ...

    def covers(self, structure: Structure) -> bool: ...

    def prepare(self, structure: Structure) -> tuple[Any, bool]: ...


@runtime_checkable
class ServedModel(Protocol):
    """Everything the engine uses of a model; every served model implements all of it.

    ``cace_server.model.CACEPotential`` is the reference implementation; test models
    and wrappers (the fault injector) implement the same members, and
    ``tests/test_model_conformance.py`` checks every family against this contract.
    The engine reads nothing else of a model (no ``getattr`` with a fallback).
    """

    @property
    def elements(self) -> tuple[int, ...]: ...

    @property
    def cutoff(self) -> float: ...

    @property
    def dtype(self) -> Any: ...  # torch.dtype; printed as e.g. "float64"

    @property
    def device(self) -> Any: ...  # torch.device

    @property
    def n_parameters(self) -> int: ...

    #: names of :data:`cace_server.outputs.CATALOGUE` that :meth:`predict` can return
    @property
    def outputs(self) -> tuple[str, ...]: ...

    #: per-atom arrays each structure must carry in ``Structure.arrays``
    @property
    def required_inputs(self) -> tuple[str, ...]: ...

    def describe(self) -> Mapping[str, Any]:
        """JSON-able description: family, long range, architecture (``/v1/models``)."""
        ...

    def prepare(self, structure: Structure) -> Any:
        """Validate a structure and build its neighbour list (any thread)."""
        ...

    def verlet_list(self, skin: float) -> NeighborListCache:
        """A neighbour list kept across the steps of one evolving structure."""
        ...

    def batch_cost(self, prepared: Any) -> BatchCost:
        """What a prepared structure adds to a batch (atoms, neighbour pairs)."""
        ...

    def predict(self, structures: Sequence[Any], outputs: Outputs) -> list[Prediction]:
        """One prediction per prepared structure, holding exactly ``outputs``."""
        ...

    def configure_long_range(self, **options: str) -> None:
        """Long-range evaluation options (mode, method); a no-op without a long-range term."""
        ...

    def to(self, *args: Any, **kwargs: Any) -> Any:
        """Move to a device/dtype in place (``torch.nn.Module.to``)."""
        ...


class ModelWrapper:
    """A served model that forwards every member of :class:`ServedModel` to ``inner``.

    Subclasses override what they change (the fault injector, test models that
    count or alter calls) and remain complete models.
    """

    def __init__(self, inner: ServedModel) -> None:
        self.inner = inner

    @property
    def elements(self) -> tuple[int, ...]:
        return self.inner.elements

    @property
    def cutoff(self) -> float:
        return self.inner.cutoff

    @property
    def dtype(self) -> Any:
        return self.inner.dtype

    @property
    def device(self) -> Any:
        return self.inner.device

    @property
    def n_parameters(self) -> int:
        return self.inner.n_parameters

    @property
    def outputs(self) -> tuple[str, ...]:
        return self.inner.outputs

    @property
    def required_inputs(self) -> tuple[str, ...]:
        return self.inner.required_inputs

    def describe(self) -> Mapping[str, Any]:
        return self.inner.describe()

    def prepare(self, structure: Structure) -> Any:
        return self.inner.prepare(structure)

    def verlet_list(self, skin: float) -> NeighborListCache:
        return self.inner.verlet_list(skin)

    def batch_cost(self, prepared: Any) -> BatchCost:
        return self.inner.batch_cost(prepared)

    def predict(self, structures: Sequence[Any], outputs: Outputs) -> list[Prediction]:
        return self.inner.predict(structures, outputs)

    def refuse_undeclared(self, outputs: Outputs) -> None:
        """Raise OutputNotOffered for outputs this wrapper does not declare (for
        subclasses that change :attr:`outputs`)."""
        outputs.require(self.outputs)

    def configure_long_range(self, **options: str) -> None:
        self.inner.configure_long_range(**options)

    def to(self, *args: Any, **kwargs: Any) -> Any:
        self.inner.to(*args, **kwargs)
        return self


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
    source: str | None
    #: what the model serves (a subset of :data:`cace_server.outputs.SERVED`).
    outputs: tuple[str, ...] = ("energy", "forces", "stress", "energies")
    #: per-atom inputs each structure must carry in ``Structure.arrays``.
    required_inputs: tuple[str, ...] = ()
    #: the model's own description (family, long range, ...), from ``model.describe()``.
    description: dict[str, Any] = dataclasses.field(default_factory=dict)
    #: the served version: short SHA-256 of its file(s) (:func:`model_sha`); None for a
    #: model built in memory
    sha: str | None = None

    @property
    def family(self) -> list[str]:
        """The model families it is built of, e.g. ["cace", "combine"]."""
        value = self.description.get("family", "cace")
        return [str(f) for f in value] if isinstance(value, list) else [str(value)]

    @property
    def has_charges(self) -> bool:
        return "charges" in self.outputs

    @property
    def long_range(self) -> bool:
        """Whether it has a long-range term (its description says which)."""
        return bool(self.description.get("long_range", self.has_charges))


@dataclass(frozen=True)
class CatalogueEntry:
    """One served model as the engine's frontends side sees it (see ``Engine``)."""

    info: ModelInfo
    #: the copy whose ``prepare``, ``verlet_list`` and ``batch_cost`` the engine's
    #: prepare threads call (a worker's copy; workers alone call ``predict``)
    model: ServedModel


def default_name(source: ModelSource) -> str:
    """Name of a model given without one: a file's stem, else ``"default"``."""
    if isinstance(source, (str, os.PathLike)):
        return Path(source).stem or "default"
    return "default"


def materialize(
    source: ModelSource,
    device: str | None,
    dtype: str | None,
    policy: ModelFilePolicy | None = None,
) -> ServedModel:
    """Load a model file or a committee (``load_served``; files as ``policy`` allows,
    default: ``DEFAULT_POLICY``), or move a built model to ``device``/``dtype`` (in place).

    Runs on the engine's worker thread: it is the only thread that touches the device.
    """
    if isinstance(source, (str, os.PathLike)):
        from cace_server.model import load_served  # torch-heavy; import where used
        from cace_server.model.io import DEFAULT_POLICY

        loaded: ServedModel = load_served(
            str(source), device=device or "cpu", dtype=dtype, policy=policy or DEFAULT_POLICY
        )
        return loaded
    if device is not None or dtype is not None:
        import torch

        kwargs: dict[str, Any] = {}
        if device is not None:
            kwargs["device"] = torch.device(device)
        if dtype is not None:
            kwargs["dtype"] = getattr(torch, dtype)
        # torch.nn.Module.to works in place; the return value is ignored so that a
        # wrapper delegating ``to`` to the module it wraps stays the served object.
        source.to(**kwargs)
    return source


#: hex digits of the SHA-256 that name a model version (``model_sha``)
SHA_DIGITS = 12


def model_sha(source: ModelSource) -> str | None:
    """The version of a model source: the short SHA-256 of its file; for a committee, of
    its committee file (if any) and its members' digests; None for a built model."""
    if not isinstance(source, (str, os.PathLike)):
        return None
    import hashlib

    from cace_server.model.committee import committee_spec
    from cace_server.model.io import file_digest

    text = str(source)
    spec = committee_spec(text)
    if spec is None:
        return file_digest(text)[:SHA_DIGITS]
    h = hashlib.sha256()
    if text.endswith(".toml"):
        h.update(file_digest(text).encode())
    for member in spec.members:
        h.update(file_digest(member).encode())
    return h.hexdigest()[:SHA_DIGITS]


def describe(
    name: str,
    model: ServedModel,
    *,
    default: bool,
    source: str | None,
    sha: str | None = None,
) -> ModelInfo:
    """Read a model's description once (on the worker thread, after loading)."""
    offered = set(model.outputs)
    outputs = tuple(name for name in SERVED if name in offered)
    # JSON-safe (it is served as is by /v1/models): anything else becomes its str().
    description = json.loads(json.dumps(dict(model.describe()), default=str))
    return ModelInfo(
        name=name,
        default=default,
        elements=tuple(int(z) for z in model.elements),
        cutoff=float(model.cutoff),
        dtype=str(model.dtype).removeprefix("torch."),
        device=str(model.device),
        n_parameters=int(model.n_parameters),
        source=source,
        outputs=outputs,
        required_inputs=tuple(str(k) for k in model.required_inputs),
        description=description,
        sha=sha,
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
    cost: Callable[[Any], BatchCost],
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
    atoms, pairs = cost(boxes[0])
    atoms, pairs = max(atoms, 1), max(pairs, 1)
    n = min(largest_atoms // atoms, largest_pairs // pairs)
    if n > len(boxes):
        yield f"largest batch ({n} boxes)", [boxes[k % len(boxes)] for k in range(n)]
