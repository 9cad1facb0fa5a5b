"""Import checkpoints of the original CACE package (and the LES package) into our model.

``read_original_checkpoint`` unpickles the file into inert objects (no code runs,
and only the classes the readers below declare are allowed); the root class picks a
reader from :mod:`registry`, and each output module of a model is read by the
family module that registered its class:

* :mod:`core`: NeuralNetworkPotential, Atomwise, EwaldPotential, FeatureAdd, Forces
* :mod:`combine`: CombinePotential (weighted sums of sub-models on one representation)
* :mod:`les`: LesWrapper around the LES package's charge head and Ewald sum
* :mod:`polarization`: Polarization, Grad, Dephase (dipoles and Born effective charges)
* :mod:`legacy`: angular tables of older versions of the original
* :mod:`descriptor`: a bare representation (descriptors, no energy)
"""

from __future__ import annotations

from typing import Any

import torch

from cace_server.model.checkpoint import PickledObject, UnsupportedCheckpointError
from cace_server.model.config import ModelConfig

# Importing the family modules registers their readers.
from cace_server.model.importer import (  # noqa: F401
    combine,
    core,
    descriptor,
    les,
    polarization,
)
from cace_server.model.importer.files import read_original_checkpoint, read_training_checkpoint
from cace_server.model.importer.registry import OUTPUT_MODULE_READERS, ROOT_READERS


def convert_checkpoint(
    root: PickledObject, source: str = ""
) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """The config and weights of our model equivalent to an unpickled original model."""
    reader = ROOT_READERS.get(root.__class_path__)
    if reader is None:
        supported = sorted(path.rsplit(".", 1)[-1] for path in ROOT_READERS)
        raise UnsupportedCheckpointError(
            f"{root.__class_path__} is not a model cace-server can import "
            f"(supported: {', '.join(supported)})"
        )
    fields, state = reader(root)
    dtype = state["representation.radial_mixing"].dtype
    fields["dtype"] = "float64" if dtype == torch.float64 else "float32"
    fields["source"] = source
    fields["family"] = families(root)
    return ModelConfig(**fields), state


def families(root: PickledObject) -> list[str]:
    """The importer families a model used, for `cace-server info`."""
    found = ["combine"] if root.class_name == "CombinePotential" else []
    found.insert(0, "cace")
    seen: set[int] = set()

    def walk(obj: Any) -> None:
        if not isinstance(obj, PickledObject) or id(obj) in seen:
            return
        seen.add(id(obj))
        reader = OUTPUT_MODULE_READERS.get(obj.__class_path__)
        if reader is not None and reader.family not in found:
            found.append(reader.family)
        for child in (obj.__dict__.get("_modules") or {}).values():
            walk(child)

    walk(root)
    return found


__all__ = ["convert_checkpoint", "read_original_checkpoint", "read_training_checkpoint"]
