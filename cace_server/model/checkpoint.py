"""Reading checkpoints written by the original CACE package, without that package.

The original package saves whole models with ``torch.save(model)``: a pickle of
its ``nn.Module`` tree. Unpickling such a file normally imports the classes it
names and may run any callable the file asks for. Here we unpickle with an
allow-list instead:

* tensors and storages are rebuilt by torch's own loader (the same functions the
  ``weights_only`` loader allows);
* a handful of harmless builtins (``set``, ``OrderedDict``, ``torch.device``);
* every module class of the original package and of ``torch.nn`` on the caller's
  :class:`AllowList` (the importer builds it from the classes its readers declare)
  is replaced by an inert :class:`PickledObject` which only records the attribute
  dictionary the pickle carries. No code of those classes runs (it is not even
  installed), and the importer reads the recorded attributes;
* activation functions are recorded by name.

Anything else (``os.system``, ``builtins.eval``, an unknown class) is refused with
:class:`UnsafeCheckpointError` naming the global the file asked for.
"""

from __future__ import annotations

import functools
import pickle
import types
from collections import OrderedDict
from dataclasses import dataclass
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


class MethodReference:
    """A bound method of a pickled object, recorded by name (never looked up or called).

    Pickles store ``obj.method`` as ``getattr(obj, "method")``; only the names in
    :data:`ALLOWED_METHODS` are accepted, and only on inert :class:`PickledObject` s.
    """

    def __init__(self, owner: PickledObject, name: str) -> None:
        self.owner = owner
        self.name = name

    def __repr__(self) -> str:
        return f"MethodReference({self.owner!r}, {self.name!r})"


class FunctionReference:
    """A module-level function of the original package, recorded by its dotted path."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __repr__(self) -> str:
        return f"FunctionReference({self.path!r})"


@dataclass(frozen=True)
class AllowList:
    """The globals of one kind of model file, on top of the fixed entries above.

    The importer builds it from what its readers declare
    (:func:`cace_server.model.importer.registry.allow_list`).
    """

    # Dotted class paths; each becomes an inert PickledObject.
    classes: frozenset[str] = frozenset()
    # Module-level functions of the original, recorded as FunctionReference.
    functions: frozenset[str] = frozenset()
    # Method names a pickle may take from a PickledObject with getattr.
    methods: frozenset[str] = frozenset()
    # Packages whose other globals are unsupported features rather than unsafe ones.
    packages: frozenset[str] = frozenset()


# Plain data only: tensors, containers, numeric numpy scalars.
NO_MODEL_CLASSES = AllowList()


def _safe_getattr(methods: frozenset[str], obj: Any, name: Any) -> MethodReference:
    if isinstance(obj, PickledObject) and isinstance(name, str) and name in methods:
        return MethodReference(obj, name)
    owner = obj.__class_path__ if isinstance(obj, PickledObject) else type(obj).__name__
    raise UnsafeCheckpointError(
        f"checkpoint asks for getattr({owner}, {name!r}), which is not on the allow-list"
    )


# numpy scalars (e.g. numpy.int64 element numbers) are pickled as
# scalar(dtype, raw bytes); only plain numeric dtypes are rebuilt.
_NUMERIC_KINDS = frozenset("biufc")


def _safe_numpy_dtype(spec: Any, align: Any = False, copy: Any = True) -> Any:
    import numpy as np

    if not isinstance(spec, str):
        raise UnsafeCheckpointError(f"numpy dtype from {type(spec).__name__} is refused")
    try:
        dtype = np.dtype(spec)
    except TypeError as exc:
        raise UnsafeCheckpointError(f"numpy dtype {spec!r} is refused") from exc
    if dtype.kind not in _NUMERIC_KINDS or dtype.fields is not None or dtype.subdtype:
        raise UnsafeCheckpointError(f"numpy dtype {spec!r} is not a plain numeric type; refused")
    return dtype


def _safe_numpy_scalar(dtype: Any, data: Any = None) -> Any:
    import numpy as np

    if not isinstance(dtype, np.dtype) or dtype.kind not in _NUMERIC_KINDS:
        raise UnsafeCheckpointError("numpy scalar of a non-numeric dtype is refused")
    if not isinstance(data, bytes) or len(data) != dtype.itemsize:
        raise UnsafeCheckpointError("numpy scalar with malformed data is refused")
    return np.frombuffer(data, dtype=dtype)[0]


def _safe_codecs_encode(text: Any, encoding: Any = "utf-8") -> bytes:
    # How protocol-2 pickles write bytes (numpy scalar data among them).
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise UnsafeCheckpointError("_codecs.encode is allowed only for latin-1 text")
    return text.encode("latin-1")


ALLOWED_FUNCTIONS.update(
    {
        "numpy.dtype": _safe_numpy_dtype,
        "numpy.core.multiarray.scalar": _safe_numpy_scalar,
        "numpy._core.multiarray.scalar": _safe_numpy_scalar,
        "_codecs.encode": _safe_codecs_encode,
    }
)

# Packages whose models are not CACE models; named so the user knows what they have.
FOREIGN_PACKAGES: dict[str, str] = {
    "mace": "a MACE model",
    "nequip": "a NequIP model",
    "allegro": "an Allegro model",
    "e3nn": "an e3nn-based model (MACE, NequIP, ...)",
    "schnetpack": "a SchNetPack model",
}

_stub_classes: dict[str, type[PickledObject]] = {}


def _stub_class(path: str) -> type[PickledObject]:
    if path not in _stub_classes:
        _stub_classes[path] = type(
            path.rsplit(".", 1)[-1], (PickledObject,), {"__class_path__": path}
        )
    return _stub_classes[path]


_GETATTR = frozenset({"builtins.getattr", "__builtin__.getattr"})


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves globals only from the fixed entries and ``allowed``."""

    def __init__(self, file: Any, *, allowed: AllowList, **kwargs: Any) -> None:
        super().__init__(file, **kwargs)
        self.allowed = allowed

    def find_class(self, module: str, name: str) -> Any:
        path = f"{module}.{name}"
        if path in ALLOWED_FUNCTIONS:
            return ALLOWED_FUNCTIONS[path]
        if path in _GETATTR:
            return functools.partial(_safe_getattr, self.allowed.methods)
        if path in ALLOWED_ACTIVATIONS:
            return Activation(ALLOWED_ACTIVATIONS[path])
        if path in self.allowed.classes:
            return _stub_class(path)
        if path in self.allowed.functions:
            return FunctionReference(path)
        package = module.split(".")[0]
        if package in FOREIGN_PACKAGES:
            raise UnsupportedCheckpointError(
                f"this file is {FOREIGN_PACKAGES[package]} (it refers to {path}), not a CACE "
                "model; cace-server serves CACE models only"
            )
        if package in self.allowed.packages:
            raise UnsupportedCheckpointError(
                f"checkpoint uses {path}, which cace-server does not support"
            )
        raise UnsafeCheckpointError(
            f"checkpoint refers to {path}, which is not on the allow-list; "
            "refusing to unpickle it (it could run arbitrary code)"
        )


def _pickle_module(allowed: AllowList) -> types.ModuleType:
    """What torch.load(pickle_module=...) needs: Unpickler and load, bound to ``allowed``."""

    class Unpickler(RestrictedUnpickler):
        def __init__(self, file: Any, **kwargs: Any) -> None:
            super().__init__(file, allowed=allowed, **kwargs)

    module = types.ModuleType("restricted_pickle")
    module.Unpickler = Unpickler  # type: ignore[attr-defined]
    module.load = lambda f, **kw: Unpickler(f, **kw).load()  # type: ignore[attr-defined]
    return module


def _refuse_torchscript(path: str | Path) -> None:
    """TorchScript archives carry code (their own Python-like programs): never loaded."""
    import zipfile

    try:
        if not zipfile.is_zipfile(path):
            return
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except OSError:
        return
    if any(n.split("/", 1)[-1].startswith(("code/", "constants.pkl")) for n in names):
        raise UnsupportedCheckpointError(
            f"{path}: a TorchScript archive (it carries compiled code, which cace-server "
            "never runs); convert the model saved with torch.save(model) instead"
        )


def describe_foreign_object(path: str | Path, obj: Any) -> str:
    """Why an unpickled object that is not a model cannot be converted."""
    if isinstance(obj, dict) and "model_state_dict" in obj:
        return (
            f"{path}: a training checkpoint (model_state_dict and optimizer state, keys "
            f"{sorted(map(str, obj))[:6]}): it holds weights but no architecture. Convert "
            "the best_model.pth written next to it, or give the model file whose "
            "architecture it was trained with: `cace-server convert CHECKPOINT OUT "
            "--architecture best_model.pth`"
        )
    return f"{path}: expected a pickled CACE model, found {type(obj).__name__}"


def load_restricted(path: str | Path, allowed: AllowList = NO_MODEL_CLASSES) -> Any:
    """Unpickle any torch file with the fixed entries plus ``allowed`` (tensors, dicts,
    inert modules)."""
    _refuse_torchscript(path)
    try:
        obj = torch.load(
            str(path),
            map_location="cpu",
            pickle_module=_pickle_module(allowed),
            weights_only=False,
        )
    except (UnsafeCheckpointError, UnsupportedCheckpointError):
        raise
    except Exception as exc:  # malformed pickles raise anything, MemoryError included
        raise UnsupportedCheckpointError(
            f"{path}: not a readable torch checkpoint ({exc})"
        ) from exc
    return obj
