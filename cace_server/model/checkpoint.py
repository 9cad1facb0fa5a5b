"""Reading checkpoints written by the original CACE package, without that package.

The original package saves whole models with ``torch.save(model)``: a pickle of
its ``nn.Module`` tree. Unpickling such a file normally imports the classes it
names and may run any callable the file asks for. Here we unpickle with an
allow-list instead:

* tensors and storages are rebuilt by torch's own loader (the same functions the
  ``weights_only`` loader allows);
* a handful of harmless builtins (``set``, ``OrderedDict``, ``torch.device``);
* every module class of the original package and of ``torch.nn`` that a CACE model
  uses is replaced by an inert :class:`PickledObject` which only records the
  attribute dictionary the pickle carries. No code of those classes runs (it is not
  even installed), and the importer reads the recorded attributes;
* activation functions are recorded by name.

Anything else (``os.system``, ``builtins.eval``, an unknown class) is refused with
:class:`UnsafeCheckpointError` naming the global the file asked for.
"""

from __future__ import annotations

import pickle
import types
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch


class UnsafeCheckpointError(pickle.UnpicklingError):
    """The checkpoint references a global that is not on the allow-list."""


class UnsupportedCheckpointError(ValueError):
    """The checkpoint is a valid CACE pickle but uses a feature we do not implement."""


class PickledObject:
    """Inert stand-in for a class instance found in a checkpoint.

    ``__class_path__`` is the dotted path of the original class; instance attributes
    are whatever the pickle's state set. Calling the class (a ``REDUCE`` on it) is
    refused, so a pickle cannot use it to run anything.
    """

    __class_path__: str = ""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise UnsafeCheckpointError(f"checkpoint tries to call {self.__class_path__}(...); refused")

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 2:  # (dict, slots) form
            state = {**(state[0] or {}), **(state[1] or {})}
        if not isinstance(state, dict):
            raise UnsafeCheckpointError(f"unexpected state for {self.__class_path__}")
        self.__dict__.update(state)

    @property
    def class_name(self) -> str:
        return self.__class_path__.rsplit(".", 1)[-1]

    def __repr__(self) -> str:
        return f"<pickled {self.__class_path__}>"


class Activation:
    """An activation function recorded by name (e.g. ``silu``)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"Activation({self.name!r})"


# Classes the CACE models we support are built from. Each becomes a PickledObject.
ALLOWED_CLASSES: frozenset[str] = frozenset(
    {
        "cace.models.atomistic.NeuralNetworkPotential",
        "cace.representations.cace_representation.Cace",
        "cace.modules.type.NodeEncoder",
        "cace.modules.type.NodeEmbedding",
        "cace.modules.type.EdgeEncoder",
        "cace.modules.radial.BesselRBF",
        "cace.modules.cutoff.PolynomialCutoff",
        "cace.modules.angular.AngularComponent",
        "cace.modules.radial_transform.SharedRadialLinearTransform",
        "cace.modules.symmetrize_basis.Symmetrizer",
        "cace.modules.interaction.NodeMemory",
        "cace.modules.interaction.MessageAr",
        "cace.modules.interaction.MessageBchi",
        "cace.modules.atomwise.Atomwise",
        "cace.modules.blocks.Dense",
        "cace.modules.ewald.EwaldPotential",
        "cace.modules.feature_mix.FeatureAdd",
        "cace.modules.forces.Forces",
        "cace.modules.preprocess.Preprocess",
        "torch.nn.modules.linear.Linear",
        "torch.nn.modules.linear.Identity",
        "torch.nn.modules.container.Sequential",
        "torch.nn.modules.container.ModuleList",
        "torch.nn.modules.container.ParameterList",
        "torch.nn.modules.container.ModuleDict",
    }
)

ALLOWED_ACTIVATIONS: dict[str, str] = {
    "torch.nn.functional.silu": "silu",
    "torch.nn.functional.relu": "relu",
    "torch.nn.functional.tanh": "tanh",
    "torch.nn.functional.sigmoid": "sigmoid",
    "torch.tanh": "tanh",
    "torch.sigmoid": "sigmoid",
}

ALLOWED_FUNCTIONS: dict[str, Any] = {
    "torch._utils._rebuild_tensor_v2": torch._utils._rebuild_tensor_v2,
    "torch._utils._rebuild_parameter": torch._utils._rebuild_parameter,
    "collections.OrderedDict": OrderedDict,
    "builtins.set": set,
    "__builtin__.set": set,
    "torch.device": torch.device,
}

_stub_classes: dict[str, type[PickledObject]] = {}


def _stub_class(path: str) -> type[PickledObject]:
    if path not in _stub_classes:
        _stub_classes[path] = type(
            path.rsplit(".", 1)[-1], (PickledObject,), {"__class_path__": path}
        )
    return _stub_classes[path]


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves globals only from the allow-lists above."""

    def find_class(self, module: str, name: str) -> Any:
        path = f"{module}.{name}"
        if path in ALLOWED_FUNCTIONS:
            return ALLOWED_FUNCTIONS[path]
        if path in ALLOWED_ACTIVATIONS:
            return Activation(ALLOWED_ACTIVATIONS[path])
        if path in ALLOWED_CLASSES:
            return _stub_class(path)
        if module.split(".")[0] == "cace":
            raise UnsupportedCheckpointError(
                f"checkpoint uses {path}, which cace-server does not support"
            )
        raise UnsafeCheckpointError(
            f"checkpoint refers to {path}, which is not on the allow-list; "
            "refusing to unpickle it (it could run arbitrary code)"
        )


# torch.load(pickle_module=...) needs an object with Unpickler and load attributes.
restricted_pickle = types.ModuleType("restricted_pickle")
restricted_pickle.Unpickler = RestrictedUnpickler  # type: ignore[attr-defined]
restricted_pickle.load = lambda f, **kw: RestrictedUnpickler(f, **kw).load()  # type: ignore[attr-defined]
restricted_pickle.__name__ = "restricted_pickle"


def read_original_checkpoint(path: str | Path) -> PickledObject:
    """Unpickle an original CACE checkpoint into a tree of :class:`PickledObject`.

    Raises :class:`UnsafeCheckpointError` for a pickle that references anything off
    the allow-list, and :class:`UnsupportedCheckpointError` for a CACE module we do
    not implement.
    """
    try:
        obj = torch.load(
            str(path), map_location="cpu", pickle_module=restricted_pickle, weights_only=False
        )
    except (UnsafeCheckpointError, UnsupportedCheckpointError):
        raise
    except Exception as exc:  # malformed pickles raise anything, MemoryError included
        raise UnsupportedCheckpointError(
            f"{path}: not a readable torch checkpoint ({exc})"
        ) from exc
    if not isinstance(obj, PickledObject):
        raise UnsupportedCheckpointError(
            f"{path}: expected a pickled CACE model, found {type(obj).__name__}"
        )
    return obj
