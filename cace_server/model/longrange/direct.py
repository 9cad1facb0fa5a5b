"""Direct k-space sum, batched over the structures of one group (same k-grid extents).

exp(i k.r) with k = n1 b1 + n2 b2 + n3 b3 factorises into per-axis phases
exp(i n_a theta_a), theta_a = b_a . r, so S on the whole (n1, n2, n3) box of every
structure is a batched matrix product of per-axis phase tables contracted over atoms:
S[g] = (q x (x) y)[g]^T @ z[g]. Atoms are taken in blocks (checkpointed) so the
[atoms, n1 * n2] intermediate stays within a fixed number of elements.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from cace_server.model.longrange.kspace import KSpaceWeights, half_space

# Complex elements of the [structures, atoms, channels, n1 * n2] phase product per block.
ELEMENT_BUDGET = 1 << 23


def _structure_factor(
    theta: torch.Tensor, q: torch.Tensor, n1: torch.Tensor, n2: torch.Tensor, n3: torch.Tensor
) -> torch.Tensor:
    """S of one block of atoms, [G, Q, A, B, C] complex, for theta [G, n, 3], q [G, n, Q]
    (blocks add up to S; |S|^2 is taken after the sum)."""
    g, n, nq = q.shape
    one = torch.ones_like(theta[..., :1])
    x = torch.polar(one, theta[..., :1] * n1)  # [G, n, A]
    y = torch.polar(one, theta[..., 1:2] * n2)  # [G, n, B]
    z = torch.polar(one, theta[..., 2:3] * n3)  # [G, n, C]
    qx = q[..., :, None] * x[..., None, :]  # [G, n, Q, A]
    xy = (qx[..., :, None] * y[:, :, None, None, :]).reshape(g, n, -1)  # [G, n, Q*A*B]
    s = xy.transpose(1, 2) @ z  # [G, Q*A*B, C]
    return s.view(g, nq, n1.shape[0], n2.shape[0], n3.shape[0])


def direct_energy(
    positions: torch.Tensor,
    charges: torch.Tensor,
    recip: torch.Tensor,
    volume: torch.Tensor,
    extents: tuple[int, int, int],
    weights: KSpaceWeights,
    element_budget: int = ELEMENT_BUDGET,
) -> torch.Tensor:
    """Reciprocal energies [G] of structures padded to [G, n, 3] (pads carry q = 0).

    positions and recip are float64 (recip of the possibly strained cells); charges
    [G, n, Q] set the dtype of the phases, as in the original.
    """
    dtype = charges.dtype
    device = positions.device
    nk1, nk2, nk3 = extents
    n1 = torch.arange(0, nk1 + 1, dtype=torch.float64, device=device)
    n2 = torch.arange(-nk2, nk2 + 1, dtype=torch.float64, device=device)
    n3 = torch.arange(-nk3, nk3 + 1, dtype=torch.float64, device=device)
    weight = weights(recip, volume, n1, n2, n3, half_space(n1, n2, n3))  # [G, A, B, C]

    theta = torch.einsum("gni,gai->gna", positions, recip).to(dtype)
    grid = [n.to(dtype) for n in (n1, n2, n3)]
    g, n, nq = charges.shape
    per_atom = g * nq * n1.shape[0] * n2.shape[0]
    block = max(1, element_budget // per_atom)
    if n <= block:
        s = _structure_factor(theta, charges, *grid)
    else:
        s = sum(
            checkpoint(
                _structure_factor,
                theta[:, i : i + block],
                charges[:, i : i + block],
                *grid,
                use_reentrant=False,
            )
            for i in range(0, n, block)
        )
    s_sq = s.real**2 + s.imag**2  # [G, Q, A, B, C]
    return (weight.to(dtype)[:, None] * s_sq).sum(dim=(1, 2, 3, 4))
