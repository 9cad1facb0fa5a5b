"""Dipole (polarization) of latent charges, the head behind Born effective charges.

Charges are centred per structure (the original removes their mean). An open
structure's dipole is ``normalization * sum_i q_i r_i``. In a periodic cell the
original uses a Berry-phase-like form: with fractional coordinates s = r cell^-1,
``S_b = sum_i q_i exp(2 pi i s_ib)`` and ``P = normalization * cell @ S / (2 pi i)``;
for small displacements of a neutral system its real part is the dipole. The
head returns real and imaginary parts and each atom's phase, from which the
potential forms the (dephased) BEC by autograd, as the original does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from cace_server.model.config import PolarizationConfig


@dataclass
class DipoleOutput:
    real: torch.Tensor  # [B, 3] e·Å
    imag: torch.Tensor  # [B, 3] zero for open structures
    phase: torch.Tensor  # [N, 3] angle 2 pi s_ia of each atom (zero for open structures)


class PolarizationHead(torch.nn.Module):
    def __init__(self, cfg: PolarizationConfig) -> None:
        super().__init__()
        self.normalization = float(cfg.normalization)
        self.remove_mean = cfg.remove_mean
        self.periodic = cfg.periodic
        self.bec = cfg.bec

    def forward(
        self,
        positions: torch.Tensor,  # [N, 3] float64
        charges: torch.Tensor,  # [N] or [N, 1]
        cell: torch.Tensor,  # [B, 3, 3] float64
        pbc: torch.Tensor,  # [B, 3] bool
        system: torch.Tensor,  # [N]
        n_systems: int,
    ) -> DipoleOutput:
        q = charges.reshape(charges.shape[0], -1)
        if q.shape[1] != 1:
            raise ValueError("dipoles of multi-channel latent charges are not defined")
        q = q[:, 0].to(torch.float64)
        if self.remove_mean:
            counts = torch.zeros(n_systems, dtype=q.dtype, device=q.device).index_add(
                0, system, torch.ones_like(q)
            )
            mean = torch.zeros_like(counts).index_add(0, system, q) / counts
            q = q - mean.index_select(0, system)
        open_dipole = torch.zeros(n_systems, 3, dtype=q.dtype, device=q.device).index_add(
            0, system, q[:, None] * positions
        )
        if not self.periodic:
            zeros = torch.zeros_like(open_dipole)
            return DipoleOutput(
                open_dipole * self.normalization, zeros, torch.zeros_like(positions)
            )
        periodic = pbc.all(dim=1)  # [B]
        eye = torch.eye(3, dtype=cell.dtype, device=cell.device).expand_as(cell)
        safe_cell = torch.where(periodic[:, None, None], cell, eye)
        frac = torch.einsum("ni,nij->nj", positions, torch.linalg.inv(safe_cell)[system])
        angle = 2.0 * math.pi * frac * periodic[system, None]
        s_re = torch.zeros_like(open_dipole).index_add(0, system, q[:, None] * torch.cos(angle))
        s_im = torch.zeros_like(open_dipole).index_add(0, system, q[:, None] * torch.sin(angle))
        # cell @ S / (2 pi i) = (cell @ S_im - i cell @ S_re) / (2 pi)
        p_re = torch.einsum("bij,bj->bi", safe_cell, s_im) / (2.0 * math.pi)
        p_im = -torch.einsum("bij,bj->bi", safe_cell, s_re) / (2.0 * math.pi)
        mask = periodic[:, None]
        real = torch.where(mask, p_re, open_dipole) * self.normalization
        imag = torch.where(mask, p_im, torch.zeros_like(p_im)) * self.normalization
        return DipoleOutput(real, imag, angle)
