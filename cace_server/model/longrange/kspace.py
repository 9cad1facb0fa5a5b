"""What the direct and the mesh back ends share: reciprocal cells and k-space weights.

The reciprocal-space energy of Gaussian charges of width sigma in a periodic cell is

    E = (1/V) sum_{k in a half space} 2 exp(-sigma^2 k^2 / 2) / k^2 * c(|k|) * |S(k)|^2

with k = n1 b1 + n2 b2 + n3 b3 (n integer, k != 0) and S(k) = sum_j q_j exp(i k . r_j).
The cut-off c is what separates the two modes:

- parity: c = 1 for |k| <= k_max = 2 pi / dl, else 0 (the original's k-set). The set
  of vectors inside the sphere changes with the cell, so E jumps when one crosses.
- smooth: c fades from 1 to 0 across [k_max - h, k_max + h] by a C2 quintic step, so E
  is twice continuously differentiable in the cell (and in positions). The window is
  centred on k_max: summed over the many vectors of a shell, the smooth weight keeps
  the mean of the hard one (the lattice sum of a symmetric fade equals the sphere's to
  first order in h), so a model trained with the hard cut-off sees the same energy
  scale, while no vector ever enters or leaves with a finite weight.

Both are pure functions of the (strained) cell, so autograd through the weights gives
the exact strain derivative of the energy computed, in either mode.
"""

from __future__ import annotations

import math

import torch

PARITY = "parity"
SMOOTH = "smooth"
MODES = (PARITY, SMOOTH)


def reciprocal_cells(cell: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows 2 pi * (cell^-1)^T and |det cell| of a batch of cells [G, 3, 3].

    Written with cross products, not ``torch.linalg.inv``/``det``: no LAPACK call and,
    on CUDA, no error-check read-back (``linalg.inv`` checks for singular matrices).
    Singular cells are refused on the host before (neighbour-list preparation).
    """
    a, b, c = cell[:, 0], cell[:, 1], cell[:, 2]
    bc, ca, ab = torch.linalg.cross(b, c), torch.linalg.cross(c, a), torch.linalg.cross(a, b)
    det = (a * bc).sum(-1)
    recip = (2.0 * math.pi) * torch.stack([bc, ca, ab], dim=1) / det[:, None, None]
    return recip, det.abs()


def quintic_step(t: torch.Tensor) -> torch.Tensor:
    """0 for t <= 0, 1 for t >= 1, C2 in between (6t^5 - 15t^4 + 10t^3)."""
    t = t.clamp(0.0, 1.0)
    return t * t * t * (t * (6.0 * t - 15.0) + 10.0)


class KSpaceWeights:
    """The k-space kernel of one long-range term: sigma, k_max and the cut-off mode."""

    def __init__(self, sigma: float, dl: float, mode: str, smooth_width: float) -> None:
        if mode not in MODES:
            raise ValueError(f"long-range mode must be one of {MODES}, got {mode!r}")
        if not 0.0 < smooth_width < 1.0:
            raise ValueError(f"smooth_width must be in (0, 1), got {smooth_width}")
        self.sigma = float(sigma)
        self.mode = mode
        self.k_max = 2.0 * math.pi / float(dl)
        # half width h of the fade, as a fraction of k_max
        self.half_width = 0.5 * float(smooth_width) * self.k_max

    @property
    def k_cut(self) -> float:
        """Largest |k| with a non-zero weight."""
        return self.k_max + (self.half_width if self.mode == SMOOTH else 0.0)

    def extents(self, lengths: list[float]) -> tuple[int, int, int]:
        """Largest |n_a| with a non-zero weight, from the cell vectors' lengths |a_a|.

        |n_a| = |k . a_a| / 2 pi <= k_cut |a_a| / 2 pi for every k in the sphere, so this
        box holds the whole sphere. In parity mode it is the original's
        max(1, floor(|a_a| / dl)).
        """
        out = [max(1, int(length * self.k_cut / (2.0 * math.pi))) for length in lengths]
        return out[0], out[1], out[2]

    def __call__(
        self,
        recip: torch.Tensor,
        volume: torch.Tensor,
        n1: torch.Tensor,
        n2: torch.Tensor,
        n3: torch.Tensor,
        keep: torch.Tensor,
    ) -> torch.Tensor:
        """2 exp(-sigma^2 k^2/2) / k^2 * c(|k|) / V on the grid n1 x n2 x n3: [G, A, B, C].

        ``recip`` [G, 3, 3] float64 rows b_a; ``n*`` float64 integer values; ``keep``
        [A, B, C] marks one vector of each +-k pair (never k = 0).
        """
        kvec = (
            n1[None, :, None, None, None] * recip[:, None, None, None, 0]
            + n2[None, None, :, None, None] * recip[:, None, None, None, 1]
            + n3[None, None, None, :, None] * recip[:, None, None, None, 2]
        )
        k_sq = (kvec * kvec).sum(-1)
        smooth = self.mode == SMOOTH
        keep = keep & ((k_sq < self.k_cut**2) if smooth else (k_sq <= self.k_max**2))
        safe = torch.where(keep, k_sq, torch.ones_like(k_sq))
        weight = 2.0 * torch.exp(-0.5 * self.sigma**2 * safe) / safe
        if smooth:
            weight = weight * quintic_step((self.k_cut - safe.sqrt()) / (2.0 * self.half_width))
        weight = torch.where(keep, weight, torch.zeros_like(weight))
        return weight / volume[:, None, None, None]


def half_space(n1: torch.Tensor, n2: torch.Tensor, n3: torch.Tensor) -> torch.Tensor:
    """[A, B, C] mask of n with n1 > 0, or n1 = 0 and n2 > 0, or n1 = n2 = 0 and n3 > 0."""
    i1, i2, i3 = n1[:, None, None], n2[None, :, None], n3[None, None, :]
    return (i1 > 0) | ((i1 == 0) & ((i2 > 0) | ((i2 == 0) & (i3 > 0))))
