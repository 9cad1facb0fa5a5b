"""Long-range energy of latent charges (CACE-LR / Latent Ewald Summation).

Each atom carries a Gaussian charge of width sigma. For a 3-D periodic cell the
energy is the reciprocal-space sum (B. Cheng, arXiv:2408.15165)

    E = (1/V) sum_{k in half space, 0 < |k| <= 2 pi / dl} 2 exp(-sigma^2 k^2 / 2) / k^2 |S(k)|^2,
    S(k) = sum_j q_j exp(i k . r_j),

over k = n1 b1 + n2 b2 + n3 b3 with |n_a| <= floor(|a_a| / dl). A non-periodic
structure uses the direct pairwise sum of the same smeared charges.

The reference evaluates exp(i k.r) for every (atom, k) pair, an [atoms x k-vectors]
complex tensor that grows as N^2. Since exp(i k.r) factorises into
exp(i n1 theta1) exp(i n2 theta2) exp(i n3 theta3) with theta_a = b_a . r, S on the
whole (n1, n2, n3) grid is a product of per-axis phase tables contracted over atoms
by one matrix product, done over blocks of atoms so memory stays bounded.
"""

from __future__ import annotations

import math

import torch
from torch.utils.checkpoint import checkpoint

from cace_server.model.config import EwaldConfig
from cace_server.structures import StructureError


def _structure_factor_block(
    theta: torch.Tensor,
    q: torch.Tensor,
    n1: torch.Tensor,
    n2: torch.Tensor,
    n3: torch.Tensor,
) -> torch.Tensor:
    """S[n1, n2, n3] restricted to one block of atoms: [A * B, C] complex."""
    x = torch.polar(torch.ones_like(theta[:, :1]), theta[:, :1] * n1)  # [n, A]
    y = torch.polar(torch.ones_like(theta[:, 1:2]), theta[:, 1:2] * n2)  # [n, B]
    z = torch.polar(torch.ones_like(theta[:, 2:3]), theta[:, 2:3] * n3)  # [n, C]
    xy = ((q[:, None] * x)[:, :, None] * y[:, None, :]).flatten(1)  # [n, A*B]
    return xy.transpose(0, 1) @ z


class EwaldSum(torch.nn.Module):
    def __init__(self, cfg: EwaldConfig) -> None:
        super().__init__()
        self.dl = float(cfg.dl)
        self.sigma = float(cfg.sigma)
        self.remove_self_interaction = cfg.remove_self_interaction
        self.norm_factor = float(cfg.norm_factor)
        self.pair_epsilon = float(cfg.pair_epsilon)
        self.k_max_sq = (2.0 * math.pi / self.dl) ** 2
        # Atoms per block of the structure-factor contraction.
        self.atom_block = 4096

    def self_energy(self, q: torch.Tensor) -> torch.Tensor:
        return (q**2).sum() / (self.sigma * (2.0 * math.pi) ** 1.5)

    def forward(
        self,
        positions: torch.Tensor,
        charges: torch.Tensor,
        cell: torch.Tensor,
        pbc: torch.Tensor,
        n_atoms: list[int],
    ) -> torch.Tensor:
        """Energies [n_systems] in the dtype of ``charges``.

        positions and cell are float64 (possibly strained, for the virial).
        """
        energies = []
        start = 0
        pbc_rows = pbc.tolist()
        for b, n in enumerate(n_atoms):
            r = positions[start : start + n]
            q = charges[start : start + n]
            start += n
            if all(pbc_rows[b]):
                energy = self._reciprocal(r, q, cell[b])
            elif not any(pbc_rows[b]):
                energy = self._direct(r, q)
            else:
                raise StructureError(
                    "the long-range (Ewald) term of this model needs a structure that is "
                    "periodic in all three directions or in none"
                )
            energies.append(energy * self.norm_factor)
        return torch.stack(energies)

    def _reciprocal(self, r: torch.Tensor, q: torch.Tensor, cell: torch.Tensor) -> torch.Tensor:
        dtype = q.dtype
        recip = 2.0 * math.pi * torch.linalg.inv(cell).transpose(0, 1)  # rows b_a
        nk = [max(1, int(length / self.dl)) for length in cell.detach().norm(dim=1).tolist()]
        n1 = torch.arange(0, nk[0] + 1, dtype=torch.float64, device=r.device)
        n2 = torch.arange(-nk[1], nk[1] + 1, dtype=torch.float64, device=r.device)
        n3 = torch.arange(-nk[2], nk[2] + 1, dtype=torch.float64, device=r.device)
        kvec = (
            n1[:, None, None, None] * recip[0]
            + n2[None, :, None, None] * recip[1]
            + n3[None, None, :, None] * recip[2]
        )
        k_sq = (kvec**2).sum(-1)  # [A, B, C]
        i1, i2, i3 = n1[:, None, None], n2[None, :, None], n3[None, None, :]
        half_space = (i1 > 0) | ((i1 == 0) & ((i2 > 0) | ((i2 == 0) & (i3 > 0))))
        keep = half_space & (k_sq > 0) & (k_sq <= self.k_max_sq)
        safe_k_sq = torch.where(keep, k_sq, torch.ones_like(k_sq))
        weight = torch.where(
            keep,
            2.0 * torch.exp(-0.5 * self.sigma**2 * safe_k_sq) / safe_k_sq,
            torch.zeros_like(k_sq),
        )
        volume = torch.linalg.det(cell).abs()

        theta = (r @ recip.transpose(0, 1)).to(dtype)  # theta[:, a] = b_a . r
        grid = [n.to(dtype) for n in (n1, n2, n3)]
        n = r.shape[0]
        if n <= self.atom_block:
            s = _structure_factor_block(theta, q, *grid)
        else:
            s = sum(
                checkpoint(
                    _structure_factor_block,
                    theta[i : i + self.atom_block],
                    q[i : i + self.atom_block],
                    *grid,
                    use_reentrant=False,
                )
                for i in range(0, n, self.atom_block)
            )
        s_sq = (s.real**2 + s.imag**2).view(k_sq.shape)
        energy = (weight.to(dtype) * s_sq).sum() / volume.to(dtype)
        if self.remove_self_interaction:
            energy = energy - self.self_energy(q)
        return energy

    def _direct(self, r: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        dtype = q.dtype
        n = r.shape[0]
        diff = r[:, None, :] - r[None, :, :]
        off_diagonal = ~torch.eye(n, dtype=torch.bool, device=r.device)
        # Keep the diagonal away from |0| so the norm's gradient stays finite there.
        diff = torch.where(off_diagonal[:, :, None], diff, torch.ones_like(diff))
        dist = torch.linalg.vector_norm(diff, dim=-1).to(dtype)
        pair = torch.special.erf(dist / (self.sigma * math.sqrt(2.0))) / (dist + self.pair_epsilon)
        pair = torch.where(off_diagonal, pair, torch.zeros_like(pair))
        energy = (q[:, None] * q[None, :] * pair).sum() / (4.0 * math.pi)
        if not self.remove_self_interaction:
            # The direct sum leaves out i == j; add the Gaussian self-energy back so the
            # periodic and non-periodic energies have the same reference.
            energy = energy + self.self_energy(q)
        return energy
