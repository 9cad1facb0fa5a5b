"""How a committee's members are evaluated together: what each must compute, what
comes back, and the shared edge pass of members that share an edge basis.

Profile of one 192-atom water call of the bundled model (float32, 2 CPU threads,
torch.profiler): the edge basis and its backward take about a third, the neighbour
sums (index_select, bmm, their backward's scatter_add) another fifth; the
per-member work (radial mixing, symmetriser, heads) is node-level. For members
without message passing whose neighbour sums run per sender element, the sums
``sum_j onehot(z_j) (x) radial(r_ij) (x) angular(u_ij)`` depend only on the edge
basis, so :class:`SharedEdgePass` computes them once, runs each member's
node-level forward and backward down to them, and takes the M members' gradients
through the shared edge work in one batched backward pass
(``torch.autograd.grad(..., is_grads_batched=True)``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from cace_server.model.neighbors import GraphBatch, PreparedStructure, collate
from cace_server.model.potential import CACEPotential, Geometry


@dataclass(frozen=True)
class MemberNeeds:
    """What each member must compute for the outputs asked of the committee."""

    forces: bool
    virial: bool
    energies: bool
    #: each member's own forces and virials (not only their mean)
    per_member: bool


@dataclass
class MemberResults:
    """The members' results on one group of structures (float64, on the host).

    ``forces`` and ``virial`` have a leading axis of M, or of 1 when only the
    members' mean was computed (``MemberNeeds.per_member`` false).
    """

    prepared: list[PreparedStructure]
    energy: np.ndarray  # [M, B]
    forces: np.ndarray | None = None  # [M | 1, N, 3]
    virial: np.ndarray | None = None  # [M | 1, B, 3, 3]
    energies: np.ndarray | None = None  # [M, N]


def input_widths(members: Sequence[CACEPotential]) -> dict[str, int]:
    widths: dict[str, int] = {}
    for m in members:
        widths.update(m.input_widths)
    return widths


def _edge_basis_key(member: CACEPotential) -> tuple[object, ...]:
    """What fixes a member's edge basis and its neighbour sums."""
    rep = member.representation
    bessel = rep.radial_basis
    return (
        member.cutoff,
        member.config.n_rbf,
        member.config.max_l,
        member.config.cutoff_p,
        member.config.envelope_cutoff,
        tuple(bessel.frequencies.detach().reshape(-1).tolist()),
        float(bessel.prefactor),
    )


class SharedEdgePass:
    """One pass of several members that share their edge basis (see module doc)."""

    def __init__(self, members: Sequence[CACEPotential]) -> None:
        self.members = list(members)
        self.widths = input_widths(members)

    @classmethod
    def for_members(cls, members: Sequence[CACEPotential]) -> SharedEdgePass | None:
        """The shared pass, or None where the members do not allow it."""
        for m in members:
            if m.config.num_message_passing or m.ewald is not None or m.polarization is not None:
                return None
            if not m.representation.sums_per_element:
                return None
        keys = {_edge_basis_key(m) for m in members}
        if len(keys) != 1 or len({m.dtype for m in members}) != 1:
            return None
        return cls(members)

    def applies_to(self, group: Sequence[PreparedStructure]) -> bool:
        """Groups the members would evaluate in blocks (memory) run member by member."""
        first = self.members[0]
        atoms = sum(p.n_atoms for p in group)
        return first.representation.block_size(atoms, first.device) is None

    def run(self, group: Sequence[PreparedStructure], need: MemberNeeds) -> MemberResults:
        first = self.members[0]
        batch = collate(group, first.device, self.widths, first.dtype)
        with torch.enable_grad():
            return self._evaluate(list(group), batch, need)

    def _evaluate(
        self, group: list[PreparedStructure], batch: GraphBatch, need: MemberNeeds
    ) -> MemberResults:
        first = self.members[0]
        geometry = Geometry.of(batch, forces=need.forces, virial=need.virial)
        rep = first.representation
        n = batch.species.shape[0]
        blocks = rep.receiver_blocks(
            geometry.vectors.to(first.dtype),
            batch.species,
            batch.receivers,
            batch.senders,
            None,
            batch.max_neighbors,
        )
        nz = len(first.elements)
        one_hot = torch.eye(nz, dtype=first.dtype, device=batch.species.device)
        sums = rep.neighbour_sums(blocks, one_hot.index_select(0, batch.species), 0, n)
        leaves = geometry.leaves
        differentiable = bool(leaves) and sums.requires_grad
        # Each member's node-level part runs from a detached copy of the sums; its
        # backward stops there, and the edge part is differentiated once for all.
        sums_leaf = sums.detach().requires_grad_(differentiable)
        energies, atom_energies, sum_grads = [], [], []
        for member in self.members:
            features = member.representation.features_from_sums(sums_leaf, batch.species)
            energy, atom_energy = member.head_energies(features, batch)
            energies.append(energy.detach())
            if need.energies:
                atom_energies.append(atom_energy.detach())
            if differentiable:
                (g,) = torch.autograd.grad(energy.sum(), sums_leaf)
                sum_grads.append(g)
        results = MemberResults(group, _host(torch.stack(energies)))
        if need.energies:
            results.energies = _host(torch.stack(atom_energies))
        if not leaves:
            return results
        if not differentiable:
            # Nothing depends on the geometry (isolated atoms, no neighbour pairs).
            width = len(self.members) if need.per_member else 1
            if need.forces:
                results.forces = np.zeros((width, n, 3))
            if need.virial:
                results.virial = np.zeros((width, batch.n_systems, 3, 3))
            return results
        if need.per_member:
            grads = torch.autograd.grad(
                sums, leaves, torch.stack(sum_grads), is_grads_batched=True, allow_unused=True
            )
        else:
            mean = torch.stack(sum_grads).mean(dim=0)
            grads = tuple(g[None] for g in torch.autograd.grad(sums, leaves, mean))
        k = 0
        if need.forces:
            results.forces = -_host(grads[k])
            k += 1
        if need.virial:
            results.virial = -_host(grads[k])
        return results


def _host(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(device="cpu", dtype=torch.float64).numpy()
