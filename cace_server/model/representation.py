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
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch.utils.checkpoint import checkpoint

from cace_server.model.angular import AngularBasis, Symmetrizer, explicit_terms, l_slices
from cace_server.model.config import ModelConfig
from cace_server.model.edge_basis import FusedEdgeBasis
from cace_server.model.mlp import MLP
from cace_server.model.radial import BesselBasis, PolynomialCutoff

_log = logging.getLogger(__name__)

# CPU blocking, measured on water: blocks of 1,024 atoms for systems above 4,096.
CPU_ATOM_BLOCK = 1024
CPU_BLOCK_ABOVE = 4096


def _batched_mix(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """out[n, s, l, c, b] = sum_r x[n, r, l, c] w[r, s, c, b]  -> [n, s, l, c * b].

    The radial mixing is a matrix product per channel c. ``einsum`` hands it to
    ``bmm`` with the channel as an innermost-strided batch, which BLAS cannot take
    and runs ~10x slower; here each operand is made channel-major first.
    """
    n, r, n_l, c = x.shape
    s, b = w.shape[1], w.shape[3]
    xb = x.permute(3, 0, 2, 1).reshape(c, n * n_l, r)
    wb = w.permute(2, 0, 1, 3).reshape(c, r, s * b)
    out = torch.bmm(xb, wb).view(c, n, n_l, s, b)
    return out.permute(1, 3, 2, 0, 4).reshape(n, s, n_l, c * b)


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
        self.fused_edge_basis = FusedEdgeBasis(self.radial_basis, self.cutoff_fn, self.angular)
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

    def mix_radial(self, x: torch.Tensor) -> torch.Tensor:
        """Radial mixing of a full-channel A-like tensor [n, n_rbf, L, C]."""
        return torch.cat(
            [
                _batched_mix(x[:, :, s:e, :], self.radial_mixing[g][:, :, :, None])
                for g, (s, e) in enumerate(self.l_ranges)
            ],
            dim=2,
        )

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
        receivers: torch.Tensor,
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
    # Edges are laid out as [receiver, slot] (slot: the edge's position among its
    # receiver's edges, padded to the most neighbours of any receiver with dummy edges
    # beyond the cutoff, whose radial weight is exactly zero). Every neighbour sum is
    # then a batched matrix product per receiver, and a block of receivers is a slice
    # of rows, known on the host without reading anything back.
    #
    # Neighbour sums are products [b, small, slots] x [b, slots, L_g * n_rbf]: the
    # long (radial x angular) side is the output's row, which BLAS runs ~5x faster
    # than the transposed product on these shapes. The (radial x angular) edge tensor
    # is built per l group, so that no slice of one big edge tensor (whose backward
    # zero-fills the whole tensor per slice) is ever taken.

    def _features(
        self,
        vectors: torch.Tensor,
        species: torch.Tensor,
        receivers: torch.Tensor,
        senders: torch.Tensor,
        block: int | None,
        max_neighbors: int | None,
    ) -> torch.Tensor:
        """Layer by layer: node tensors (A, B, the senders' message factors) of the whole
        system, edge work by blocks of receivers that read the senders' node tensors.

        Unblocked, the edge basis is computed once for all layers; blocked, each block is
        recomputed from its edge vectors in the backward pass (activation checkpointing),
        so memory holds node tensors and one block of edge tensors. Without message
        passing the symmetriser runs inside the blocks too: only B is kept.
        """
        n = species.shape[0]
        n_edges = vectors.shape[0]
        if max_neighbors is None:
            counts = torch.bincount(receivers, minlength=n)
            max_neighbors = int(counts.max()) if n_edges else 0  # reads back from the device
        k = max(max_neighbors, 1)
        flat = self._slots(receivers, n, k)
        pad = torch.tensor([2.0 * self.cfg.cutoff, 0.0, 0.0], dtype=vectors.dtype)
        vec_pad = pad.to(vectors.device).expand(n * k, 3).index_copy(0, flat, vectors)
        send_pad = senders.new_zeros(n * k).index_copy(0, flat, senders)
        sender_emb = self.sender_embedding.index_select(0, species)  # [n, a]
        recv_emb = self.receiver_weights().index_select(0, species)  # [n, a]
        spans = [(0, n)] if block is None else [(s, min(s + block, n)) for s in range(0, n, block)]
        group_sizes = [e - s for s, e in self.l_ranges]
        # Per-block inputs are split off once, here: a slice taken inside a block would
        # have a backward that zero-fills the whole system's gradient per block (at
        # 98,304 atoms, 96 blocks x 112 MB for the edge vectors alone: 4.6 s per call).
        step = n if block is None else block
        vec_blocks = torch.split(vec_pad, step * k)
        recv_blocks = torch.split(recv_emb, step)

        def by_blocks(fn: Callable[[int, int], torch.Tensor]) -> torch.Tensor:
            """fn over blocks of receivers, each recomputed in the backward pass."""
            if block is None:
                return fn(0, n)
            return torch.cat([checkpoint(fn, a0, a1, use_reentrant=False) for a0, a1 in spans])

        edge_cache: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
        product_cache: dict[tuple[int, int], list[torch.Tensor]] = {}

        def edges(a0: int, a1: int) -> tuple[torch.Tensor, torch.Tensor]:
            """(radial * cutoff [b, k, n_rbf], angular [L, b, k]).

            Unblocked, computed once for all layers; blocked, per (checkpointed) call.
            """
            if (a0, a1) in edge_cache:
                return edge_cache[(a0, a1)]
            radial, angular = self.edge_basis(vec_blocks[a0 // step])
            out = (radial.view(a1 - a0, k, -1), angular.view(-1, a1 - a0, k))
            if block is None:
                edge_cache[(a0, a1)] = out
            return out

        def products(a0: int, a1: int) -> list[torch.Tensor]:
            """radial x angular per l group, [b, k, L_g * n_rbf] (l major)."""
            if (a0, a1) in product_cache:
                return product_cache[(a0, a1)]
            radial, angular = edges(a0, a1)
            xs = [
                (ang.permute(1, 2, 0)[:, :, :, None] * radial[:, :, None, :]).flatten(2)
                for ang in torch.split(angular, group_sizes)
            ]
            if block is None:
                product_cache[(a0, a1)] = xs
            return xs

        nz, a = self.sender_embedding.shape
        by_element = nz <= a
        # one_hot() would check the indices' range on the host: rows of an identity do not.
        identity = torch.eye(nz, dtype=vec_pad.dtype, device=vec_pad.device)
        sender_rows = identity.index_select(0, species) if by_element else sender_emb
        # The sums are per sender element (then the embedding maps them to channels, as
        # the reference does) or already per embedding channel.
        sender_map = (
            self.sender_embedding
            if by_element
            else torch.eye(a, dtype=vec_pad.dtype, device=vec_pad.device)
        )
        sender_weight = self._sender_mixing(sender_map)

        def first_a(a0: int, a1: int) -> torch.Tensor:
            """sum_j s_j (x) radial (x) angular, s_j the sender's one-hot element (fewer
            elements than embedding channels: the embedding is applied to the sums, as
            the reference does) or its embedding. s and the radial basis form one narrow
            per-edge factor [b, k, |s| * n_rbf], summed against the angular basis in
            one product."""
            radial, angular = edges(a0, a1)
            nb = radial.shape[0]
            s = sender_rows.index_select(0, send_pad[a0 * k : a1 * k]).view(nb, k, -1, 1)
            y = (s * radial[:, :, None, :]).flatten(2)
            a_sum = torch.bmm(angular.transpose(0, 1), y)  # [b, L, z * n_rbf]
            return self._embed_receivers(a_sum, recv_blocks[a0 // step], sender_weight)

        def symmetrized(
            fn: Callable[[int, int], torch.Tensor],
        ) -> Callable[[int, int], torch.Tensor]:
            """A block function returning A -> one returning B (A never leaves the block)."""
            return lambda a0, a1: self.symmetrizer(fn(a0, a1))

        if not self.layers:
            return by_blocks(symmetrized(first_a)).flatten(1)

        layers = [layer for layer in self.layers if isinstance(layer, MessagePassingLayer)]
        # A layer reads the previous A at node level for its memory term and its radial
        # message. An A that no layer reads lives only inside its block: the symmetriser
        # runs there and only B is kept (at l_max 3 a third of A), which is what bounds
        # memory at 98,304 atoms.
        reads_a = [layer.memory is not None or layer.ar_amplitude is not None for layer in layers]
        a_shape = (self.cfg.n_radial, self.angular.n_components, self.channels)

        a_feat: torch.Tensor | None = None
        if reads_a[0]:
            a_feat = by_blocks(first_a)
            b_feat = self.symmetrizer(a_feat)
        else:
            b_feat = by_blocks(symmetrized(first_a))
        features = [b_feat]
        groups = self.group_of_component
        for i, layer in enumerate(layers):
            # per l group or per block, split once (see vec_blocks)
            node_v = (
                self._bchi_node_factor(layer, b_feat, sender_emb).unbind(1) if layer.bchi else None
            )
            a_groups = a_blocks = None
            if a_feat is not None and layer.ar_amplitude is not None:
                a_groups = [t.contiguous() for t in torch.split(a_feat, group_sizes, dim=2)]
            if a_feat is not None and layer.memory is not None:
                a_blocks = torch.split(a_feat, step)

            def new_a_of(
                a0: int,
                a1: int,
                layer: MessagePassingLayer = layer,
                node_v: tuple[torch.Tensor, ...] | None = node_v,
                a_groups: list[torch.Tensor] | None = a_groups,
                a_blocks: tuple[torch.Tensor, ...] | None = a_blocks,
            ) -> torch.Tensor:
                """This layer's A of receivers a0:a1."""
                rows = send_pad[a0 * k : a1 * k]
                update: torch.Tensor | None = None
                if node_v is not None:
                    m = self._bchi_sum(products(a0, a1), node_v, rows)
                    # channel c = (a_send, a_recv): the receiver embedding tiled over a_send
                    recv_c = recv_blocks[a0 // step].repeat(1, self.n_atom_basis)
                    update = self.mix_radial(m * recv_c[:, None, None, :])
                if a_groups is not None:
                    vec = vec_blocks[a0 // step]
                    lengths = torch.linalg.vector_norm(vec, dim=-1, keepdim=True)
                    ar = self._radial_message(layer, a_groups, lengths, rows, a1 - a0, k)
                    update = ar if update is None else update + ar
                if update is None:
                    update = vec_pad.new_zeros(a1 - a0, *a_shape)
                new_a = update * self.mp_norm
                if a_blocks is not None and layer.memory is not None:
                    memory = layer.memory[groups].permute(1, 0, 2)
                    new_a = new_a + a_blocks[a0 // step] * memory
                return new_a

            if i + 1 < len(layers) and reads_a[i + 1]:
                a_feat = by_blocks(new_a_of)
                b_feat = self.symmetrizer(a_feat)
            else:
                a_feat = None
                b_feat = by_blocks(symmetrized(new_a_of))
            features.append(b_feat)
        return torch.stack(features, dim=-1).flatten(1)

    @staticmethod
    def _slots(receivers: torch.Tensor, n: int, k: int) -> torch.Tensor:
        """Row of each edge in the [receiver, slot] layout (edges sorted by receiver)."""
        counts = torch.bincount(receivers, minlength=n)
        starts = torch.cumsum(counts, 0) - counts
        slot = torch.arange(receivers.shape[0], device=receivers.device)
        return receivers * k + slot - starts.index_select(0, receivers)

    def _bchi_node_factor(
        self, layer: MessagePassingLayer, b_feat: torch.Tensor, send_emb: torch.Tensor
    ) -> torch.Tensor:
        """Sender factor of the B-chi message, [n, l groups, channels]: the sender's
        embedding times an MLP of its B features, one weight per l group."""
        assert layer.bchi is not None
        n = b_feat.shape[0]
        a = self.n_atom_basis
        n_groups = len(self.l_ranges)
        w = layer.bchi(b_feat.flatten(1)).view(n, layer.n_l_groups, layer.n_w_channels)
        w = w.expand(n, n_groups, self.channels).reshape(n, n_groups, a, a)
        return (send_emb[:, None, :, None] * w).reshape(n, n_groups, self.channels)

    def _bchi_sum(
        self, xs: list[torch.Tensor], node_v: tuple[torch.Tensor, ...], senders: torch.Tensor
    ) -> torch.Tensor:
        """m_i[n, l, c] = sum_(j->i) radial[n] angular[l] v_j[group(l), c]: [b, n_rbf, L, C].

        Per receiver and l group this is a product of two small matrices over its
        neighbour slots, v [C, slots] and (radial x angular) [slots, L_g * n_rbf];
        nothing over (radial x angular x channels) exists per edge.
        """
        nb, k, _ = xs[0].shape
        c = node_v[0].shape[1]
        parts = [
            torch.bmm(v.index_select(0, senders).view(nb, k, c).transpose(1, 2), x)
            for v, x in zip(node_v, xs, strict=True)
        ]
        m = torch.cat(parts, dim=2).view(nb, c, self.angular.n_components, self.cfg.n_rbf)
        return m.permute(0, 3, 2, 1)

    def _radial_chunk(
        self,
        a_groups: list[torch.Tensor],
        lengths: torch.Tensor,
        inv_r0: torch.Tensor,
        senders: torch.Tensor,
        k: int,
    ) -> torch.Tensor:
        """sum over slots of A_sender * f_cut * exp(-r / r0): [rows, r', L, C].

        The decay depends on l only through its group: it is computed per group
        ([edges, r', 1, C], a twentieth of the A size at l_max 3) and broadcast. The
        senders' A comes per group (``a_groups``, split once per layer) and the decay
        from parameter slices: no per-edge tensor is sliced (a slice's backward
        zero-fills the whole tensor per slice).
        """
        r = lengths.view(-1, 1, 1, 1)
        f_cut = self.cutoff_fn(r)
        parts = []
        for g, a_g in enumerate(a_groups):
            decay = torch.exp(-r * inv_r0[:, g : g + 1, :]) * f_cut  # [P, r', 1, C]
            a_send = a_g.index_select(0, senders)  # [P, r', L_g, C]
            parts.append((a_send * decay).view(-1, k, *a_g.shape[1:]).sum(1))
        return torch.cat(parts, dim=2)

    def _radial_message(
        self,
        layer: MessagePassingLayer,
        a_groups: list[torch.Tensor],
        lengths: torch.Tensor,
        senders: torch.Tensor,
        n_recv: int,
        k: int,
    ) -> torch.Tensor:
        """amp * sum_j A_j * exp(-r_ij / r0) * f_cut(r_ij), per (radial, l, channel).

        The decay differs per (radial, l group, channel), so this sum is elementwise
        per edge; chunks of receivers are recomputed in the backward pass, not stored.
        """
        assert layer.ar_amplitude is not None and layer.ar_inverse_range is not None
        groups = self.group_of_component
        amp = layer.ar_amplitude[groups].permute(1, 0, 2)  # [r', L, C]
        inv_r0 = layer.ar_inverse_range.permute(1, 0, 2)  # [r', G, C]
        rows = max(1, self.edge_chunk // k)
        if n_recv <= rows:
            # One chunk: nothing to bound, and recomputing it in the backward pass
            # (twice when training on forces) would only cost time.
            return self._radial_chunk(a_groups, lengths, inv_r0, senders, k) * amp
        parts = [
            checkpoint(
                self._radial_chunk,
                a_groups,
                lengths[s * k : min(s + rows, n_recv) * k],
                inv_r0,
                senders[s * k : min(s + rows, n_recv) * k],
                k,
                use_reentrant=False,
            )
            for s in range(0, n_recv, rows)
        ]
        return torch.cat(parts) * amp
