"""The per-edge basis (radial x cutoff, angular monomials) with an analytic derivative.

Forces need d(edge basis)/d(edge vector) once per call. Left to autograd, the
Bessel functions, the cutoff polynomial, the unit vector and the monomial products
record ~60 small operations whose backward runs another ~100 over [edges, ...]
tensors: about a third of a 192-atom call of the reference water model. Everything
here is a function of the edge vector alone, so its derivative is written out:

    radial_n(r) = p sin(k_n r) / r * env(r),   r = |v|
    d radial_n / dr = p (k_n cos(k_n r) - sin(k_n r) / r) / r * env + p sin(k_n r) / r * env'
    Y_c(u) = u_x^cx u_y^cy u_z^cz,   dY_c / du_a = c_a Y_(c - e_a)   (a monomial of the table)
    u = v / (r + eps),   du / dv = (1 - u n^T) / (r + eps),   n = v / r

The backward pass is then a handful of operations. It is used for first derivatives
only: when a second derivative is asked for (training on forces), the backward
recomputes the basis with autograd and differentiates that, so the result stays
exactly differentiable; with trainable basis parameters the plain path runs.
"""

from __future__ import annotations

from typing import Any

import torch

from cace_server.model.angular import AngularBasis, cartesian_components
from cace_server.model.radial import BesselBasis, PolynomialCutoff

# Unit vectors are v / (|v| + eps), as in the reference.
NORM_EPS = 1e-9


def plain_edge_basis(
    vectors: torch.Tensor, bessel: BesselBasis, cutoff: PolynomialCutoff, angular: AngularBasis
) -> tuple[torch.Tensor, torch.Tensor]:
    """(radial * cutoff [E, n_rbf], angular [L, E]) by plain autograd operations."""
    lengths = torch.linalg.vector_norm(vectors, dim=-1, keepdim=True)
    unit = vectors / (lengths + NORM_EPS)
    return bessel(lengths) * cutoff(lengths), angular.rows(unit.t())


class AngularDerivative(torch.nn.Module):
    """dY/du contracted with dL/dY: [L, E] x [L, E] -> [3, E], from the table itself.

    For each axis a and component c with c_a > 0: c_a * g[c] * Y[c - e_a]; the terms
    of each axis are summed by one small matrix product.
    """

    grad_rows: torch.Tensor
    parent_rows: torch.Tensor
    weights: torch.Tensor

    def __init__(self, max_l: int) -> None:
        super().__init__()
        comps = cartesian_components(max_l)
        index = {c: i for i, c in enumerate(comps)}
        grad_rows, parent_rows, axes, powers = [], [], [], []
        for axis in range(3):
            for i, c in enumerate(comps):
                if c[axis] == 0:
                    continue
                parent = list(c)
                parent[axis] -= 1
                grad_rows.append(i)
                parent_rows.append(index[(parent[0], parent[1], parent[2])])
                axes.append(axis)
                powers.append(float(c[axis]))
        weights = torch.zeros(3, len(axes), dtype=torch.get_default_dtype())
        weights[torch.tensor(axes, dtype=torch.long), torch.arange(len(axes))] = torch.tensor(
            powers
        )
        self.register_buffer("grad_rows", torch.tensor(grad_rows, dtype=torch.long), False)
        self.register_buffer("parent_rows", torch.tensor(parent_rows, dtype=torch.long), False)
        self.register_buffer("weights", weights, False)

    def forward(self, grad: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        terms = grad.index_select(0, self.grad_rows) * table.index_select(0, self.parent_rows)
        return torch.mm(self.weights.to(terms.dtype), terms)


class _EdgeBasis(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, vectors: torch.Tensor, basis: FusedEdgeBasis
    ) -> tuple[torch.Tensor, torch.Tensor]:
        bessel, cutoff = basis.bessel, basis.cutoff
        r = torch.linalg.vector_norm(vectors, dim=-1, keepdim=True)  # [E, 1]
        inv_r = 1.0 / r
        denom = 1.0 / (r + NORM_EPS)
        unit = vectors * denom
        table = basis.angular.rows(unit.t())
        kr = bessel.frequencies * r  # [E, n_rbf]
        sin_kr = torch.sin(kr)
        scale = bessel.prefactor * inv_r
        f = sin_kr * scale
        env, d_env = cutoff.value_and_derivative(r)
        radial = f * env
        ctx.save_for_backward(vectors, inv_r, denom, unit, table, kr, f, env, d_env)
        ctx.basis = basis
        ctx.scale_k = bessel.prefactor * bessel.frequencies
        return radial, table

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: Any, grad_radial: torch.Tensor | None, grad_angular: torch.Tensor | None
    ) -> tuple[torch.Tensor | None, None]:
        vectors, inv_r, denom, unit, table, kr, f, env, d_env = ctx.saved_tensors
        basis: FusedEdgeBasis = ctx.basis
        if torch.is_grad_enabled():
            # A second derivative is wanted: differentiate the autograd form instead.
            outputs = plain_edge_basis(vectors, basis.bessel, basis.cutoff, basis.angular)
            grads = (grad_radial, grad_angular)
            # (at l_max = 0 the angular basis is a constant, outside the graph)
            pairs = [
                (o, g)
                for o, g in zip(outputs, grads, strict=True)
                if g is not None and o.requires_grad
            ]
            if not pairs:
                return torch.zeros_like(vectors), None
            (grad,) = torch.autograd.grad(
                [o for o, _ in pairs], [vectors], [g for _, g in pairs], create_graph=True
            )
            return grad, None
        n = vectors * inv_r  # exact unit vector: dr/dv
        grad = torch.zeros_like(vectors)
        if grad_angular is not None:
            g_unit = basis.angular_derivative(grad_angular, table).t()  # [E, 3]
            along = (g_unit * unit).sum(-1, keepdim=True)
            grad = (g_unit - along * n) * denom
        if grad_radial is not None:
            # d radial / dr, contracted with the incoming gradient over the radial index
            d_f = (ctx.scale_k * torch.cos(kr) - f) * inv_r
            d_radial = d_f * env + f * d_env
            grad = grad + (grad_radial * d_radial).sum(-1, keepdim=True) * n
        return grad, None


class FusedEdgeBasis(torch.nn.Module):
    """The edge basis of a representation, evaluated with its analytic derivative.

    Holds references to the representation's own basis modules (their parameters stay
    where checkpoints put them) and falls back to plain autograd when any of their
    parameters is trained.
    """

    def __init__(self, bessel: BesselBasis, cutoff: PolynomialCutoff, angular: AngularBasis):
        super().__init__()
        # Plain attributes, not submodules: the representation owns them.
        object.__setattr__(self, "bessel", bessel)
        object.__setattr__(self, "cutoff", cutoff)
        object.__setattr__(self, "angular", angular)
        self.angular_derivative = AngularDerivative(angular.max_l)

    bessel: BesselBasis
    cutoff: PolynomialCutoff
    angular: AngularBasis

    def forward(self, vectors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (radial * cutoff [E, n_rbf], angular [L, E] components first)."""
        trained = any(p.requires_grad for p in self.bessel.parameters())
        if trained or not (vectors.requires_grad and torch.is_grad_enabled()):
            return plain_edge_basis(vectors, self.bessel, self.cutoff, self.angular)
        radial, angular = _EdgeBasis.apply(vectors, self)
        return radial, angular
