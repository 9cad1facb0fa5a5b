"""The importer's table: original class name -> the reader that understands it.

Each family module registers the original classes it reads; adding a family of
original models is one new module that registers its readers (and one import in
``importer/__init__.py``), not a new branch in an existing function.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cace_server.model.checkpoint import PickledObject, UnsupportedCheckpointError
from cace_server.model.importer.assembly import ModelScope

# A root reader turns the whole pickled model into ModelConfig fields + weights.
RootReader = Callable[[PickledObject], tuple[dict[str, Any], dict[str, Any]]]


@dataclass(frozen=True)
class OutputModuleReader:
    """Reads one output module of a NeuralNetworkPotential into the model scope."""

    read: Callable[[PickledObject, ModelScope], None]
    # Per-atom keys this module consumes as latent charges (known before any is read).
    charge_inputs: Callable[[PickledObject], list[str]] = lambda module: []
    family: str = "cace"


ROOT_READERS: dict[str, RootReader] = {}
OUTPUT_MODULE_READERS: dict[str, OutputModuleReader] = {}


def root_reader(class_name: str) -> Callable[[RootReader], RootReader]:
    def register(fn: RootReader) -> RootReader:
        ROOT_READERS[class_name] = fn
        return fn

    return register


def output_module_reader(
    class_name: str,
    *,
    charge_inputs: Callable[[PickledObject], list[str]] | None = None,
    family: str = "cace",
) -> Callable[[Callable[[PickledObject, ModelScope], None]], Callable[..., None]]:
    def register(
        fn: Callable[[PickledObject, ModelScope], None],
    ) -> Callable[[PickledObject, ModelScope], None]:
        OUTPUT_MODULE_READERS[class_name] = OutputModuleReader(
            fn, charge_inputs or (lambda module: []), family
        )
        return fn

    return register


def reader_for(module: PickledObject) -> OutputModuleReader:
    reader = OUTPUT_MODULE_READERS.get(module.class_name)
    if reader is None:
        raise UnsupportedCheckpointError(f"output module {module.__class_path__} is not supported")
    return reader
