"""Unit tests of the angular combinatorics and the symmetriser."""

from __future__ import annotations

import pytest
import torch
from scipy.spatial.transform import Rotation

from cace_server.model.angular import (
    AngularBasis,
    Symmetrizer,
    cartesian_components,
    invariant_keys,
    l_slices,
    multinomial,
    n_invariants,
)


def test_component_order_and_count():
    comps = cartesian_components(3)
    assert len(comps) == 20
    assert comps[:10] == [
        (0, 0, 0), (1, 0, 0), (0, 1, 0), (0, 0, 1),
        (2, 0, 0), (1, 1, 0), (1, 0, 1), (0, 2, 0), (0, 1, 1), (0, 0, 2),
    ]  # fmt: skip
    for max_l in range(6):
        assert len(cartesian_components(max_l)) == (max_l + 1) * (max_l + 2) * (max_l + 3) // 6
        assert l_slices(max_l)[-1][1] == len(cartesian_components(max_l))


def test_invariant_counts():
    assert multinomial((1, 1, 1)) == 6 and multinomial((2, 0, 1)) == 3
    assert invariant_keys(3, 2) == [(1,), (2,), (3,)]
    assert invariant_keys(3, 3) == [(1, 1), (1, 2)]
    assert invariant_keys(3, 4) == [(1, 2, 1)]
    assert n_invariants(3, 3) == 6 and n_invariants(3, 4) == 7


def test_angular_basis_is_monomials():
    u = torch.nn.functional.normalize(torch.randn(7, 3, dtype=torch.float64), dim=1)
    y = AngularBasis(4)(u)
    for i, (lx, ly, lz) in enumerate(cartesian_components(4)):
        torch.testing.assert_close(y[:, i], u[:, 0] ** lx * u[:, 1] ** ly * u[:, 2] ** lz)


@pytest.mark.parametrize(("max_l", "max_nu"), [(2, 2), (3, 3), (3, 4), (4, 4)])
def test_symmetrizer_gradients_and_second_gradients(max_l, max_nu):
    sym = Symmetrizer(max_l, max_nu)
    a = torch.randn(
        4, 2, len(cartesian_components(max_l)), 3, dtype=torch.float64, requires_grad=True
    )
    assert torch.autograd.gradcheck(sym, (a,))
    assert torch.autograd.gradgradcheck(sym, (a,))


@pytest.mark.parametrize(("max_l", "max_nu"), [(3, 3), (3, 4), (4, 4)])
def test_b_basis_is_rotation_invariant(max_l, max_nu):
    """A-basis of a random neighbourhood -> B; rotating the neighbours leaves B unchanged."""
    torch.manual_seed(0)
    vectors = torch.randn(9, 3, dtype=torch.float64)
    weights = torch.randn(9, 2, 1, 3, dtype=torch.float64)  # radial x channel weights per edge
    rot = torch.tensor(Rotation.random(random_state=3).as_matrix())
    basis, sym = AngularBasis(max_l), Symmetrizer(max_l, max_nu)

    def b_of(v):
        y = basis(torch.nn.functional.normalize(v, dim=1))  # [E, L]
        a = (weights * y[:, None, :, None]).sum(0, keepdim=True)  # [1, 2, L, 3]
        return sym(a)

    torch.testing.assert_close(b_of(vectors @ rot.T), b_of(vectors), rtol=1e-10, atol=1e-12)


def test_symmetrizer_in_chunks_equals_one_pass_with_second_gradients():
    sym = Symmetrizer(3, 4)
    a = torch.randn(3, 2, 20, 2, dtype=torch.float64, requires_grad=True)
    whole = sym(a)
    g = torch.randn_like(whole)
    (grad_whole,) = torch.autograd.grad(whole, a, g)
    sym.chunk = 5  # columns per chunk: 12 columns -> 3 ragged chunks
    chunked = sym(a)
    torch.testing.assert_close(chunked, whole, rtol=1e-13, atol=1e-13)
    (grad_chunked,) = torch.autograd.grad(chunked, a, g)
    torch.testing.assert_close(grad_chunked, grad_whole, rtol=1e-13, atol=1e-13)
    assert torch.autograd.gradgradcheck(sym, (a,))
