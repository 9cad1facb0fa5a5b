"""What the engine needs of a model, how it loads one, and what it reports about it."""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from cace_server.structures import Prediction, Structure


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

    def predict(self, structures: Sequence[Any], *, stress: bool = True) -> list[Prediction]: ...


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
    return ModelInfo(
        name=name,
        default=default,
        elements=tuple(int(z) for z in model.elements),
        cutoff=float(model.cutoff),
        dtype=str(getattr(model, "dtype", "unknown")).removeprefix("torch."),
        device=str(getattr(model, "device", "unknown")),
        n_parameters=int(getattr(model, "n_parameters", 0)),
        has_charges=bool(getattr(model, "has_charges", False)),
        source=source,
        config=config_dict,
    )


def warmup_structure(elements: Sequence[int], cutoff: float) -> Structure:
    """A small non-periodic cluster with two atoms of every element, all neighbours."""
    numbers = [z for z in elements for _ in range(2)]
    side = math.ceil(len(numbers) ** (1 / 3))
    spacing = min(1.5, 0.4 * cutoff)
    grid = np.array([(i, j, k) for i in range(side) for j in range(side) for k in range(side)])
    positions = grid[: len(numbers)] * spacing
    return Structure.create(numbers, positions)
