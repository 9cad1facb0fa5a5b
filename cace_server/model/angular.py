"""Cartesian angular basis and the symmetrisation of its products.

CACE (Cheng, npj Comput. Mater. 10, 157 (2024), eqs. 3-9) expands each edge
direction u in monomials u_x^lx u_y^ly u_z^lz with lx + ly + lz = l <= l_max, sums
them over neighbours into the A-basis, and forms rotation invariants (the B-basis)
by contracting products of nu A-features over their Cartesian indices with
multinomial weights l!/(lx! ly! lz!).

Everything here is combinatorics fixed by (l_max, nu); the component order and the
order of the invariants are those of the reference implementation, so weights of
original checkpoints map one to one (the importer checks this against the tables
stored in the checkpoint).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from math import factorial
from typing import Any, cast

import torch

Component = tuple[int, int, int]


def cartesian_components(max_l: int) -> list[Component]:
    """All (lx, ly, lz) with lx+ly+lz <= max_l, in the reference order.

    Components of order l are generated from those of order l-1 by raising the x,
    then y, then z exponent, keeping the first occurrence of each.
    """
    by_l: list[list[Component]] = [[(0, 0, 0)]]
    for _ in range(max_l):
        next_l: list[Component] = []
        for lx, ly, lz in by_l[-1]:
            for raised in ((lx + 1, ly, lz), (lx, ly + 1, lz), (lx, ly, lz + 1)):
                if raised not in next_l:
                    next_l.append(raised)
        by_l.append(next_l)
    return [c for group in by_l for c in group]


def l_slices(max_l: int) -> list[tuple[int, int]]:
    """[start, end) of each angular order l in :func:`cartesian_components`."""
    out = []
    start = 0
    for ell in range(max_l + 1):
        size = (ell + 1) * (ell + 2) // 2
        out.append((start, start + size))
        start += size
    return out


def multinomial(c: Component) -> int:
    """l! / (lx! ly! lz!): how many orderings of the Cartesian indices give c."""
    return factorial(sum(c)) // (factorial(c[0]) * factorial(c[1]) * factorial(c[2]))


def _add(a: Component, b: Component) -> Component:
    return (a[0] + b[0], a[1] + b[1], a[2] + b[2])


@dataclass(frozen=True)
class SymmetrizerTerm:
    """prefactor * prod_k A[components[k]], accumulated into invariant ``key``."""

    key: tuple[int, ...]
    components: tuple[Component, ...]
    prefactor: int


def _grid(max_l: int) -> list[Component]:
    # Iteration order matters: it fixes the order in which invariants first appear.
    return [
        (x, y, z) for x, y, z in itertools.product(range(max_l + 1), repeat=3) if x + y + z <= max_l
    ]


def symmetrizer_terms(max_l: int, nu: int) -> list[SymmetrizerTerm]:
    """The product terms of the correlation-order-nu invariants.

    nu=2: sum over |v|=L of f(v) A_v A_v, one invariant per L >= 1.
    nu=3: sum of f(v1) f(v2) A_v1 A_v2 A_(v1+v2), one per (l1 <= l2).
    nu=4: sum of f(v1) f(v2) f(d) A_v1 A_v2 A_(v1+d) A_(v2+d), one per (l1 < l2, |d|).
    """
    grid = _grid(max_l)
    terms: list[SymmetrizerTerm] = []
    if nu == 2:
        for big_l in range(1, max_l + 1):
            for lx in range(big_l + 1):
                for ly in range(big_l + 1 - lx):
                    v = (lx, ly, big_l - lx - ly)
                    terms.append(SymmetrizerTerm((big_l,), (v, v), multinomial(v)))
    elif nu == 3:
        for v1 in grid:
            l1 = sum(v1)
            if l1 == 0:
                continue
            for v2 in grid:
                l2 = sum(v2)
                if l2 < l1 or l1 + l2 > max_l:
                    continue
                terms.append(
                    SymmetrizerTerm(
                        (l1, l2), (v1, v2, _add(v1, v2)), multinomial(v1) * multinomial(v2)
                    )
                )
    elif nu == 4:
        for v1 in grid:
            l1 = sum(v1)
            if l1 == 0:
                continue
            for v2 in grid:
                l2 = sum(v2)
                if l2 <= l1:
                    continue
                for d in grid:
                    dl = sum(d)
                    if dl == 0 or l1 + dl > max_l or l2 + dl > max_l:
                        continue
                    terms.append(
                        SymmetrizerTerm(
                            (l1, l2, dl),
                            (v1, v2, _add(v1, d), _add(v2, d)),
                            multinomial(v1) * multinomial(v2) * multinomial(d),
                        )
                    )
    else:
        raise ValueError(f"no symmetrizer terms for nu={nu}")
    return terms


def explicit_terms(table: dict[str, list[Any]]) -> dict[int, list[SymmetrizerTerm]]:
    """Symmetriser terms stored in a model config ({nu: [[key, components, prefactor]]})."""
    return {
        int(nu): [
            SymmetrizerTerm(
                tuple(int(k) for k in key),
                tuple((int(c[0]), int(c[1]), int(c[2])) for c in components),
                int(prefactor),
            )
            for key, components, prefactor in rows
        ]
        for nu, rows in table.items()
    }


def invariant_keys(max_l: int, nu: int) -> list[tuple[int, ...]]:
    """Invariant labels of order nu, in order of first appearance."""
    keys: dict[tuple[int, ...], None] = {}
    for term in symmetrizer_terms(max_l, nu):
        keys.setdefault(term.key, None)
    return list(keys)


def n_invariants(max_l: int, max_nu: int) -> int:
    """Number of B-features per radial channel and edge channel (nu = 1..max_nu)."""
    return 1 + sum(len(invariant_keys(max_l, nu)) for nu in range(2, max_nu + 1))


class AngularBasis(torch.nn.Module):
    """Monomials u_x^lx u_y^ly u_z^lz of unit vectors, shape [n_edges, n_components]."""

    exponents: torch.Tensor

    def __init__(self, max_l: int) -> None:
        super().__init__()
        self.max_l = max_l
        comps = torch.tensor(cartesian_components(max_l), dtype=torch.long)
        self.register_buffer("exponents", comps, persistent=False)

    @property
    def n_components(self) -> int:
        return int(self.exponents.shape[0])

    def forward(self, unit: torch.Tensor) -> torch.Tensor:
        # powers[..., k, axis] = unit[..., axis] ** k, built by repeated products so
        # that gradients stay finite for zero components.
        powers = [torch.ones_like(unit)]
        for _ in range(self.max_l):
            powers.append(powers[-1] * unit)
        table = torch.stack(powers, dim=1)  # [E, max_l + 1, 3]
        e = self.exponents
        # index_select, not advanced indexing: its backward is a fast index_add.
        return (
            table[:, :, 0].index_select(1, e[:, 0])
            * table[:, :, 1].index_select(1, e[:, 1])
            * table[:, :, 2].index_select(1, e[:, 2])
        )


class Symmetrizer(torch.nn.Module):
    """A-basis [n, radial, components, channels] -> B-basis [n, radial, invariants, channels].

    The reference loops in Python over every product term. Here each correlation
    order is one gather per factor, one product, and one matrix product that sums
    the terms into their invariants.
    """

    def __init__(
        self,
        max_l: int,
        max_nu: int,
        explicit: dict[int, list[SymmetrizerTerm]] | None = None,
    ) -> None:
        super().__init__()
        self.max_l = max_l
        self.max_nu = max_nu
        index = {c: i for i, c in enumerate(cartesian_components(max_l))}
        self.orders: list[int] = []
        self.n_out = 1
        for nu in range(2, max_nu + 1):
            terms = (explicit or {}).get(nu) or symmetrizer_terms(max_l, nu)
            if not terms:
                continue
            keys = list(dict.fromkeys(t.key for t in terms))
            key_index = {k: i for i, k in enumerate(keys)}
            factors = torch.tensor(
                [[index[c] for c in t.components] for t in terms], dtype=torch.long
            )  # [T, nu]
            assign = torch.zeros(len(terms), len(keys), dtype=torch.float64)
            for t_i, t in enumerate(terms):
                assign[t_i, key_index[t.key]] = t.prefactor
            self.register_buffer(f"factors_{nu}", factors, persistent=False)
            self.register_buffer(f"assign_{nu}", assign, persistent=False)
            self.orders.append(nu)
            self.n_out += len(keys)

    def tables(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(factors [T, nu], assign [T, K]) of each correlation order nu >= 2."""
        return [
            (
                cast(torch.Tensor, getattr(self, f"factors_{nu}")),
                cast(torch.Tensor, getattr(self, f"assign_{nu}")),
            )
            for nu in self.orders
        ]

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        return _Symmetrize.apply(a, self.tables())  # type: ignore[no-any-return]


def _symmetrize(a: torch.Tensor, tables: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    out = [a[:, :, :1, :]]
    for factors, assign in tables:
        product = a.index_select(2, factors[:, 0])
        for k in range(1, factors.shape[1]):
            product = product * a.index_select(2, factors[:, k])
        # [n, r, T, c] x [T, K] -> [n, r, K, c]
        out.append(torch.einsum("nrtc,tk->nrkc", product, assign.to(a.dtype)))
    return torch.cat(out, dim=2)


class _Symmetrize(torch.autograd.Function):
    """B(A) that saves only A for the backward pass.

    Plain autograd would keep every gathered factor and partial product, several
    times the size of A per atom. The backward here recomputes them from A, and is
    written in differentiable torch operations, so second derivatives (training on
    forces) still work.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        a: torch.Tensor,
        tables: list[tuple[torch.Tensor, torch.Tensor]],
    ) -> torch.Tensor:
        ctx.save_for_backward(a)
        ctx.tables = tables  # type: ignore[attr-defined]
        return _symmetrize(a, tables)

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor
    ) -> tuple[torch.Tensor, None]:
        (a,) = ctx.saved_tensors  # type: ignore[attr-defined]
        grad_a = torch.zeros_like(a)
        grad_a[:, :, :1, :] = grad[:, :, :1, :]
        start = 1
        for factors, assign in ctx.tables:  # type: ignore[attr-defined]
            n_keys = assign.shape[1]
            # d B_key / d A_(factor k of term t) = prefactor_t * prod of the other factors
            g_terms = torch.einsum(
                "nrkc,tk->nrtc", grad[:, :, start : start + n_keys, :], assign.to(a.dtype)
            )
            start += n_keys
            gathered = [a.index_select(2, factors[:, k]) for k in range(factors.shape[1])]
            for k in range(len(gathered)):
                partial = g_terms
                for j, g in enumerate(gathered):
                    if j != k:
                        partial = partial * g
                grad_a = grad_a.index_add(2, factors[:, k], partial)
        return grad_a, None
