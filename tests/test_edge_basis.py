"""The edge basis with its analytic derivative against plain autograd of the same formulas."""

from __future__ import annotations

import pytest
import torch

from cace_server.model.angular import AngularBasis
from cace_server.model.edge_basis import FusedEdgeBasis, plain_edge_basis
from cace_server.model.radial import BesselBasis, PolynomialCutoff

CUTOFF = 5.0


def _vectors(n: int = 64) -> torch.Tensor:
    """Random edges, some beyond the cutoff, some on an axis (zero components), and a
    padding edge (2 rc, 0, 0) as the representation lays them out."""
    torch.manual_seed(0)
    v = torch.randn(n, 3, dtype=torch.float64) * 2.5
    v[:4] = torch.tensor([[2 * CUTOFF, 0.0, 0.0], [0.0, 1.3, 0.0], [0.0, 0.0, -2.0], [6.0, 1, 1]])
    return v


def _basis(max_l: int) -> FusedEdgeBasis:
    bessel = BesselBasis(CUTOFF, 6, trainable=True).double()
    with torch.no_grad():  # frequencies off their initial values, as in a trained model
        bessel.frequencies.mul_(1.0 + 0.1 * torch.rand(6, dtype=torch.float64))
    bessel.requires_grad_(False)
    return FusedEdgeBasis(bessel, PolynomialCutoff(CUTOFF, 6), AngularBasis(max_l)).double()


@pytest.mark.parametrize("max_l", [0, 1, 3, 4])
def test_values_and_first_derivatives_equal_autograd(max_l):
    basis = _basis(max_l)
    v = _vectors().requires_grad_(True)
    radial, angular = basis(v)
    plain = plain_edge_basis(v, basis.bessel, basis.cutoff, basis.angular)
    torch.testing.assert_close(radial, plain[0], rtol=1e-13, atol=1e-14)
    torch.testing.assert_close(angular, plain[1], rtol=1e-13, atol=1e-14)
    assert radial.grad_fn is not None and "EdgeBasis" in radial.grad_fn.name()
    g_r, g_a = torch.randn_like(radial), torch.randn_like(angular)
    for grads in ((g_r, g_a), (g_r, None), (None, g_a)):
        outs = [o for o, g in zip((radial, angular), grads, strict=True) if g is not None]
        (fused,) = torch.autograd.grad(outs, [v], [g for g in grads if g is not None], True)
        # at l_max = 0 the angular basis is constant: autograd has no graph for it
        pairs = [
            (o, g) for o, g in zip(plain, grads, strict=True) if g is not None and o.requires_grad
        ]
        auto = torch.zeros_like(v)
        if pairs:
            outs_auto, grads_auto = [o for o, _ in pairs], [g for _, g in pairs]
            (auto,) = torch.autograd.grad(outs_auto, [v], grads_auto, retain_graph=True)
        torch.testing.assert_close(fused, auto, rtol=1e-11, atol=1e-12)


@pytest.mark.parametrize("max_l", [0, 3])
def test_second_derivatives_are_exact(max_l):
    """create_graph (training on forces) differentiates the autograd form."""
    basis = _basis(max_l)
    v = _vectors(12).requires_grad_(True)
    assert torch.autograd.gradgradcheck(lambda x: basis(x)[0], (v,))
    if max_l:
        assert torch.autograd.gradgradcheck(lambda x: basis(x), (v,))


def test_trainable_parameters_take_the_autograd_path():
    basis = _basis(2)
    basis.bessel.requires_grad_(True)
    v = _vectors().requires_grad_(True)
    radial, _ = basis(v)
    assert "EdgeBasis" not in radial.grad_fn.name()
    radial.sum().backward()
    assert basis.bessel.frequencies.grad is not None


def test_cutoff_derivative_matches_autograd():
    cut = PolynomialCutoff(CUTOFF, 6)
    r = torch.linspace(0.1, 1.2 * CUTOFF, 101, dtype=torch.float64)[:, None].requires_grad_(True)
    value, slope = cut.value_and_derivative(r)
    torch.testing.assert_close(value, cut(r), rtol=1e-12, atol=1e-14)
    (auto,) = torch.autograd.grad(cut(r).sum(), [r])
    torch.testing.assert_close(slope, auto, rtol=1e-10, atol=1e-12)
