"""The importer's table: original class -> the reader that understands it.

Each family module registers the original classes it reads, by full class path
(``("cace.models.atomistic", "NeuralNetworkPotential")``), and declares with
:func:`reads` the classes its readers only look inside. The restricted unpickler's
allow-list of model classes is built from these declarations (:func:`allow_list`),
so adding a family of original models is one new module that registers its readers
(and one import in ``importer/__init__.py``), not a new branch in an existing
function nor an edit of the allow-list.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cace_server.model.checkpoint import AllowList, PickledObject, UnsupportedCheckpointError
from cace_server.model.importer.assembly import ModelScope

# (module, class name) as the pickle names it, e.g. ("cace.modules.atomwise", "Atomwise").
ClassPath = tuple[str, str]

# A root reader turns the whole pickled model into ModelConfig fields + weights.
RootReader = Callable[[PickledObject], tuple[dict[str, Any], dict[str, Any]]]


@dataclass(frozen=True)
class OutputModuleReader:
    """Reads one output module of a NeuralNetworkPotential into the model scope."""

    read: Callable[[PickledObject, ModelScope], None]
    # Per-atom keys this module consumes as latent charges (known before any is read).
    charge_inputs: Callable[[PickledObject], list[str]] = lambda module: []
    family: str = "cace"


# Keyed by the dotted class path (PickledObject.__class_path__).
ROOT_READERS: dict[str, RootReader] = {}
OUTPUT_MODULE_READERS: dict[str, OutputModuleReader] = {}
# Every class path some reader reads or looks inside, and the original functions and
# methods a model file may name; together the unpickler's allow-list.
READ_CLASSES: set[str] = set()
READ_FUNCTIONS: set[str] = set()
READ_METHODS: set[str] = set()

# torch's own classes off the list are refused as unsafe, not as unsupported features.
_NOT_ORIGINAL_PACKAGES = frozenset({"torch"})


def dotted(path: ClassPath) -> str:
    return ".".join(path)


def reads(*paths: ClassPath) -> None:
    """Declare classes a family's readers look inside (submodules, containers)."""
    READ_CLASSES.update(dotted(p) for p in paths)


def reads_functions(*paths: ClassPath, methods: tuple[str, ...] = ()) -> None:
    """Declare module-level functions of the original that a model file may name, and
    method names it may take from one of its modules with ``getattr``."""
    READ_FUNCTIONS.update(dotted(p) for p in paths)
    READ_METHODS.update(methods)


def allow_list() -> AllowList:
    """The unpickler's allow-list: every class, function and method declared above."""
    paths = READ_CLASSES | READ_FUNCTIONS
    return AllowList(
        classes=frozenset(READ_CLASSES),
        functions=frozenset(READ_FUNCTIONS),
        methods=frozenset(READ_METHODS),
        packages=frozenset(p.split(".")[0] for p in paths) - _NOT_ORIGINAL_PACKAGES,
    )


def root_reader(path: ClassPath) -> Callable[[RootReader], RootReader]:
    def register(fn: RootReader) -> RootReader:
        ROOT_READERS[dotted(path)] = fn
        reads(path)
        return fn

    return register


def output_module_reader(
    path: ClassPath,
    *,
    charge_inputs: Callable[[PickledObject], list[str]] | None = None,
    family: str = "cace",
) -> Callable[[Callable[[PickledObject, ModelScope], None]], Callable[..., None]]:
    def register(
        fn: Callable[[PickledObject, ModelScope], None],
    ) -> Callable[[PickledObject, ModelScope], None]:
        OUTPUT_MODULE_READERS[dotted(path)] = OutputModuleReader(
            fn, charge_inputs or (lambda module: []), family
        )
        reads(path)
        return fn

    return register


def reader_for(module: PickledObject) -> OutputModuleReader:
    reader = OUTPUT_MODULE_READERS.get(module.__class_path__)
    if reader is None:
        raise UnsupportedCheckpointError(f"output module {module.__class_path__} is not supported")
    return reader
