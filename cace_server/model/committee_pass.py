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

from cace_server.model.edge_basis import EdgeTerms
from cace_server.model.neighbors import GraphBatch, PreparedStructure, collate
from cace_server.model.potential import CACEPotential, Geometry, to_host
from cace_server.model.representation import sum_over_neighbours
from cace_server.model.stacked import StackedMembers


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


def _shares_edge_basis(members: Sequence[CACEPotential]) -> bool:
    """Same cutoff function and angular basis (the Bessel frequencies may differ)."""
    keys = {
        (
            m.cutoff,
            m.config.max_l,
            m.representation.cutoff_fn.cutoff,
            m.representation.cutoff_fn.p,
            m.dtype,
        )
        for m in members
    }
    return len(keys) == 1


class SharedEdgePass:
    """One pass of members that share a cutoff function and angular basis (see module doc).

    The members' radial bases (trained Bessel frequencies differ between members)
    are evaluated side by side as one [edges, sum of n_rbf] basis, summed over
    neighbours per sender element in one product, and split per member at node
    level. The edge part's backward is written out here, per member, so that M
    members' forces cost one pass over the edges.
    """

    def __init__(self, members: Sequence[CACEPotential], *, stack: bool | None = None) -> None:
        self.members = list(members)
        self.widths = input_widths(members)
        rep = members[0].representation
        self.cutoff_fn = rep.cutoff_fn
        self.angular = rep.angular
        self.angular_derivative = rep.fused_edge_basis.angular_derivative
        self.n_rbf = [m.config.n_rbf for m in members]
        #: members of one architecture run their node-level work with a member axis
        #: off the CPU (see ``cace_server.model.stacked``); ``stack`` forces either way
        self.stacked = StackedMembers.for_members(members)
        self.stack = stack
        self._bessel_cache: dict[tuple[torch.device, torch.dtype], tuple[torch.Tensor, ...]] = {}

    @classmethod
    def for_members(cls, members: Sequence[CACEPotential]) -> SharedEdgePass | None:
        """The shared pass, or None where the members do not allow it."""
        for m in members:
            if m.config.num_message_passing or m.ewald is not None or m.polarization is not None:
                return None
            if not m.representation.sums_per_element:
                return None
        return cls(members) if _shares_edge_basis(members) else None

    def applies_to(self, group: Sequence[PreparedStructure]) -> bool:
        """Groups the members would evaluate in blocks (memory) run member by member."""
        first = self.members[0]
        atoms = sum(p.n_atoms for p in group)
        return first.representation.block_size(atoms, first.device) is None

    def run(self, group: Sequence[PreparedStructure], need: MemberNeeds) -> MemberResults:
        first = self.members[0]
        batch = collate(group, first.device, self.widths, first.dtype)
        with torch.enable_grad():
            tensors = self.evaluate(batch, need)
        arrays = to_host(tensors)
        return MemberResults(
            list(group),
            arrays["energy"],
            forces=arrays.get("forces"),
            virial=arrays.get("virial"),
            energies=arrays.get("energies"),
        )

    def _bessel(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Stacked frequencies and prefactors [W], and membership [W, M] of each column
        (the members' columns side by side), kept per device and dtype."""
        bases = [m.representation.radial_basis for m in self.members]
        key = (device, bases[0].frequencies.dtype)
        if key not in self._bessel_cache:
            frequencies = torch.cat([b.frequencies.detach() for b in bases])
            prefactor = torch.cat(
                [b.prefactor.detach().expand(n) for b, n in zip(bases, self.n_rbf, strict=True)]
            )
            membership = torch.block_diag(*(torch.ones(n, 1) for n in self.n_rbf))
            self._bessel_cache[key] = (
                frequencies,
                prefactor,
                membership.to(device=device, dtype=frequencies.dtype),
            )
        frequencies, prefactor, membership = self._bessel_cache[key]
        return frequencies, prefactor, membership

    def evaluate(self, batch: GraphBatch, need: MemberNeeds) -> dict[str, torch.Tensor]:
        """The members' results on the device: energy [M, B], and as needed energies
        [M, n], forces [M | 1, n, 3], virial [M | 1, B, 3, 3]. Nothing here waits for
        the device."""
        first = self.members[0]
        dtype = first.dtype
        geometry = Geometry.of(batch, forces=need.forces, virial=need.virial)
        blocks = first.representation.receiver_blocks(
            geometry.vectors.to(dtype),
            batch.species,
            batch.receivers,
            batch.senders,
            None,
            batch.max_neighbors,
        )
        n, k, nz = blocks.n, blocks.k, len(first.elements)
        padded = blocks.vectors  # [n * k, 3], differentiable back to the leaves
        frequencies, prefactor, membership = self._bessel(padded.device)
        width = int(frequencies.shape[0])
        with torch.no_grad():
            terms = EdgeTerms.of(
                padded.detach(), frequencies, prefactor, self.cutoff_fn, self.angular
            )
            radial = terms.radial.view(n, k, width)
            angular = terms.table.view(-1, n, k)
            one_hot = torch.eye(nz, dtype=dtype, device=padded.device)
            rows = one_hot.index_select(0, batch.species).index_select(0, blocks.senders)
            sums = sum_over_neighbours(radial, angular, rows).view(n, -1, nz, width)
        leaves = geometry.leaves
        differentiable = bool(leaves) and padded.requires_grad
        sums.requires_grad_(differentiable)
        energy, atom_energy = self._node_energies(sums, batch)  # [M, B], [M, n]
        out = {"energy": energy.detach()}
        if need.energies:
            out["energies"] = atom_energy.detach()
        if not leaves:
            return out
        m_out = len(self.members) if need.per_member else 1
        if not differentiable:
            # Nothing depends on the geometry (no edges at all).
            if need.forces:
                out["forces"] = padded.new_zeros(m_out, n, 3)
            if need.virial:
                out["virial"] = padded.new_zeros(m_out, batch.n_systems, 3, 3)
            return out
        # Every member's gradient of its energy with respect to its own columns.
        (sum_grad,) = torch.autograd.grad(energy.sum(), sums)
        grad_vectors = self._edge_backward(
            terms, radial, angular, rows, sum_grad, membership, need.per_member
        )
        if need.per_member:
            grads = torch.autograd.grad(padded, leaves, grad_vectors, is_grads_batched=True)
        else:
            grads = tuple(g[None] for g in torch.autograd.grad(padded, leaves, grad_vectors[0]))
        if need.forces:
            out["forces"] = -grads[0]
        if need.virial:
            out["virial"] = -grads[-1]
        return out

    def _node_energies(
        self, sums: torch.Tensor, batch: GraphBatch
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(energy [M, B], atom energies [M, n]) of every member from its columns of
        the neighbour sums: one stacked pass for members of one architecture."""
        stack = sums.device.type != "cpu" if self.stack is None else self.stack
        if self.stacked is not None and stack:
            return self.stacked.energies(sums, batch)
        n, n_l = sums.shape[0], sums.shape[1]
        energies, atom_energies = [], []
        for member, part in zip(self.members, torch.split(sums, self.n_rbf, dim=3), strict=True):
            features = member.representation.features_from_sums(
                part.reshape(n, n_l, -1), batch.species
            )
            energy, atom_energy = member.head_energies(features, batch)
            energies.append(energy)
            atom_energies.append(atom_energy)
        return torch.stack(energies), torch.stack(atom_energies)

    @torch.no_grad()
    def _edge_backward(
        self,
        terms: EdgeTerms,
        radial: torch.Tensor,
        angular: torch.Tensor,
        rows: torch.Tensor,
        sum_grad: torch.Tensor,
        membership: torch.Tensor,
        per_member: bool,
    ) -> torch.Tensor:
        """The gradient with respect to the edge vectors of each member's energy,
        [M, n * k, 3], or of the members' mean energy, [1, n * k, 3].

        sums[b, l, z, w] = sum_k angular[l, b, k] rows[b, k, z] radial[b, k, w]; the
        columns w of member m carry only m's gradient, so the radial gradient splits
        by column, and the angular gradient is formed per member (or once, summed
        over all columns, for the mean).
        """
        n, n_l, nz, width = sum_grad.shape
        k = radial.shape[1]
        per_slot = torch.bmm(angular.permute(1, 2, 0), sum_grad.reshape(n, n_l, nz * width))
        grad_radial = (per_slot.view(n, k, nz, width) * rows.view(n, k, nz, 1)).sum(2)
        if per_member:
            parts = list(
                zip(
                    torch.split(radial, self.n_rbf, dim=2),
                    torch.split(sum_grad, self.n_rbf, dim=3),
                    strict=True,
                )
            )
        else:
            parts = [(radial, sum_grad)]
        grad_angular = []
        for radial_m, grad_m in parts:
            y = (rows.view(n, k, nz, 1) * radial_m[:, :, None, :]).flatten(2)  # [n, k, z R]
            grad_angular.append(torch.bmm(y, grad_m.reshape(n, n_l, -1).transpose(1, 2)))
        # per member: one product over all members' edges at once is 8x slower on a
        # CPU (measured at 192 atoms: 10 ms against 1.3 ms; the operands leave cache)
        g_unit = torch.stack(
            [
                self.angular_derivative(g.permute(2, 0, 1).reshape(n_l, -1), terms.table).t()
                for g in grad_angular
            ]
        )
        grad = terms.angular_gradient(g_unit)
        d_radial = grad_radial.view(n * k, width) * terms.d_radial()
        along_r = d_radial @ membership if per_member else d_radial.sum(1, keepdim=True)
        grad = grad + along_r.t()[:, :, None] * terms.direction()
        return grad if per_member else grad / membership.shape[1]
