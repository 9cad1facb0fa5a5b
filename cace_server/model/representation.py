"""The CACE atomic representation (Cheng, npj Comput. Mater. 10, 157 (2024)).

Per edge j -> i the reference builds the full product
    radial(r_ij)[n] * angular(u_ij)[l] * (e_send[z_j] (x) e_recv[z_i])[c]
as one [edges, radial, angular, channels] tensor and sums it over neighbours. The
receiver embedding and the radial mixing do not depend on j, so we pull them out of
the neighbour sum: the sum only accumulates radial (x) angular per sender element
(or per sender embedding channel, whichever is smaller), and the channels are
formed per atom afterwards. Large systems are evaluated in blocks of receiving
atoms whose edge intermediates are recomputed during the backward pass instead of
stored (activation checkpointing); message-passing layers read the senders' node
tensors of the whole system, so memory is the node tensors plus one block.

:class:`CACERepresentation` computes the first A basis and calls its
:class:`~cace_server.model.message_passing.MessagePassingLayer` modules in order, each
of which computes one layer's update from the previous layer's A and B; the edge
work of both runs by blocks of :class:`~cace_server.model.blocks.ReceiverBlocks`.
"""

from __future__ import annotations

import logging
from functools import partial

import torch

from cace_server.model.angular import (
    AngularBasis,
    Symmetrizer,
    explicit_terms,
    group_of_component,
    l_slices,
)
from cace_server.model.blocks import BlockFn, ReceiverBlocks
from cace_server.model.config import ModelConfig
from cace_server.model.edge_basis import FusedEdgeBasis
from cace_server.model.message_passing import MessagePassingLayer
from cace_server.model.radial import BesselBasis, PolynomialCutoff

_log = logging.getLogger(__name__)

# CPU blocking, measured on water: blocks of 1,024 atoms for systems above 4,096.
CPU_ATOM_BLOCK = 1024
CPU_BLOCK_ABOVE = 4096


def sum_over_neighbours(
    radial: torch.Tensor, angular: torch.Tensor, rows: torch.Tensor
) -> torch.Tensor:
    """sum over each receiver's k edge slots of s (x) radial (x) angular.

    radial [b, k, W], angular [L, b, k], rows: each edge's sender row s [b * k, S]
    -> [b, L, S * W]: one batched matrix product per receiver.
    """
    nb, k = radial.shape[0], radial.shape[1]
    y = (rows.view(nb, k, -1, 1) * radial[:, :, None, :]).flatten(2)
    return torch.bmm(angular.transpose(0, 1), y)


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
        envelope = cfg.cutoff if cfg.envelope_cutoff is None else cfg.envelope_cutoff
        self.cutoff_fn = PolynomialCutoff(envelope, cfg.cutoff_p)
        self.angular = AngularBasis(cfg.max_l)
        self.fused_edge_basis = FusedEdgeBasis(self.radial_basis, self.cutoff_fn, self.angular)
        # W[l][n, n', c]: mixes radial channels per angular order and edge channel.
        self.radial_mixing = torch.nn.Parameter(
            torch.rand(cfg.max_l + 1, cfg.n_rbf, cfg.n_radial, self.channels)
        )
        self.symmetrizer = Symmetrizer(cfg.max_l, cfg.max_nu, explicit_terms(cfg.symmetrizer_terms))
        self.layers = torch.nn.ModuleList(
            MessagePassingLayer(cfg, self.symmetrizer.n_out) for _ in range(cfg.num_message_passing)
        )
        self.l_ranges = l_slices(cfg.max_l)
        self.register_buffer(
            "group_of_component", group_of_component(self.l_ranges), persistent=False
        )
        # Edges per chunk of the radial message's [edges, r', L, C] products.
        self.edge_chunk = 32768
        # Systems above ``block_above`` atoms are evaluated in blocks of ``atom_block``
        # atoms, recomputing each block in the backward pass: memory stays bounded at
        # the price of a second forward. None: chosen per device (block_size).
        self.atom_block: int | None = None
        self.block_above: int | None = None

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
    def edge_basis(self, vectors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (radial * cutoff [E, n_rbf], angular [L, E] (components first))."""
        return self.fused_edge_basis(vectors)  # type: ignore[no-any-return]

    # -- A basis -------------------------------------------------------------------------
    def _sender_mixing(self, sender_map: torch.Tensor) -> torch.Tensor:
        """[L, z * n_rbf, n_radial * C]: the map from a neighbour sum's sender index z to
        the sender embedding channel s, and the radial mixing W[g(l), r, r', (s, t)] of
        each component's l group, as one weight per component."""
        n_l, a = self.angular.n_components, self.n_atom_basis
        w = self.radial_mixing.index_select(0, self.group_of_component)  # [L, r, r', C]
        n_rbf, n_radial = w.shape[1], w.shape[2]
        w = w.view(n_l, 1, n_rbf, n_radial, a, a) * sender_map.view(1, -1, 1, 1, a, 1)
        return w.reshape(n_l, -1, n_radial * a * a)

    def _embed_receivers(
        self, a_sum: torch.Tensor, recv: torch.Tensor, weight: torch.Tensor
    ) -> torch.Tensor:
        """Neighbour sums [n, L, z * n_rbf] -> A [n, n_radial, L, a * a].

        A[n, r', l, (s, t)] = sum_{z, r} a_sum[n, l, (z, r)] weight[l, (z, r), (r', s, t)]
        recv[n, t]: one matrix product per component (see ``_sender_mixing``). A is
        returned as a view of a components-first [L, n, n_radial, a * a] tensor, the
        layout in which the symmetriser reads it (no copy there).
        """
        n, n_l = a_sum.shape[0], a_sum.shape[1]
        a = self.n_atom_basis
        x = a_sum.transpose(0, 1).reshape(n_l, n, -1)
        out = torch.bmm(x, weight).view(n_l, n, self.cfg.n_radial, a * a)
        # channel c = (s, t): the receiver embedding tiled over s
        out = out * recv.repeat(1, a)[None, :, None, :]
        return out.permute(1, 2, 0, 3)

    def _first_a_of(
        self, blocks: ReceiverBlocks, species: torch.Tensor, sender_emb: torch.Tensor
    ) -> BlockFn:
        """The block function of the first A. The neighbour sums are per sender element
        (fewer elements than embedding channels: the embedding is applied to the sums,
        as the reference does) or already per embedding channel."""
        nz, a = self.sender_embedding.shape
        dtype, device = blocks.vectors.dtype, blocks.vectors.device
        sender_map: torch.Tensor
        if self.sums_per_element:
            # one_hot() would check the indices' range on the host: rows of an identity do not.
            identity = torch.eye(nz, dtype=dtype, device=device)
            sender_rows = identity.index_select(0, species)
            sender_map = self.sender_embedding
        else:
            sender_rows = sender_emb
            sender_map = torch.eye(a, dtype=dtype, device=device)
        sender_weight = self._sender_mixing(sender_map)
        return partial(self._first_a, blocks, sender_rows, sender_weight)

    def _first_a(
        self,
        blocks: ReceiverBlocks,
        sender_rows: torch.Tensor,
        sender_weight: torch.Tensor,
        a0: int,
        a1: int,
    ) -> torch.Tensor:
        """A of receivers a0:a1: sum_j s_j (x) radial (x) angular, s_j the sender's row
        (one-hot element or embedding). s and the radial basis form one narrow per-edge
        factor [b, k, |s| * n_rbf], summed against the angular basis in one product."""
        a_sum = self.neighbour_sums(blocks, sender_rows, a0, a1)
        return self._embed_receivers(a_sum, blocks.receiver_emb(a0), sender_weight)

    @staticmethod
    def neighbour_sums(
        blocks: ReceiverBlocks, sender_rows: torch.Tensor, a0: int, a1: int
    ) -> torch.Tensor:
        """sum_j s_j (x) radial (x) angular of receivers a0:a1, [b, L, |s| * n_rbf].

        With one-hot element rows for s, nothing here depends on trained weights
        beyond the edge basis, so models sharing that basis share these sums.
        """
        radial, angular = blocks.edge_basis(a0, a1)
        rows = sender_rows.index_select(0, blocks.edge_senders(a0, a1))
        return sum_over_neighbours(radial, angular, rows)

    @property
    def sums_per_element(self) -> bool:
        """Whether the first neighbour sums run per sender element (one-hot rows), the
        embedding being applied afterwards (fewer elements than embedding channels)."""
        nz, a = self.sender_embedding.shape
        return bool(nz <= a)

    def features_from_sums(self, a_sum: torch.Tensor, species: torch.Tensor) -> torch.Tensor:
        """Node features of a model without message passing from its per-element
        neighbour sums [n, L, z * n_rbf] (see ``neighbour_sums``)."""
        assert self.sums_per_element and not self.layers
        weight = self._sender_mixing(self.sender_embedding)
        recv = self.receiver_weights().index_select(0, species)
        return self.symmetrizer(self._embed_receivers(a_sum, recv, weight)).flatten(1)

    # -- blocking ----------------------------------------------------------------------------
    def block_size(self, n_atoms: int, device: torch.device) -> int | None:
        """Atoms per block for a system of ``n_atoms`` on ``device``; None: one pass.

        Decided from host-side sizes only, so that an unblocked call never waits on
        the device. CPU: blocks of 1,024 atoms above 4,096 (measured: big tensors
        only fall out of cache). Other devices: one pass unless sizes are set; an
        out-of-memory error falls back to blocks sized from the free memory.
        """
        block, above = self.atom_block, self.block_above
        if device.type == "cpu":
            block = CPU_ATOM_BLOCK if block is None else block
            above = CPU_BLOCK_ABOVE if above is None else above
        elif block is None:
            return None
        above = 0 if above is None else above
        return None if n_atoms <= max(block, above) else block

    def _fallback_block(self, n_atoms: int, n_edges: int, device: torch.device) -> int:
        """Block size after an out-of-memory error: a quarter of the free memory per block."""
        free, _ = torch.cuda.mem_get_info(device)
        itemsize = self.radial_mixing.element_size()
        per_edge = itemsize * self.cfg.n_rbf * self.angular.n_components * 4
        per_atom = itemsize * self.cfg.n_radial * self.angular.n_components * self.channels * 8
        per_atom_total = per_atom + per_edge * max(n_edges, 1) / max(n_atoms, 1)
        return max(64, int(free / 4 / per_atom_total))

    def forward(
        self,
        vectors: torch.Tensor,
        species: torch.Tensor,
        receivers: torch.Tensor | None,
        senders: torch.Tensor,
        max_neighbors: int | None = None,
    ) -> torch.Tensor:
        """Node features. ``max_neighbors`` (most edges of one receiver), when the caller
        knows it on the host, spares message passing a read-back from the device."""
        n = species.shape[0]
        block = self.block_size(n, species.device)
        if block is None and species.device.type == "cuda":
            try:
                return self._features(vectors, species, receivers, senders, None, max_neighbors)
            except torch.cuda.OutOfMemoryError:
                block = self._fallback_block(n, vectors.shape[0], species.device)
                _log.warning("out of memory for %d atoms in one pass; blocks of %d", n, block)
        return self._features(vectors, species, receivers, senders, block, max_neighbors)

    # -- features ----------------------------------------------------------------------------
    def receiver_blocks(
        self,
        vectors: torch.Tensor,
        species: torch.Tensor,
        receivers: torch.Tensor | None,
        senders: torch.Tensor,
        block: int | None,
        max_neighbors: int | None,
    ) -> ReceiverBlocks:
        """The call's edges as blocks of receivers, with this model's edge basis."""
        return ReceiverBlocks(
            vectors,
            receivers,
            senders,
            self.receiver_weights().index_select(0, species),
            block=block,
            max_neighbors=max_neighbors,
            cutoff=self.cfg.cutoff,
            edge_basis=self.edge_basis,
            symmetrizer=self.symmetrizer,
            group_sizes=[e - s for s, e in self.l_ranges],
            edge_chunk=self.edge_chunk,
        )

    def _features(
        self,
        vectors: torch.Tensor,
        species: torch.Tensor,
        receivers: torch.Tensor | None,
        senders: torch.Tensor,
        block: int | None,
        max_neighbors: int | None,
    ) -> torch.Tensor:
        """Layer by layer: node tensors (A, B, the senders' message factors) of the whole
        system, edge work by blocks of receivers (``ReceiverBlocks``) that read the
        senders' node tensors. An A is kept at node level only when the next layer
        reads it; otherwise the symmetriser runs inside the blocks and only B is kept.
        """
        sender_emb = self.sender_embedding.index_select(0, species)  # [n, a]
        blocks = self.receiver_blocks(vectors, species, receivers, senders, block, max_neighbors)
        first_a = self._first_a_of(blocks, species, sender_emb)
        layers = [layer for layer in self.layers if isinstance(layer, MessagePassingLayer)]
        if not layers:
            return blocks.run(first_a, symmetrized=True).flatten(1)
        keep_a = [layer.reads_a for layer in layers] + [False]
        a_feat, b_feat = blocks.a_and_b(first_a, keep_a[0])
        features = [b_feat]
        for layer, keep in zip(layers, keep_a[1:], strict=True):
            a_feat, b_feat = layer(a_feat, b_feat, sender_emb, blocks, self.radial_mixing, keep)
            features.append(b_feat)
        return torch.stack(features, dim=-1).flatten(1)
