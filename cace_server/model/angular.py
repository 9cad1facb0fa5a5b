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
from typing import Any

import torch

from cace_server.model.fusion import materialized

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


def group_of_component(l_ranges: list[tuple[int, int]]) -> torch.Tensor:
    """The l group of each angular component (of :func:`l_slices`), [L]."""
    return torch.cat(
        [torch.full((e - s,), g, dtype=torch.long) for g, (s, e) in enumerate(l_ranges)]
    )


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
    """Monomials u_x^lx u_y^ly u_z^lz of unit vectors, shape [n_edges, n_components].

    Computed components-first (:meth:`rows`): the powers of each axis are rows of one
    table, and every monomial is a product of three gathered rows. Row gathers (and
    their backward, row additions) are contiguous copies; gathering columns of an
    [edges, powers] table, and adding them back in the backward pass, were ~5x slower
    per element.
    """

    factor_rows: torch.Tensor

    def __init__(self, max_l: int) -> None:
        super().__init__()
        self.max_l = max_l
        comps = torch.tensor(cartesian_components(max_l), dtype=torch.long)
        # Row of u_a^k in the power table: 3 k + a. Factor f of component i: row
        # factor_rows[f * L + i].
        rows = 3 * comps + torch.arange(3)
        self.register_buffer("factor_rows", rows.t().reshape(-1), persistent=False)
        self.n_components = int(comps.shape[0])

    def forward(self, unit: torch.Tensor) -> torch.Tensor:
        return self.rows(unit.t()).t()

    def rows(self, unit: torch.Tensor) -> torch.Tensor:
        """[3, E] unit vectors (axis-first) -> [L, E]."""
        # Rows must be contiguous: the table takes the layout of its inputs, and a
        # row gather from a column-major table is an element-wise gather (~50x slower).
        unit = unit.contiguous()
        # powers by repeated products, so that gradients stay finite for zero components
        powers = [torch.ones_like(unit)]
        for _ in range(self.max_l):
            powers.append(powers[-1] * unit)
        table = torch.cat(powers)  # [3 (max_l + 1), E]
        x, y, z = table.index_select(0, self.factor_rows).view(3, self.n_components, -1).unbind()
        return x * y * z


class Symmetrizer(torch.nn.Module):
    """A-basis [n, radial, components, channels] -> B-basis [n, radial, invariants, channels].

    The reference loops in Python over every product term. Here the A-features are
    laid out components-first, [L, M] with M = atoms x radial x channels, so that all
    product terms of all orders are one row gather (``index_select`` on dim 0, a
    contiguous copy per row), one elementwise product per factor, and one matrix
    product that sums the terms into their invariants: a handful of large operations
    whatever (l_max, nu), forward and backward.
    """

    gather_index: torch.Tensor
    assign: torch.Tensor
    term_row: torch.Tensor
    term_weight: torch.Tensor

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
        # Rows of the gathered factors: for each order nu, nu blocks of its T_nu terms.
        rows: list[int] = []
        # (first gathered row, number of terms) of each order.
        self.order_rows: list[tuple[int, int]] = []
        self.order_keys: list[int] = []
        self.order_is_power: list[bool] = []
        assign_blocks: list[torch.Tensor] = []
        self.n_out = 1
        for nu in range(2, max_nu + 1):
            terms = (explicit or {}).get(nu) or symmetrizer_terms(max_l, nu)
            if not terms:
                continue
            keys = list(dict.fromkeys(t.key for t in terms))
            key_index = {k: i for i, k in enumerate(keys)}
            self.order_rows.append((len(rows), len(terms)))
            self.order_keys.append(len(keys))
            # Orders whose every term is one component to the power nu (all of nu = 2:
            # l1 = l2 contracts a component with itself) need one factor, not nu.
            self.order_is_power.append(all(len(set(t.components)) == 1 for t in terms))
            for k in range(nu):
                rows.extend(index[t.components[k]] for t in terms)
            block = torch.zeros(len(keys), len(terms), dtype=torch.float64)
            for t_i, t in enumerate(terms):
                block[key_index[t.key], t_i] = t.prefactor
            assign_blocks.append(block)
            self.orders.append(nu)
            self.n_out += len(keys)
        self.n_components = len(index)
        self.register_buffer("gather_index", torch.tensor(rows, dtype=torch.long), persistent=False)
        # [K - 1, T_total]: invariant k = sum_t assign[k, t] * term_t (block diagonal in nu).
        assign = (
            torch.block_diag(*assign_blocks)
            if assign_blocks
            else torch.zeros(0, 0, dtype=torch.float64)
        )
        self.register_buffer("assign", assign.to(torch.get_default_dtype()), persistent=False)
        # Each term feeds exactly one invariant: its output row and prefactor, so that
        # the backward pass spreads dL/dB onto the terms with one gather (no matmul).
        n_terms = assign.shape[1]
        term_key = assign.abs().argmax(0) if n_terms else torch.zeros(0, dtype=torch.long)
        weight = assign[term_key, torch.arange(n_terms)] if n_terms else torch.zeros(0)
        self.register_buffer("term_row", term_key + 1, persistent=False)
        self.register_buffer(
            "term_weight", weight[:, None].to(torch.get_default_dtype()), persistent=False
        )
        # Columns (atoms x radial x channels) per chunk on a CPU: bounds the scratch of
        # the gathered factors to ~F x chunk values (cache), forward and backward. Other
        # devices take one pass (fewer launches; memory is bounded by the model's blocks).
        # (16,384 was measured too: 3 % faster at 1,536 atoms, 5 % slower at 12,288.)
        self.chunk = 1 << 16

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        n, r, n_l, c = a.shape
        x = a.permute(2, 0, 1, 3).reshape(n_l, n * r * c)
        b = self.components_first(x)
        return b.view(-1, n, r, c).permute(1, 2, 0, 3)

    def components_first(self, x: torch.Tensor) -> torch.Tensor:
        """[L, M] -> [K, M]: the invariants of each column of components."""
        if not self.orders:
            return x[:1]
        return _Symmetrize.apply(x, self)  # type: ignore[no-any-return]

    def _factor_index(self, order: int, k: int) -> torch.Tensor:
        start, n_terms = self.order_rows[order]
        return self.gather_index[start + k * n_terms : start + (k + 1) * n_terms]

    def _forward_chunk(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """[L, m] -> [K, m] (into ``out`` if given); runs without autograd."""
        if out is None:
            out = x.new_empty(self.n_out, x.shape[1])
        out[0] = x[0]
        row = 1
        t0 = 0
        for o, nu in enumerate(self.orders):
            n_terms = self.order_rows[o][1]
            p = x.index_select(0, self._factor_index(o, 0))
            if self.order_is_power[o]:
                p = p.pow_(nu)
            else:
                for k in range(1, nu):
                    p.mul_(x.index_select(0, self._factor_index(o, k)))
            block = self.assign[:, t0 : t0 + n_terms]
            n_keys = self.order_keys[o]
            torch.mm(block[row - 1 : row - 1 + n_keys].to(x.dtype), p, out=out[row : row + n_keys])
            row += n_keys
            t0 += n_terms
        return out

    def _backward_chunk(
        self, x: torch.Tensor, grad: torch.Tensor, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """d(sum grad * B)/dA, into ``out`` if given. Differentiable without ``out``
        (in-place only on fresh tensors)."""
        grad_x = torch.zeros_like(x) if out is None else out.zero_()
        grad_x[0] = grad[0]
        t0 = 0
        for o, nu in enumerate(self.orders):
            n_terms = self.order_rows[o][1]
            terms = slice(t0, t0 + n_terms)
            t0 += n_terms
            power = self.order_is_power[o]
            # d(x^nu)/dx = nu x^(nu - 1): a power's nu goes into its prefactor.
            weight = self.term_weight[terms].to(x.dtype) * (nu if power else 1)
            g_terms = grad.index_select(0, self.term_row[terms]) * weight  # [T, m]
            if power:
                factor = x.index_select(0, self._factor_index(o, 0))
                partial = g_terms
                for _ in range(nu - 1):
                    partial = partial * factor
                grad_x.index_add_(0, self._factor_index(o, 0), partial)
                continue
            index = [self._factor_index(o, k) for k in range(nu)]
            factors = [x.index_select(0, i) for i in index]
            # partial_k = g_terms * prod_{j != k} factor_j, from prefix and suffix products.
            prefix = [g_terms]
            for k in range(nu - 1):
                prefix.append(prefix[-1] * factors[k])
            suffix: torch.Tensor | None = None
            for k in range(nu - 1, -1, -1):
                partial = prefix[k] if suffix is None else prefix[k] * suffix
                # Rows add up in place, a contiguous row at a time (~7x faster here
                # than the one-hot matrix product it replaces).
                grad_x.index_add_(0, index[k], partial)
                if k > 0:
                    suffix = factors[k] if suffix is None else suffix * factors[k]
        return grad_x


class _Symmetrize(torch.autograd.Function):
    """B(A) on components-first columns, saving only A for the backward pass.

    Plain autograd would keep every gathered factor and partial product, several
    times the size of A. The backward recomputes them from A, chunk by chunk, and
    is written in differentiable torch operations, so second derivatives (training
    on forces) still work. Chunks write into one output (no concatenation: at 98,304
    atoms A is ~0.9 GB); the differentiable backward concatenates.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, x: torch.Tensor, sym: Symmetrizer
    ) -> torch.Tensor:
        x = materialized(x)  # read by every row gather, forward and backward
        ctx.save_for_backward(x)
        ctx.sym = sym  # type: ignore[attr-defined]
        spans = _chunks(x, sym.chunk)
        if len(spans) == 1:
            return sym._forward_chunk(x)
        out = x.new_empty(sym.n_out, x.shape[1])
        for s, e in spans:
            sym._forward_chunk(x[:, s:e], out[:, s:e])
        return out

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor
    ) -> tuple[torch.Tensor, None]:
        (x,) = ctx.saved_tensors  # type: ignore[attr-defined]
        sym: Symmetrizer = ctx.sym  # type: ignore[attr-defined]
        # arrives as a view of B's [n, r, K, c] layout; its rows are gathered
        grad = materialized(grad)
        spans = _chunks(x, sym.chunk)
        if len(spans) == 1:
            return sym._backward_chunk(x, grad), None
        if torch.is_grad_enabled():  # a second derivative will be taken
            parts = [sym._backward_chunk(x[:, s:e], grad[:, s:e]) for s, e in spans]
            return torch.cat(parts, dim=1), None
        grad_x = torch.empty_like(x)
        for s, e in spans:
            sym._backward_chunk(x[:, s:e], grad[:, s:e], grad_x[:, s:e])
        return grad_x, None


def _chunks(x: torch.Tensor, chunk: int) -> list[tuple[int, int]]:
    """Column spans: one pass off the CPU or up to one chunk's worth of columns."""
    m = x.shape[1]
    if x.device.type != "cpu" or m <= chunk:
        return [(0, m)]
    return [(s, min(s + chunk, m)) for s in range(0, m, chunk)]
