"""Committee members of one architecture as one model with a member axis.

For members without message passing, everything after the neighbour sums is
node-level: the radial mixing with the element embeddings, the symmetriser, and
the energy heads. Members of one architecture differ there only in their weights,
so their weights are stacked along a leading member axis and the M members run
as one set of operations (a batched matrix product per layer, one symmetriser
call over all members' columns) instead of M: the operation count of the
node-level work no longer grows with M, which is what a committee costs on a GPU,
where a 192-atom call is bound by kernel launches (the 4-seed water committee at
192 atoms: 571 operations per call instead of 879 member by member, against 330
for one member alone; counted with a TorchDispatchMode). On a CPU the member-major
tensors fall out of cache: measured 53.7 ms against 40.3 ms member by member at
192 atoms (4 members, float32, one thread), so the CPU keeps the member loop.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence

import torch

from cace_server.model.mlp import AtomwiseReadout
from cace_server.model.neighbors import GraphBatch
from cace_server.model.potential import CACEPotential


def architecture(model: CACEPotential) -> str:
    """Everything of a model's configuration that fixes the shapes of its weights."""
    c = model.config
    return json.dumps(
        {
            "elements": list(c.elements),
            "n_atom_basis": c.n_atom_basis,
            "embed_receiver": c.embed_receiver,
            "n_rbf": c.n_rbf,
            "n_radial": c.n_radial,
            "max_l": c.max_l,
            "max_nu": c.max_nu,
            "symmetrizer_terms": c.symmetrizer_terms,
            "num_message_passing": c.num_message_passing,
            "readouts": [dataclasses.asdict(r) for r in c.readouts],
            "dtype": str(model.dtype),
        },
        sort_keys=True,
        default=str,
    )


class StackedMembers:
    """The node-level energy of M members of one architecture, with a member axis."""

    def __init__(self, members: Sequence[CACEPotential]) -> None:
        self.members = list(members)

    @classmethod
    def for_members(cls, members: Sequence[CACEPotential]) -> StackedMembers | None:
        """Members of one architecture without message passing, else None."""
        first = members[0]
        if first.config.num_message_passing or not first.representation.sums_per_element:
            return None
        if len({architecture(m) for m in members}) != 1:
            return None
        return cls(members)

    def energies(self, sums: torch.Tensor, batch: GraphBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """(energy [M, B] float64, atom energies [M, n]) from the members' neighbour
        sums [n, L, z, M * n_rbf] (member-major columns)."""
        members = self.members
        reps = [m.representation for m in members]
        first = members[0]
        rep = reps[0]
        m_count = len(members)
        n, n_l, nz, width = sums.shape
        n_rbf = width // m_count
        a = rep.n_atom_basis
        n_radial = first.config.n_radial
        # Each member's mixing weight per component: [M L, z r, r' (s, t)] (see
        # CACERepresentation._sender_mixing, of which this is the member-stacked form).
        mixing = torch.stack([r.radial_mixing for r in reps]).index_select(
            1, rep.group_of_component
        )
        sender = torch.stack([r.sender_embedding for r in reps])  # [M, z, a]
        weight = mixing.view(m_count, n_l, 1, n_rbf, n_radial, a, a) * sender.view(
            m_count, 1, nz, 1, 1, a, 1
        )
        weight = weight.reshape(m_count * n_l, nz * n_rbf, n_radial * a * a)
        x = sums.view(n, n_l, nz, m_count, n_rbf).permute(3, 1, 0, 2, 4)
        a_basis = torch.bmm(x.reshape(m_count * n_l, n, nz * n_rbf), weight)
        receivers = torch.stack([r.receiver_weights() for r in reps])  # [M, z, a]
        tiled = receivers.index_select(1, batch.species).repeat(1, 1, a)  # [M, n, (s, t)]
        a_basis = a_basis.view(m_count, n_l, n, n_radial, a * a) * tiled[:, None, :, None, :]
        # One symmetriser call over every member's columns, components first.
        columns = a_basis.transpose(0, 1).reshape(n_l, -1)
        b_basis = rep.symmetrizer.components_first(columns)
        features = (
            b_basis.view(-1, m_count, n, n_radial, a * a)
            .permute(1, 2, 3, 0, 4)
            .reshape(m_count, n, -1)
        )
        dtype = features.dtype
        atom_energy = torch.stack([m.atomic_energies.to(dtype) for m in members]).index_select(
            1, batch.species
        )
        for name, head_weight in first.energy_readouts.items():
            head_input = features
            if name in first.readout_inputs:
                extra = [
                    batch.inputs[k][None].expand(m_count, -1, -1)
                    for k in first.readout_inputs[name]
                ]
                head_input = torch.cat([features, *extra], dim=2)
            heads = [m.readouts[name] for m in members]
            contribution = stacked_readout(
                [h for h in heads if isinstance(h, AtomwiseReadout)], head_input
            )
            atom_energy = atom_energy + (
                contribution if head_weight == 1.0 else head_weight * contribution
            )
        energy = torch.zeros(
            m_count, batch.n_systems, dtype=torch.float64, device=atom_energy.device
        ).index_add(1, batch.system, atom_energy.to(torch.float64))
        return energy, atom_energy


def _stacked_linear(layers: Sequence[torch.nn.Linear], x: torch.Tensor) -> torch.Tensor:
    """x [M, n, in] through each member's own linear layer: [M, n, out]."""
    weight = torch.stack([layer.weight for layer in layers])  # [M, out, in]
    y = torch.bmm(x, weight.transpose(1, 2))
    if layers[0].bias is not None:
        y = y + torch.stack([layer.bias for layer in layers])[:, None, :]
    return y


def stacked_readout(heads: Sequence[AtomwiseReadout], x: torch.Tensor) -> torch.Tensor:
    """The members' ``AtomwiseReadout`` heads (one architecture) on x [M, n, in]."""
    first = heads[0]
    depth = len(first.mlp.layers)
    y = x
    for k in range(depth):
        y = _stacked_linear([_linear(h.mlp.layers[k]) for h in heads], y)
        if k < depth - 1:
            y = first.mlp.activation(y)
    if first.linear is not None:
        y = y + _stacked_linear([h.linear for h in heads if h.linear is not None], x)
    if first.scale != 1.0:
        y = y * first.scale
    return y.squeeze(-1) if y.shape[-1] == 1 else y


def _linear(module: torch.nn.Module) -> torch.nn.Linear:
    assert isinstance(module, torch.nn.Linear)
    return module
