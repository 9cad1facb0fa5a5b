"""Reading original model files with the allow-list the importer's readers declare.

:mod:`cace_server.model.checkpoint` unpickles with whatever allow-list it is given;
here it is the registry's (:func:`~cace_server.model.importer.registry.allow_list`),
complete once ``cace_server.model.importer`` has imported its family modules (Python
runs the package before this module, and the list is read at call time).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from cace_server.model.checkpoint import (
    PickledObject,
    UnsupportedCheckpointError,
    describe_foreign_object,
    load_restricted,
)
from cace_server.model.importer.registry import allow_list


def read_original_checkpoint(path: str | Path) -> PickledObject:
    """Unpickle an original CACE checkpoint into a tree of :class:`PickledObject`.

    Raises :class:`UnsafeCheckpointError` for a pickle that references anything off
    the allow-list, and :class:`UnsupportedCheckpointError` for a CACE module we do
    not implement, a TorchScript archive, a training checkpoint or a foreign model.
    """
    obj = load_restricted(path, allow_list())
    if not isinstance(obj, PickledObject):
        raise UnsupportedCheckpointError(describe_foreign_object(path, obj))
    return obj


def read_training_checkpoint(path: str | Path, architecture: str | Path) -> PickledObject:
    """An original model tree (from ``architecture``) with the weights of a training
    checkpoint (``{"model_state_dict": ..., "optimizer_state_dict": ...}``).

    This is how users of the original pick another epoch than the best one: the
    checkpoint has weights but no architecture, the model file has both.
    """
    data = load_restricted(path, allow_list())
    if not isinstance(data, dict) or not isinstance(data.get("model_state_dict"), dict):
        raise UnsupportedCheckpointError(f"{path}: not a training checkpoint (no model_state_dict)")
    root = read_original_checkpoint(architecture)
    state: dict[str, Any] = data["model_state_dict"]
    slots = _tensor_slots(root)
    missing = sorted(set(slots) - set(state))
    unexpected = sorted(set(state) - set(slots))
    if missing or unexpected:
        raise UnsupportedCheckpointError(
            f"{path} does not fit the architecture of {architecture}: "
            f"missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    for key, (table, name) in slots.items():
        old, new = table[name], state[key]
        if not isinstance(new, torch.Tensor) or tuple(new.shape) != tuple(old.shape):
            raise UnsupportedCheckpointError(f"{path}: {key} has the wrong shape")
        table[name] = new.to(old.dtype)
    return root


def _tensor_slots(root: PickledObject) -> dict[str, tuple[dict[str, Any], str]]:
    """state_dict key -> (the parameter/buffer table holding it, name), as torch names them."""
    slots: dict[str, tuple[dict[str, Any], str]] = {}
    seen: set[int] = set()

    def walk(obj: PickledObject, prefix: str) -> None:
        if id(obj) in seen:  # shared submodules appear once in a state_dict
            return
        seen.add(id(obj))
        non_persistent = obj.__dict__.get("_non_persistent_buffers_set") or set()
        for store in ("_parameters", "_buffers"):
            table = obj.__dict__.get(store) or {}
            for name, value in table.items():
                if value is not None and not (store == "_buffers" and name in non_persistent):
                    slots[prefix + name] = (table, name)
        for name, child in (obj.__dict__.get("_modules") or {}).items():
            if isinstance(child, PickledObject):
                walk(child, f"{prefix}{name}.")

    walk(root, "")
    return slots
