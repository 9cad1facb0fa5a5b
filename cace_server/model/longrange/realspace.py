"""Open boundaries: the direct pairwise sum of the smeared charges, batched over structures."""

from __future__ import annotations

import math

import torch


def open_energy(
    positions: torch.Tensor,
    charges: torch.Tensor,
    valid: torch.Tensor,
    sigma: float,
    epsilon: float = 1e-6,
) -> torch.Tensor:
    """(1/4 pi) sum_{i != j} q_i q_j erf(r_ij / sigma sqrt 2) / (r_ij + epsilon): [G].

    positions [G, n, 3] float64, charges [G, n, Q], valid [G, n] (False for pads).
    """
    dtype = charges.dtype
    n = positions.shape[1]
    off_diagonal = ~torch.eye(n, dtype=torch.bool, device=positions.device)
    pair_ok = off_diagonal & valid[:, :, None] & valid[:, None, :]  # [G, n, n]
    diff = positions[:, :, None, :] - positions[:, None, :, :]
    # Keep excluded pairs away from |0| so the norm's gradient stays finite there.
    diff = torch.where(pair_ok[..., None], diff, torch.ones_like(diff))
    dist = torch.linalg.vector_norm(diff, dim=-1).to(dtype)
    pair = torch.special.erf(dist / (sigma * math.sqrt(2.0))) / (dist + epsilon)
    pair = torch.where(pair_ok, pair, torch.zeros_like(pair))
    qq = torch.einsum("gic,gjc->gij", charges, charges)
    return (qq * pair).sum(dim=(1, 2)) / (4.0 * math.pi)
