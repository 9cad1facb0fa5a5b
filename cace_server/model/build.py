"""Freshly initialised models: for tests, and as the starting point of training."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from cace_server.model.config import EwaldConfig, ModelConfig, ReadoutConfig
from cace_server.model.convert import finalize
from cace_server.model.potential import CACEPotential


def build_model(config: ModelConfig, *, seed: int = 0) -> CACEPotential:
    """A model with random weights, reproducible from ``seed`` (trainable, float64)."""
    generator_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        with torch.device("cpu"):
            model = CACEPotential(config)
    finally:
        torch.random.set_rng_state(generator_state)
    return model.to(torch.float64)


def random_model(
    elements: Sequence[int] = (1, 8),
    *,
    seed: int = 0,
    long_range: bool = False,
    dtype: str | torch.dtype = "float64",
    device: str | torch.device = "cpu",
    **overrides: Any,
) -> CACEPotential:
    """A small random inference model (frozen weights) for tests and benchmarks."""
    readouts = [ReadoutConfig(name="energy", hidden=[16, 8])]
    settings: dict[str, Any] = dict(
        elements=sorted(elements),
        cutoff=4.0,
        n_atom_basis=3,
        n_rbf=6,
        n_radial=8,
        max_l=3,
        max_nu=3,
        avg_num_neighbors=10.0,
        readouts=readouts,
    )
    if long_range:
        settings["readouts"] = [*readouts, ReadoutConfig(name="q", kind="charge", hidden=[8])]
        settings["ewald"] = EwaldConfig(charge_readout="q")
    settings.update(overrides)
    model = build_model(ModelConfig(**settings), seed=seed)
    return finalize(model, dtype=dtype, device=device)
