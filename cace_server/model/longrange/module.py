"""The long-range term of a model: one module, three paths chosen per structure on the host.

- open structures: the real-space pair sum (:mod:`.realspace`);
- periodic structures: the reciprocal sum, by the direct back end (:mod:`.direct`,
  exact, O(N M)) or the mesh back end (:mod:`.mesh`, smooth PME, O(N p^3 + K log K)),
  with the k-space kernel of :mod:`.kspace` in ``parity`` or ``smooth`` mode.

All structures of a batch are evaluated in groups (same back end and grid shape) of
batched tensor operations; the plan of groups is made on the host from numpy cells, so
the call has no per-structure loop and no device-to-host read.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from cace_server.model.config import EwaldConfig
from cace_server.model.longrange.direct import ELEMENT_BUDGET, direct_energy
from cace_server.model.longrange.kspace import MODES, PARITY, KSpaceWeights, reciprocal_cells
from cace_server.model.longrange.mesh import mesh_energy, mesh_shape
from cace_server.model.longrange.plan import (
    DIRECT,
    MESH,
    OPEN,
    LongRangePlan,
    StructureGroup,
    make_group,
    periodicity,
)
from cace_server.model.longrange.realspace import open_energy

METHODS = ("auto", DIRECT, MESH)


@dataclass(frozen=True)
class LongRangeOptions:
    """How a model evaluates its long-range term (run-time choices, not model weights).

    mode: ``parity`` (the original's k-set, default) or ``smooth`` (energy smooth in
    the cell, for NPT). method: ``auto`` (mesh for periodic structures of at least
    ``mesh_above`` atoms), ``direct`` or ``mesh``. smooth_width: width of the fade at
    k_max as a fraction of k_max. mesh_order: B-spline order p (even). mesh_oversampling:
    grid points per axis over 2 n_max + 1.
    """

    mode: str = PARITY
    method: str = "auto"
    smooth_width: float = 0.2
    mesh_order: int = 6
    mesh_oversampling: float = 2.0
    mesh_above: int = 1000

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"long-range mode must be one of {MODES}, got {self.mode!r}")
        if self.method not in METHODS:
            raise ValueError(f"long-range method must be one of {METHODS}, got {self.method!r}")
        if self.mesh_order < 4 or self.mesh_order % 2:
            raise ValueError(f"mesh_order must be even and >= 4, got {self.mesh_order}")
        if self.mesh_oversampling < 1.0:
            raise ValueError("mesh_oversampling must be >= 1")

    def updated(self, **changes: Any) -> LongRangeOptions:
        return replace(self, **{k: v for k, v in changes.items() if v is not None})


class EwaldSum(torch.nn.Module):
    """Energy of latent charges, per structure.

    ``cfg`` gives the physics (sigma, dl, self-interaction, normalisation), ``options``
    the evaluation (mode and back end). Call with a plan made by :meth:`plan` from host
    data for a sync-free call; without one, the plan is made from the tensors.
    """

    def __init__(self, cfg: EwaldConfig, options: LongRangeOptions | None = None) -> None:
        super().__init__()
        self.dl = float(cfg.dl)
        self.sigma = float(cfg.sigma)
        self.remove_self_interaction = bool(cfg.remove_self_interaction)
        self.norm_factor = float(cfg.norm_factor)
        # open boundaries: erf(r / sigma sqrt 2) / (r + pair_epsilon)
        self.pair_epsilon = float(cfg.pair_epsilon)
        # with several channels, CACE's periodic Ewald removes the self energy of all
        # channels from each channel (n_q times in all), the LES package once
        self.self_energy_every_channel = bool(cfg.self_energy_every_channel)
        # complex elements per block of the direct sum's phase product (memory bound)
        self.element_budget = ELEMENT_BUDGET
        self.configure(options or LongRangeOptions())

    def configure(self, options: LongRangeOptions) -> None:
        self.options = options
        self.kernel = KSpaceWeights(self.sigma, self.dl, options.mode, options.smooth_width)

    def extra_repr(self) -> str:
        return f"sigma={self.sigma}, dl={self.dl}, {self.options}"

    def self_energy(self, q: torch.Tensor) -> torch.Tensor:
        """Gaussian self-energy sum q^2 / (sigma (2 pi)^1.5), over all but the first axis."""
        return (q**2).flatten(1).sum(1) / (self.sigma * (2.0 * math.pi) ** 1.5)

    # -- planning (host) -------------------------------------------------------------------
    def plan(
        self,
        cells: npt.NDArray[np.float64],
        pbc: npt.NDArray[np.bool_],
        n_atoms: Sequence[int],
    ) -> LongRangePlan:
        cells = np.asarray(cells, dtype=np.float64).reshape(-1, 3, 3)
        periodic = periodicity(pbc)
        offsets = [0, *np.cumsum(n_atoms)[:-1].tolist()]
        lengths = np.linalg.norm(cells, axis=2).tolist()
        keys: dict[tuple[Any, ...], list[int]] = {}
        for b, is_periodic in enumerate(periodic):
            if not is_periodic:
                keys.setdefault((OPEN,), []).append(b)
                continue
            extents = self.kernel.extents(lengths[b])
            kind = self._method(n_atoms[b])
            shape = mesh_shape(extents, self.options.mesh_oversampling) if kind == MESH else None
            keys.setdefault((kind, extents, shape), []).append(b)
        groups = []
        for key, systems in keys.items():
            if key[0] == OPEN:
                groups.append(make_group(OPEN, systems, n_atoms, offsets))
            else:
                groups.append(make_group(key[0], systems, n_atoms, offsets, key[1], key[2]))
        return LongRangePlan(len(periodic), tuple(groups))

    def _method(self, n_atoms: int) -> str:
        if self.options.method != "auto":
            return self.options.method
        return MESH if n_atoms >= self.options.mesh_above else DIRECT

    # -- evaluation ------------------------------------------------------------------------
    def forward(
        self,
        positions: torch.Tensor,
        charges: torch.Tensor,
        cell: torch.Tensor,
        pbc: torch.Tensor | npt.NDArray[np.bool_] | None = None,
        n_atoms: Sequence[int] | None = None,
        *,
        plan: LongRangePlan | None = None,
    ) -> torch.Tensor:
        """Energies [n_systems] in the dtype of ``charges`` ([N] or [N, n_q] channels,
        summed). positions [N, 3] and cell [B, 3, 3] are float64 (possibly strained)."""
        if plan is None:
            if pbc is None or n_atoms is None:
                raise ValueError("give pbc and n_atoms, or a plan")
            host_pbc = pbc.detach().cpu().numpy() if isinstance(pbc, torch.Tensor) else pbc
            plan = self.plan(cell.detach().cpu().numpy(), host_pbc, n_atoms)
        q = charges[:, None] if charges.dim() == 1 else charges
        energies: torch.Tensor | None = None
        for group in plan.groups:
            energy = self._group_energy(group, positions, q, cell) * self.norm_factor
            if len(group.systems) == plan.n_systems and group.systems == tuple(
                range(plan.n_systems)
            ):
                energies = energy if energies is None else energies + energy
                continue
            if energies is None:
                energies = q.new_zeros(plan.n_systems)
            index = torch.as_tensor(group.systems, device=q.device)
            energies = energies.index_add(0, index, energy)
        if energies is None:
            return q.new_zeros(plan.n_systems)
        return energies

    def _group_energy(
        self, group: StructureGroup, positions: torch.Tensor, q: torch.Tensor, cell: torch.Tensor
    ) -> torch.Tensor:
        g, n = len(group.systems), group.n_max
        if group.start is not None:
            r = positions[group.start : group.start + g * n].view(g, n, 3)
            qg = q[group.start : group.start + g * n].view(g, n, q.shape[1])
            valid = None
        else:
            assert group.atom_index is not None
            index = torch.as_tensor(group.atom_index, device=q.device)
            valid = index >= 0
            safe = index.clamp(min=0)
            r = positions[safe]
            qg = q[safe] * valid[..., None].to(q.dtype)
        if group.kind == OPEN:
            if valid is None:
                valid = torch.ones(g, n, dtype=torch.bool, device=q.device)
            energy = open_energy(r, qg, valid, self.sigma, self.pair_epsilon)
            # The pair sum leaves out i == j; the self-energy puts it back unless the
            # model removes it, so periodic and open energies share one reference.
            return energy if self.remove_self_interaction else energy + self.self_energy(qg)
        first = group.systems[0]
        if group.systems == tuple(range(first, first + g)):
            cells = cell[first : first + g]
        else:
            cells = cell[torch.as_tensor(group.systems, device=cell.device)]
        recip, volume = reciprocal_cells(cells)
        if group.kind == MESH:
            assert group.mesh is not None
            energy = mesh_energy(
                r,
                qg,
                recip,
                volume,
                group.extents,
                group.mesh,
                self.options.mesh_order,
                self.kernel,
            )
        else:
            energy = direct_energy(
                r, qg, recip, volume, group.extents, self.kernel, self.element_budget
            )
        if not self.remove_self_interaction:
            return energy
        times = qg.shape[2] if self.self_energy_every_channel else 1
        return energy - times * self.self_energy(qg)
