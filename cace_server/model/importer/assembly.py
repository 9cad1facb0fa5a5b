"""What the output modules of an original model add up to, family by family.

The original wires its output modules through a dictionary of named tensors:
an Atomwise head writes ``SR_energy``, an Ewald term reads the per-atom key ``q``
and writes ``ewald_potential``, a FeatureAdd sums keys, the Forces module
differentiates one key. The importer follows the same keys: every energy-like key
becomes a linear combination of our terms (readouts and the long-range sum), and
the key the Forces module differentiates (times the CombinePotential weights) is
the model's energy. Terms that do not reach the energy, a charge consumer or the
dipole are left out (e.g. an unused auxiliary head).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from cace_server.model.checkpoint import UnsupportedCheckpointError
from cace_server.model.config import EwaldConfig, PolarizationConfig, ReadoutConfig

# key -> {term name: coefficient}
LinearCombination = dict[str, float]


@dataclass
class Assembly:
    state: dict[str, torch.Tensor] = field(default_factory=dict)
    readouts: dict[str, ReadoutConfig] = field(default_factory=dict)
    ewald: EwaldConfig | None = None
    polarization: PolarizationConfig | None = None
    # Per-atom keys that hold latent charges, and the readout that makes them.
    charge_readouts: dict[str, str] = field(default_factory=dict)
    # The long-range term's name among the terms of the energy.
    ewald_term: str = "long_range"

    def unique_name(self, key: str) -> str:
        """A readout name for an original key, unique across CombinePotential parts."""
        name = "".join(c if c.isalnum() or c == "_" else "_" for c in key) or "readout"
        base, k = name, 1
        while name in self.readouts or name == self.ewald_term:
            k += 1
            name = f"{base}_{k}"
        return name

    def add_readout(self, config: ReadoutConfig) -> None:
        self.readouts[config.name] = config

    def set_ewald(self, config: EwaldConfig) -> None:
        if self.ewald is not None:
            raise UnsupportedCheckpointError("more than one long-range term is not supported")
        self.ewald = config

    def set_polarization(self, config: PolarizationConfig) -> None:
        if self.polarization is not None:
            raise UnsupportedCheckpointError("more than one polarization head is not supported")
        self.polarization = config


@dataclass
class ModelScope:
    """The keys of one original NeuralNetworkPotential while its modules are read."""

    assembly: Assembly
    energy_keys: dict[str, LinearCombination] = field(default_factory=dict)
    # Per-atom keys consumed as charges (by Ewald, LES or Polarization), known up front.
    charge_consumers: set[str] = field(default_factory=set)
    forces_energy_key: str | None = None
    gradients: dict[str, Any] = field(default_factory=dict)

    def combination(self, key: str) -> LinearCombination:
        if key not in self.energy_keys:
            raise UnsupportedCheckpointError(
                f"the energy term {key!r} is not produced by any module we can reproduce"
            )
        return self.energy_keys[key]

    def add(self, key: str, terms: LinearCombination) -> None:
        self.energy_keys[key] = terms


def add_combinations(parts: list[tuple[LinearCombination, float]]) -> LinearCombination:
    out: LinearCombination = {}
    for terms, weight in parts:
        for name, coefficient in terms.items():
            out[name] = out.get(name, 0.0) + weight * coefficient
    return out
