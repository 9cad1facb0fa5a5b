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

from dataclasses import dataclass, fields
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


@dataclass
class EdgeTerms:
    """The edge basis of edge vectors and what its derivative needs.

    ``frequencies`` and ``prefactor`` may be the concatenated Bessel parameters of
    several models sharing a cutoff function and angular basis (a committee): the
    radial basis is then their columns side by side, [E, sum of n_rbf].
    """

    vectors: torch.Tensor
    inv_r: torch.Tensor  # [E, 1]
    denom: torch.Tensor  # 1 / (r + eps), [E, 1]
    unit: torch.Tensor  # [E, 3]
    table: torch.Tensor  # angular basis [L, E]
    kr: torch.Tensor  # [E, W]
    f: torch.Tensor  # prefactor sin(kr) / r, [E, W]
    env: torch.Tensor  # [E, 1]
    d_env: torch.Tensor  # [E, 1]
    scale_k: torch.Tensor  # prefactor x frequencies, [W]

    @classmethod
    def of(
        cls,
        vectors: torch.Tensor,
        frequencies: torch.Tensor,
        prefactor: torch.Tensor,
        cutoff: PolynomialCutoff,
        angular: AngularBasis,
    ) -> EdgeTerms:
        r = torch.linalg.vector_norm(vectors, dim=-1, keepdim=True)  # [E, 1]
        inv_r = 1.0 / r
        denom = 1.0 / (r + NORM_EPS)
        unit = vectors * denom
        kr = frequencies * r
        f = torch.sin(kr) * (prefactor * inv_r)
        env, d_env = cutoff.value_and_derivative(r)
        table = angular.rows(unit.t())
        return cls(vectors, inv_r, denom, unit, table, kr, f, env, d_env, prefactor * frequencies)

    @property
    def radial(self) -> torch.Tensor:
        """radial x cutoff, [E, W]."""
        return self.f * self.env

    def d_radial(self) -> torch.Tensor:
        """d radial / dr, [E, W]."""
        d_f = (self.scale_k * torch.cos(self.kr) - self.f) * self.inv_r
        return d_f * self.env + self.f * self.d_env

    def direction(self) -> torch.Tensor:
        """dr/dv: the exact unit vector, [E, 3]."""
        return self.vectors * self.inv_r

    def angular_gradient(self, g_unit: torch.Tensor) -> torch.Tensor:
        """A gradient with respect to the unit vectors [..., E, 3] -> to the vectors."""
        along = (g_unit * self.unit).sum(-1, keepdim=True)
        return (g_unit - along * self.direction()) * self.denom


class _EdgeBasis(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, vectors: torch.Tensor, basis: FusedEdgeBasis
    ) -> tuple[torch.Tensor, torch.Tensor]:
        bessel = basis.bessel
        terms = EdgeTerms.of(
            vectors, bessel.frequencies, bessel.prefactor, basis.cutoff, basis.angular
        )
        # saved through save_for_backward (the angular table is also an output: kept
        # on ctx directly it would form a reference cycle with its graph node)
        ctx.save_for_backward(*(getattr(terms, f.name) for f in fields(terms)))
        ctx.basis = basis
        return terms.radial, terms.table

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: Any, grad_radial: torch.Tensor | None, grad_angular: torch.Tensor | None
    ) -> tuple[torch.Tensor | None, None]:
        terms = EdgeTerms(*ctx.saved_tensors)
        basis: FusedEdgeBasis = ctx.basis
        vectors = terms.vectors
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
        grad = torch.zeros_like(vectors)
        if grad_angular is not None:
            grad = terms.angular_gradient(basis.angular_derivative(grad_angular, terms.table).t())
        if grad_radial is not None:
            # d radial / dr, contracted with the incoming gradient over the radial index
            along_r = (grad_radial * terms.d_radial()).sum(-1, keepdim=True)
            grad = grad + along_r * terms.direction()
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
