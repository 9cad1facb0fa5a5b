"""The CACE atomic representation (Cheng, npj Comput. Mater. 10, 157 (2024)).

Per edge j -> i the reference builds the full product
    radial(r_ij)[n] * angular(u_ij)[l] * (e_send[z_j] (x) e_recv[z_i])[c]
as one [edges, radial, angular, channels] tensor and sums it over neighbours. The
receiver embedding and the radial mixing do not depend on j, so we pull them out of
the neighbour sum: the sum only accumulates radial (x) angular per sender element
(or per sender embedding channel, whichever is smaller), and the channels are
formed per atom afterwards. Models without message passing are local, so large
systems are evaluated in blocks of atoms whose intermediates are recomputed during
the backward pass instead of stored (activation checkpointing), which keeps memory
proportional to the block, not to the system.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from cace_server.model.angular import AngularBasis, Symmetrizer, explicit_terms, l_slices
from cace_server.model.config import ModelConfig
from cace_server.model.mlp import MLP
from cace_server.model.radial import BesselBasis, PolynomialCutoff

# Unit vectors are v / (|v| + eps), as in the reference.
_NORM_EPS = 1e-9


def scatter_outer(
    index: torch.Tensor, n_out: int, left: torch.Tensor, right: torch.Tensor, chunk: int
) -> torch.Tensor:
    """out[index[e]] += left[e] (x) right[e], in chunks of edges.

    left: [E, P], right: [E, Q] -> [n_out, P, Q]. Only one chunk of the [E, P, Q]
    product exists at a time; autograd keeps the factors, not the products.
    """
    n_edges, p = left.shape
    q = right.shape[1]
    out = left.new_zeros(n_out, p * q)
    for start in range(0, max(n_edges, 1), chunk):
        stop = min(start + chunk, n_edges)
        if stop <= start:
            break
        prod = left[start:stop, :, None] * right[start:stop, None, :]
        out = out.index_add(0, index[start:stop], prod.reshape(stop - start, p * q))
    return out.view(n_out, p, q)


class MessagePassingLayer(torch.nn.Module):
    """One CACE message-passing layer: node memory, radial message, B-chi message."""

    memory: torch.nn.Parameter | None
    ar_amplitude: torch.nn.Parameter | None
    ar_inverse_range: torch.nn.Parameter | None

    def __init__(self, cfg: ModelConfig, n_invariants: int) -> None:
        super().__init__()
        mp = cfg.message_passing
        n_groups = cfg.max_l + 1
        channels = cfg.n_atom_basis**2
        shape = (n_groups, cfg.n_radial, channels)
        self.memory = torch.nn.Parameter(torch.full(shape, 0.25)) if mp.memory else None
        if mp.radial:
            self.ar_amplitude = torch.nn.Parameter(torch.rand(shape))
            self.ar_inverse_range = torch.nn.Parameter((torch.rand(shape) + 0.5) / cfg.cutoff)
        else:
            self.ar_amplitude = None
            self.ar_inverse_range = None
        self.n_l_groups = 1 if mp.bchi_shared_l else n_groups
        self.n_w_channels = 1 if mp.bchi_shared_channels else channels
        self.bchi = (
            MLP(
                cfg.n_radial * n_invariants * channels,
                [*mp.bchi_hidden, self.n_l_groups * self.n_w_channels],
                mp.bchi_activation,
                bias=True,
            )
            if mp.bchi
            else None
        )


class CACERepresentation(torch.nn.Module):
    """Node features [n_atoms, n_radial * n_invariants * channels * (layers + 1)]."""

    receiver_embedding: torch.nn.Parameter | None
    group_of_component: torch.Tensor

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        nz = len(cfg.elements)
        a = cfg.n_atom_basis
        self.n_atom_basis = a
        self.channels = a * a
        self.sender_embedding = torch.nn.Parameter(torch.empty(nz, a))
        torch.nn.init.xavier_uniform_(self.sender_embedding)
        if cfg.embed_receiver:
            self.receiver_embedding = torch.nn.Parameter(torch.empty(nz, a))
            torch.nn.init.xavier_uniform_(self.receiver_embedding)
        else:
            self.register_parameter("receiver_embedding", None)
        self.radial_basis = BesselBasis(cfg.cutoff, cfg.n_rbf, trainable=cfg.trainable_rbf)
        self.cutoff_fn = PolynomialCutoff(cfg.cutoff, cfg.cutoff_p)
        self.angular = AngularBasis(cfg.max_l)
        # W[l][n, n', c]: mixes radial channels per angular order and edge channel.
        self.radial_mixing = torch.nn.Parameter(
            torch.rand(cfg.max_l + 1, cfg.n_rbf, cfg.n_radial, self.channels)
        )
        self.symmetrizer = Symmetrizer(cfg.max_l, cfg.max_nu, explicit_terms(cfg.symmetrizer_terms))
        self.layers = torch.nn.ModuleList(
            MessagePassingLayer(cfg, self.symmetrizer.n_out) for _ in range(cfg.num_message_passing)
        )
        self.mp_norm = 1.0 / cfg.avg_num_neighbors**0.5
        self.l_ranges = l_slices(cfg.max_l)
        group_of_component = torch.cat(
            [torch.full((e - s,), g, dtype=torch.long) for g, (s, e) in enumerate(self.l_ranges)]
        )
        self.register_buffer("group_of_component", group_of_component, persistent=False)
        # Bound on the [edges x radial x angular] scratch of one neighbour-sum chunk.
        self.edge_chunk = 32768
        # Local models evaluate systems above ``block_above`` atoms in blocks of
        # ``atom_block`` atoms, recomputing each block in the backward pass: memory
        # stays bounded at the price of a second forward. Below it, one pass.
        self.atom_block: int | None = 1024
        self.block_above = 4096

    @property
    def n_features(self) -> int:
        return (
            self.cfg.n_radial
            * self.symmetrizer.n_out
            * self.channels
            * (self.cfg.num_message_passing + 1)
        )

    def receiver_weights(self) -> torch.Tensor:
        if self.receiver_embedding is None:
            return self.sender_embedding
        return self.receiver_embedding

    # -- edge quantities ---------------------------------------------------------------
    def edge_basis(self, vectors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> (radial * cutoff [E, n_rbf], angular [E, L], lengths [E, 1])."""
        lengths = torch.linalg.vector_norm(vectors, dim=-1, keepdim=True)
        unit = vectors / (lengths + _NORM_EPS)
        radial = self.radial_basis(lengths) * self.cutoff_fn(lengths)
        return radial, self.angular(unit), lengths

    # -- A basis -------------------------------------------------------------------------
    def first_a_basis(
        self,
        radial: torch.Tensor,
        angular: torch.Tensor,
        receivers: torch.Tensor,
        sender_species: torch.Tensor,
        receiver_species: torch.Tensor,
    ) -> torch.Tensor:
        """Sum over neighbours, then radial mixing: [n, n_radial, L, channels]."""
        n = receiver_species.shape[0]
        nz = self.sender_embedding.shape[0]
        a = self.n_atom_basis
        n_rbf, n_l = radial.shape[1], angular.shape[1]
        if nz <= a:
            # Accumulate per (receiver, sender element); embed afterwards.
            per_element = scatter_outer(
                receivers * nz + sender_species, n * nz, radial, angular, self.edge_chunk
            ).view(n, nz, n_rbf, n_l)
            a0 = torch.einsum("nzrl,za->nrla", per_element, self.sender_embedding)
        else:
            emb = self.sender_embedding.index_select(0, sender_species)  # [E, a]
            ra = (radial[:, :, None] * emb[:, None, :]).reshape(-1, n_rbf * a)
            a0 = scatter_outer(receivers, n, ra, angular, self.edge_chunk)
            a0 = a0.view(n, n_rbf, a, n_l).permute(0, 1, 3, 2)
        recv = self.receiver_weights().index_select(0, receiver_species)  # [n, a]
        mixed = []
        for g, (s, e) in enumerate(self.l_ranges):
            w = self.radial_mixing[g].view(n_rbf, -1, a, a)  # [r, r', a_send, a_recv]
            out = torch.einsum("nrla,rsab->nslab", a0[:, :, s:e, :], w)
            mixed.append(out * recv[:, None, None, None, :])
        return torch.cat(mixed, dim=2).flatten(3)

    def mix_radial(self, x: torch.Tensor) -> torch.Tensor:
        """Radial mixing of a full-channel A-like tensor [n, n_rbf, L, C]."""
        return torch.cat(
            [
                torch.einsum("nrlc,rsc->nslc", x[:, :, s:e, :], self.radial_mixing[g])
                for g, (s, e) in enumerate(self.l_ranges)
            ],
            dim=2,
        )

    # -- local (no message passing) path ---------------------------------------------------
    def _local_block(
        self,
        vectors: torch.Tensor,
        receivers: torch.Tensor,
        sender_species: torch.Tensor,
        receiver_species: torch.Tensor,
    ) -> torch.Tensor:
        radial, angular, _ = self.edge_basis(vectors)
        a = self.first_a_basis(radial, angular, receivers, sender_species, receiver_species)
        return self.symmetrizer(a).flatten(1)

    def forward(
        self,
        vectors: torch.Tensor,
        species: torch.Tensor,
        receivers: torch.Tensor,
        senders: torch.Tensor,
    ) -> torch.Tensor:
        sender_species = species[senders]
        if not self.layers:
            return self._local_features(vectors, species, receivers, sender_species)
        return self._message_passing_features(vectors, species, receivers, senders, sender_species)

    def _local_features(
        self,
        vectors: torch.Tensor,
        species: torch.Tensor,
        receivers: torch.Tensor,
        sender_species: torch.Tensor,
    ) -> torch.Tensor:
        n = species.shape[0]
        block = self.atom_block
        if block is None or n <= max(block, self.block_above):
            return self._local_block(vectors, receivers, sender_species, species)
        # Edges are sorted by receiver: each block of atoms owns one slice of edges.
        bounds = torch.arange(0, n + block, block, device=species.device).clamp(max=n)
        edge_bounds = torch.searchsorted(receivers, bounds).tolist()
        atom_bounds = bounds.tolist()
        blocks = []
        for k in range(len(atom_bounds) - 1):
            a0, a1 = atom_bounds[k], atom_bounds[k + 1]
            e0, e1 = edge_bounds[k], edge_bounds[k + 1]
            if a1 <= a0:
                continue
            blocks.append(
                checkpoint(
                    self._local_block,
                    vectors[e0:e1],
                    receivers[e0:e1] - a0,
                    sender_species[e0:e1],
                    species[a0:a1],
                    use_reentrant=False,
                )
            )
        return torch.cat(blocks, dim=0)

    # -- message passing path ---------------------------------------------------------------
    def _message_passing_features(
        self,
        vectors: torch.Tensor,
        species: torch.Tensor,
        receivers: torch.Tensor,
        senders: torch.Tensor,
        sender_species: torch.Tensor,
    ) -> torch.Tensor:
        n = species.shape[0]
        radial, angular, lengths = self.edge_basis(vectors)
        cutoff = self.cutoff_fn(lengths)  # [E, 1]
        a_feat = self.first_a_basis(radial, angular, receivers, sender_species, species)
        b_feat = self.symmetrizer(a_feat)
        features = [b_feat]
        groups = self.group_of_component
        n_l = angular.shape[1]
        c = self.channels
        send_emb = self.sender_embedding[species]  # [n, a] per node (as sender)
        recv_emb = self.receiver_weights()[species]  # [n, a] per node (as receiver)
        for layer in self.layers:
            assert isinstance(layer, MessagePassingLayer)
            update = a_feat.new_zeros(a_feat.shape)
            if layer.bchi is not None:
                w = layer.bchi(b_feat.flatten(1)).view(n, layer.n_l_groups, layer.n_w_channels)
                if layer.n_l_groups > 1:
                    w = w[:, groups, :]  # same weight for every component of an l
                w = w.expand(n, n_l, c).reshape(n, n_l, self.n_atom_basis, self.n_atom_basis)
                v = send_emb[:, None, :, None] * w  # [n, L, a_send, a_recv]
                per_edge = angular[:, :, None] * v.reshape(n, n_l, c)[senders]  # [E, L, C]
                m = scatter_outer(
                    receivers, n, radial, per_edge.reshape(-1, n_l * c), self.edge_chunk
                ).view(n, radial.shape[1], n_l, self.n_atom_basis, self.n_atom_basis)
                m = (m * recv_emb[:, None, None, None, :]).flatten(3)
                update = update + self.mix_radial(m)
            if layer.ar_amplitude is not None and layer.ar_inverse_range is not None:
                amp = layer.ar_amplitude[groups].permute(1, 0, 2)  # [r', L, C]
                inv_r0 = layer.ar_inverse_range[groups].permute(1, 0, 2)
                update = update + self._radial_message(
                    a_feat, lengths, cutoff, amp, inv_r0, receivers, senders
                )
            new_a = update * self.mp_norm
            if layer.memory is not None:
                new_a = new_a + a_feat * layer.memory[groups].permute(1, 0, 2)
            a_feat = new_a
            b_feat = self.symmetrizer(a_feat)
            features.append(b_feat)
        return torch.stack(features, dim=-1).flatten(1)

    def _radial_message(
        self,
        a_feat: torch.Tensor,
        lengths: torch.Tensor,
        cutoff: torch.Tensor,
        amp: torch.Tensor,
        inv_r0: torch.Tensor,
        receivers: torch.Tensor,
        senders: torch.Tensor,
    ) -> torch.Tensor:
        """sum_j A_j * amp * exp(-r_ij / r0) * f_cut(r_ij), per (radial, l, channel)."""
        n = a_feat.shape[0]
        out = a_feat.new_zeros(n, a_feat[0].numel())
        n_edges = lengths.shape[0]
        for start in range(0, n_edges, self.edge_chunk):
            stop = min(start + self.edge_chunk, n_edges)
            r = lengths[start:stop].view(-1, 1, 1, 1)
            decay = torch.exp(-r * inv_r0) * amp * cutoff[start:stop].view(-1, 1, 1, 1)
            msg = a_feat[senders[start:stop]] * decay
            out = out.index_add(0, receivers[start:stop], msg.flatten(1))
        return out.view(a_feat.shape)
