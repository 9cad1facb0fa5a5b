"""Reading the inert module tree that :mod:`cace_server.model.checkpoint` unpickles.

Helpers shared by the importer families: attribute lookup across a module's
parameter/buffer/submodule tables, and the MLPs every family stores the same way.
"""

from __future__ import annotations

from typing import Any

import torch

from cace_server.model.checkpoint import Activation, PickledObject, UnsupportedCheckpointError
from cace_server.model.importer.registry import reads

# The MLPs and containers every family stores the same way.
reads(
    ("cace.modules.blocks", "Dense"),
    ("torch.nn.modules.linear", "Linear"),
    ("torch.nn.modules.linear", "Identity"),
    ("torch.nn.modules.container", "Sequential"),
    ("torch.nn.modules.container", "ModuleList"),
    ("torch.nn.modules.container", "ParameterList"),
    ("torch.nn.modules.container", "ModuleDict"),
)


def sub(obj: PickledObject, name: str) -> Any:
    """``obj.name`` as the original module would resolve it."""
    for store in ("_modules", "_parameters", "_buffers"):
        table = obj.__dict__.get(store) or {}
        if name in table:
            return table[name]
    if name in obj.__dict__:
        return obj.__dict__[name]
    raise UnsupportedCheckpointError(f"{obj.__class_path__} has no attribute {name!r}")


def attr(obj: PickledObject, name: str, default: Any = None) -> Any:
    """An attribute that older versions of the original may not have written."""
    return obj.__dict__.get(name, default)


def children(obj: PickledObject) -> list[Any]:
    return list((obj.__dict__.get("_modules") or {}).values())


def params(obj: PickledObject) -> list[torch.Tensor]:
    return list((obj.__dict__.get("_parameters") or {}).values())


def require(obj: Any, expected: str) -> None:
    if not isinstance(obj, PickledObject) or obj.class_name != expected:
        found = obj.__class_path__ if isinstance(obj, PickledObject) else type(obj).__name__
        raise UnsupportedCheckpointError(f"expected a {expected}, found {found}")


def activation_name(obj: Any) -> str:
    if isinstance(obj, Activation):
        return obj.name
    if obj is None or (isinstance(obj, PickledObject) and obj.class_name == "Identity"):
        return "identity"
    raise UnsupportedCheckpointError(f"unsupported activation {obj!r}")


def read_mlp(
    seq: PickledObject, prefix: str, state: dict[str, torch.Tensor]
) -> tuple[list[int], str, bool]:
    """Dense layers of a Sequential -> (output sizes, hidden activation, bias).

    The weights go into ``state`` under ``{prefix}.layers.{k}.weight/bias``.
    """
    require(seq, "Sequential")
    sizes: list[int] = []
    activations: list[str] = []
    bias = True
    for k, dense in enumerate(children(seq)):
        require(dense, "Dense")
        if attr(dense, "use_batchnorm"):
            raise UnsupportedCheckpointError("batch normalisation in an MLP is not supported")
        linear = sub(dense, "linear")
        require(linear, "Linear")
        weight = sub(linear, "weight")
        b = sub(linear, "bias")
        state[f"{prefix}.layers.{k}.weight"] = weight
        if b is not None:
            state[f"{prefix}.layers.{k}.bias"] = b
        bias = b is not None
        sizes.append(int(weight.shape[0]))
        act = (dense.__dict__.get("_modules") or {}).get("activation", attr(dense, "activation"))
        activations.append(activation_name(act))
    if activations[-1] != "identity":
        raise UnsupportedCheckpointError("the last layer of an MLP must be linear")
    hidden_acts = set(activations[:-1])
    if len(hidden_acts) > 1:
        raise UnsupportedCheckpointError(f"mixed activations {hidden_acts} are not supported")
    return sizes, hidden_acts.pop() if hidden_acts else "silu", bias


def read_linear_branch(dense: PickledObject, prefix: str, state: dict[str, torch.Tensor]) -> None:
    """The linear side branch of an atom-wise readout (``linear_nn``)."""
    lin = sub(dense, "linear")
    state[f"{prefix}.linear.weight"] = sub(lin, "weight")
    if sub(lin, "bias") is not None:
        state[f"{prefix}.linear.bias"] = sub(lin, "bias")
