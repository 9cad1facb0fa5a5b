"""Convert a checkpoint of the original CACE package into a :class:`CACEPotential`.

The checkpoint is read by :mod:`cace_server.model.checkpoint` (no pickle code runs);
:mod:`cace_server.model.importer` maps the recorded attributes of the original
module tree onto our config and parameter names, family by family, and refuses any
feature it cannot reproduce exactly.
"""

from __future__ import annotations

from pathlib import Path

import torch

from cace_server.host_memory import tune_host_allocator
from cace_server.model.checkpoint import UnsupportedCheckpointError
from cace_server.model.importer import (
    convert_checkpoint,
    read_original_checkpoint,
    read_training_checkpoint,
)
from cace_server.model.potential import CACEPotential


def convert_original(
    path: str | Path,
    *,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device = "cpu",
    architecture: str | Path | None = None,
) -> CACEPotential:
    """Read an original CACE checkpoint and return our equivalent model.

    With ``architecture``, ``path`` is a training checkpoint (weights only) and the
    architecture comes from that model file.
    """
    if architecture is not None:
        root = read_training_checkpoint(path, architecture)
    else:
        root = read_original_checkpoint(path)
    config, state = convert_checkpoint(root, source=f"converted from {Path(path).name}")
    with torch.device("cpu"):
        model = CACEPotential(config)
    model = model.to(dtype=state["representation.radial_mixing"].dtype)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k != "atomic_energies"]
    if missing or unexpected:
        raise UnsupportedCheckpointError(
            f"checkpoint does not map onto the model: missing {missing}, unexpected {unexpected}"
        )
    return finalize(model, dtype=dtype, device=device)


def finalize(
    model: CACEPotential, *, dtype: str | torch.dtype | None, device: str | torch.device
) -> CACEPotential:
    """Move to dtype/device, switch to inference mode, freeze parameters."""
    tune_host_allocator()
    if dtype is not None:
        model = model.to(dtype=_torch_dtype(dtype))
    model = model.to(device=device)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _torch_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    table = {"float32": torch.float32, "float64": torch.float64}
    if dtype not in table:
        raise ValueError(f"dtype must be float32 or float64, got {dtype!r}")
    return table[dtype]
