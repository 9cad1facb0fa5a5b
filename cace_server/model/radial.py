"""Radial basis and smooth cutoff of the edge features.

Bessel functions sqrt(2/rc) sin(k_n r)/r with k_n = n pi / rc at initialisation
(Klicpera et al., ICLR 2020, eq. 7), optionally with trainable k_n, times the
polynomial envelope of the same paper (eq. 8), which takes the edge weight smoothly
to zero at the cutoff.
"""

from __future__ import annotations

import math

import torch


class BesselBasis(torch.nn.Module):
    frequencies: torch.Tensor
    prefactor: torch.Tensor

    def __init__(self, cutoff: float, n_rbf: int, trainable: bool = True) -> None:
        super().__init__()
        self.cutoff = float(cutoff)
        self.n_rbf = n_rbf
        freqs = math.pi / cutoff * torch.arange(1, n_rbf + 1, dtype=torch.get_default_dtype())
        if trainable:
            self.frequencies = torch.nn.Parameter(freqs)
        else:
            self.register_buffer("frequencies", freqs)
        # Part of the state (not recomputed): checkpoints of the reference keep the
        # value rounded to the precision they were created in.
        self.register_buffer(
            "prefactor", torch.tensor(math.sqrt(2.0 / cutoff), dtype=torch.get_default_dtype())
        )

    def forward(self, r: torch.Tensor) -> torch.Tensor:
        """r: [E, 1] distances -> [E, n_rbf]."""
        return self.prefactor * torch.sin(self.frequencies * r) / r


class PolynomialCutoff(torch.nn.Module):
    def __init__(self, cutoff: float, p: int = 6) -> None:
        super().__init__()
        self.cutoff = float(cutoff)
        self.p = float(p)

    def forward(self, r: torch.Tensor) -> torch.Tensor:
        p = self.p
        x = r / self.cutoff
        envelope = (
            1.0
            - 0.5 * (p + 1.0) * (p + 2.0) * x**p
            + p * (p + 2.0) * x ** (p + 1.0)
            - 0.5 * p * (p + 1.0) * x ** (p + 2.0)
        )
        return envelope * (r < self.cutoff)

    def value_and_derivative(self, r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(envelope, d envelope / dr), both zero beyond the cutoff."""
        p = self.p
        x = r / self.cutoff
        inside = r < self.cutoff
        a, b, c = 0.5 * (p + 1.0) * (p + 2.0), p * (p + 2.0), 0.5 * p * (p + 1.0)
        # one (slow, transcendental) power; the others by products
        x_p1 = x ** (p - 1.0)
        x_p = x_p1 * x
        envelope = 1.0 - a * x_p + b * (x_p * x) - c * (x_p * x * x)
        slope = x_p1 * (-a * p + x * (b * (p + 1.0) - c * (p + 2.0) * x)) / self.cutoff
        return envelope * inside, slope * inside
