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
        # env(x) = 1 - a x^p + b x^(p+1) - c x^(p+2), x = r / cutoff
        p_ = self.p
        self._coefficients = (0.5 * (p_ + 1.0) * (p_ + 2.0), p_ * (p_ + 2.0), 0.5 * p_ * (p_ + 1.0))

    def _envelope(self, x: torch.Tensor, x_p: torch.Tensor) -> torch.Tensor:
        a, b, c = self._coefficients
        return 1.0 - a * x_p + b * (x_p * x) - c * (x_p * x * x)

    def forward(self, r: torch.Tensor) -> torch.Tensor:
        x = r / self.cutoff
        # one (slow, transcendental) power; the others by products
        return self._envelope(x, x**self.p) * (r < self.cutoff)

    def value_and_derivative(self, r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(envelope, d envelope / dr), both zero beyond the cutoff."""
        p = self.p
        a, b, c = self._coefficients
        x = r / self.cutoff
        inside = r < self.cutoff
        x_p1 = x ** (p - 1.0)
        envelope = self._envelope(x, x_p1 * x)
        slope = x_p1 * (-a * p + x * (b * (p + 1.0) - c * (p + 2.0) * x)) / self.cutoff
        return envelope * inside, slope * inside
