"""``cace.models.combined.CombinePotential``: weighted sums of sub-models.

The cace-lr-fit models are a short-range CACE potential plus a latent-charge
Ewald potential (often weighted, e.g. 0.01), or a single wrapped model. The
sub-models share one representation object in the pickle, so our model computes
the representation once and the sub-models become heads on it. The original
scales the sub-model outputs by ``weight`` in place and sums them; its
``operation`` is pickled as the bound method ``default_operation`` or, in older
versions, as the module-level function of the same name.
"""

from __future__ import annotations

from typing import Any

import torch

from cace_server.model.checkpoint import (
    FunctionReference,
    MethodReference,
    PickledObject,
    UnsupportedCheckpointError,
)
from cace_server.model.importer.assembly import Assembly, add_combinations
from cace_server.model.importer.core import energy_of, finish, read_potential
from cace_server.model.importer.registry import reads_functions, root_reader
from cace_server.model.importer.representation import read_representation
from cace_server.model.importer.tree import attr, children, sub

# The sum of the sub-models: a bound method, or the module-level function in older versions.
reads_functions(("cace.models.combined", "default_operation"), methods=("default_operation",))


def _is_sum(operation: Any) -> bool:
    if isinstance(operation, MethodReference):
        return operation.name == "default_operation"
    if isinstance(operation, FunctionReference):
        return operation.path == "cace.models.combined.default_operation"
    return operation is None


@root_reader(("cace.models.combined", "CombinePotential"))
def read_combine_potential(
    root: PickledObject,
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    if not _is_sum(attr(root, "operation")):
        raise UnsupportedCheckpointError(
            f"CombinePotential with operation {attr(root, 'operation')!r}: only the sum "
            "(default_operation) is supported"
        )
    models = children(sub(root, "models"))
    keys: list[dict[str, Any]] = list(attr(root, "potential_keys") or [])
    if not models or len(keys) != len(models):
        raise UnsupportedCheckpointError("CombinePotential without matching potential_keys")
    representation = sub(models[0], "representation")
    for model in models[1:]:
        if sub(model, "representation") is not representation:
            raise UnsupportedCheckpointError(
                "CombinePotential sub-models with different representations are not supported "
                "(every published one shares a single representation)"
            )
    assembly = Assembly()
    fields = read_representation(representation, assembly.state)
    parts = []
    for model, model_keys in zip(models, keys, strict=True):
        scope = read_potential(model, assembly)
        sub_energy = energy_of(scope)
        # The CombinePotential's energy key names the sub-model key it sums.
        if scope.forces_energy_key not in model_keys.values():
            raise UnsupportedCheckpointError(
                f"CombinePotential does not sum the energy {scope.forces_energy_key!r} "
                "of a sub-model"
            )
        # The weight was stored as a string ('0.01') by some versions.
        weight = float(model_keys.get("weight", 1.0))
        parts.append((sub_energy, weight))
    return finish(assembly, fields, add_combinations(parts)), assembly.state
