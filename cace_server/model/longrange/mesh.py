"""Mesh back end: the same k-space sum with S(k) from an FFT of B-spline-spread charges.

Smooth particle-mesh Ewald (Essmann et al., J. Chem. Phys. 103, 8577 (1995)): with
fractional grid coordinates u_a = K_a s_a (s = fractional coordinates), each charge is
spread on the K1 x K2 x K3 grid with cardinal B-splines of order p,
Q(x) = sum_j q_j prod_a M_p(u_ja - x_a), and S(k_n) ~ b(n) FFT(Q)(n) with the Euler
exponential spline factors |b_a(n_a)|^2 = 1 / |sum_{k<p-1} M_p(k+1) e^{2 pi i n_a k/K_a}|^2.
The energy is then the same weighted sum over the same k-vectors as the direct back
end (same mode, same cut-off), so only the interpolation error separates the two. Its
gradient is taken through the spline weights by autograd: forces and stress are the
exact derivatives of the mesh energy (energy-conserving in MD). Cost O(N p^3 + K log K)
instead of O(N M).
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch

from cace_server.model.longrange.kspace import KSpaceWeights, half_space


def fft_size(n: int) -> int:
    """Smallest integer >= n whose prime factors are 2, 3 and 5 (fast FFT lengths)."""
    m = max(1, n)
    while True:
        k = m
        for p in (2, 3, 5):
            while k % p == 0:
                k //= p
        if k == 1:
            return m
        m += 1


def mesh_shape(extents: tuple[int, int, int], oversampling: float) -> tuple[int, int, int]:
    """Grid points per axis: at least ``oversampling`` x (2 n_max + 1) (no aliasing of
    the kept vectors onto each other needs > 2 n_max)."""
    out = [fft_size(math.ceil(oversampling * (2 * nk + 1))) for nk in extents]
    return out[0], out[1], out[2]


def bspline_weights(frac: torch.Tensor, order: int) -> torch.Tensor:
    """M_p(frac + k) for k = 0..p-1: [..., p], for frac in [0, 1).

    The recursion M_n(x) = (x M_{n-1}(x) + (n - x) M_{n-1}(x - 1)) / (n - 1) on all k at
    once, starting from M_2(w) = w, M_2(w + 1) = 1 - w.
    """
    values = torch.stack([frac, 1.0 - frac], dim=-1)
    pad = torch.nn.functional.pad
    for n in range(3, order + 1):
        x = frac[..., None] + torch.arange(n, dtype=frac.dtype, device=frac.device)
        values = (x * pad(values, (0, 1)) + (n - x) * pad(values, (1, 0))) / (n - 1)
    return values


@functools.lru_cache(maxsize=64)
def spline_modulus_sq(order: int, size: int, low: int, high: int) -> np.ndarray:
    """|b(n)|^2 of one axis of ``size`` grid points for n = low..high (cell-independent)."""
    # M_p(k) for k = 0..p-1 (M_p(0) = 0): the cardinal B-spline at the integers 1..p-1
    m = bspline_weights(torch.zeros(1, dtype=torch.float64), order)[0].numpy()[1:]
    n = np.arange(low, high + 1)
    k = np.arange(order - 1)
    denom = (m[None, :] * np.exp(2j * np.pi * np.outer(n, k) / size)).sum(axis=1)
    return np.asarray(1.0 / np.abs(denom) ** 2)


def mesh_energy(
    positions: torch.Tensor,
    charges: torch.Tensor,
    recip: torch.Tensor,
    volume: torch.Tensor,
    extents: tuple[int, int, int],
    shape: tuple[int, int, int],
    order: int,
    weights: KSpaceWeights,
) -> torch.Tensor:
    """Reciprocal energies [G] of structures padded to [G, n, 3] (pads carry q = 0)."""
    dtype = charges.dtype
    device = positions.device
    g, _, nq = charges.shape
    k1, k2, k3 = shape
    size = torch.tensor(shape, dtype=torch.float64, device=device)
    # fractional grid coordinates: u_a = K_a (b_a . r) / 2 pi
    u = torch.einsum("gni,gai->gna", positions, recip) * (size / (2.0 * math.pi))
    base = torch.floor(u.detach())
    w = bspline_weights((u - base).to(dtype), order)  # [G, n, 3, p]
    offsets = torch.arange(order, device=device, dtype=torch.float64)
    idx = torch.remainder(base[..., None] - offsets, size[:, None]).long()  # [G, n, 3, p]

    values = (
        charges[:, :, :, None, None, None]
        * w[:, :, None, 0, :, None, None]
        * w[:, :, None, 1, None, :, None]
        * w[:, :, None, 2, None, None, :]
    )  # [G, n, Q, p, p, p]
    grid_of = torch.arange(g * nq, device=device).view(g, 1, nq, 1, 1, 1) * (k1 * k2 * k3)
    flat = (
        grid_of
        + (idx[:, :, None, 0, :, None, None] * (k2 * k3))
        + (idx[:, :, None, 1, None, :, None] * k3)
        + idx[:, :, None, 2, None, None, :]
    )
    grid = values.new_zeros(g * nq * k1 * k2 * k3).index_add(
        0, flat.reshape(-1), values.reshape(-1)
    )
    f = torch.fft.rfftn(grid.view(g, nq, k1, k2, k3), dim=(-3, -2, -1))

    # the kept vectors: n1, n2 in [-nk, nk] (negative ones at K - |n|), n3 in [0, nk]
    nk1, nk2, nk3 = extents
    i1 = np.arange(-nk1, nk1 + 1)
    i2 = np.arange(-nk2, nk2 + 1)
    i3 = np.arange(0, nk3 + 1)
    # n = -nk..-1 sit at K-nk..K-1: two slices in the order of n (cheaper than a gather)
    f = torch.cat([f[:, :, k1 - nk1 :], f[:, :, : nk1 + 1]], dim=2)
    f = torch.cat([f[:, :, :, k2 - nk2 :], f[:, :, :, : nk2 + 1]], dim=3)
    f = f[..., : nk3 + 1]
    n1, n2, n3 = (torch.as_tensor(i, dtype=torch.float64, device=device) for i in (i1, i2, i3))
    keep = half_space(n3, n2, n1).permute(2, 1, 0)  # the half space with n3 leading
    weight = weights(recip, volume, n1, n2, n3, keep)  # [G, A, B, C]
    modulus = (
        spline_modulus_sq(order, k1, -nk1, nk1)[:, None, None]
        * spline_modulus_sq(order, k2, -nk2, nk2)[None, :, None]
        * spline_modulus_sq(order, k3, 0, nk3)[None, None, :]
    )
    weight = weight * torch.as_tensor(modulus, device=device)
    f_sq = f.real**2 + f.imag**2  # [G, Q, A, B, C]
    return (weight.to(dtype)[:, None] * f_sq).sum(dim=(1, 2, 3, 4))
