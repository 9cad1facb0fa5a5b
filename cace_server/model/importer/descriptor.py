"""A bare CACE representation (``cace.representations.cace_representation.Cace``
saved on its own, e.g. the alchemical representation of the original's scripts).

It has no heads: the model offers only the per-atom descriptors (the node
features the readouts of a full model would take), no energy.
"""

from __future__ import annotations

from typing import Any

import torch

from cace_server.model.checkpoint import PickledObject
from cace_server.model.importer.registry import root_reader
from cace_server.model.importer.representation import read_representation


@root_reader(("cace.representations.cace_representation", "Cace"))
def read_bare_representation(
    root: PickledObject,
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    state: dict[str, torch.Tensor] = {}
    fields = read_representation(root, state)
    return {**fields, "readouts": [], "ewald": None, "polarization": None}, state
