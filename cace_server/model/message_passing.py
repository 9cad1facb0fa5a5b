"""One CACE message-passing layer (Cheng, npj Comput. Mater. 10, 157 (2024), section
'message passing'): node memory, radial message and B-chi message, as a module that
owns its parameters and its forward, like MACE's ``InteractionBlock``.
"""

from __future__ import annotations

from functools import partial

import torch

from cace_server.model.angular import group_of_component, l_slices
from cace_server.model.blocks import ReceiverBlocks
from cace_server.model.config import ModelConfig
from cace_server.model.mlp import MLP
from cace_server.model.radial import PolynomialCutoff


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


def mix_radial(
    x: torch.Tensor, radial_mixing: torch.Tensor, l_ranges: list[tuple[int, int]]
) -> torch.Tensor:
    """Radial mixing W[l][n, n', c] of a full-channel A-like tensor [n, n_rbf, L, C]."""
    return torch.cat(
        [
            _batched_mix(x[:, :, s:e, :], radial_mixing[g][:, :, :, None])
            for g, (s, e) in enumerate(l_ranges)
        ],
        dim=2,
    )


class MessagePassingLayer(torch.nn.Module):
    """One CACE message-passing layer: node memory, radial message, B-chi message.

    Like MACE's ``InteractionBlock`` it owns its parameters and its forward, which
    turns the previous layer's A and B into this layer's. The radial mixing it
    applies to the B-chi message is the representation's, shared with the first A.
    """

    memory: torch.nn.Parameter | None
    ar_amplitude: torch.nn.Parameter | None
    ar_inverse_range: torch.nn.Parameter | None
    group_of_component: torch.Tensor

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
        self.n_atom_basis = cfg.n_atom_basis
        self.channels = channels
        self.n_rbf = cfg.n_rbf
        self.n_radial = cfg.n_radial
        self.l_ranges = l_slices(cfg.max_l)
        self.group_sizes = [e - s for s, e in self.l_ranges]
        self.n_components = self.l_ranges[-1][1]
        # the original's stored factor where the config has it (no round trip via 1/m^2)
        self.mp_norm = (
            cfg.mp_norm_factor
            if cfg.mp_norm_factor is not None
            else 1.0 / cfg.avg_num_neighbors**0.5
        )
        self.cutoff_fn = PolynomialCutoff(cfg.cutoff, cfg.cutoff_p)
        groups = group_of_component(self.l_ranges)
        self.register_buffer("group_of_component", groups, persistent=False)

    @property
    def reads_a(self) -> bool:
        """Whether the layer reads the previous A at node level (memory, radial message)."""
        return self.memory is not None or self.ar_amplitude is not None

    def forward(
        self,
        a_prev: torch.Tensor | None,
        b_prev: torch.Tensor,
        sender_emb: torch.Tensor,
        blocks: ReceiverBlocks,
        radial_mixing: torch.Tensor,
        keep_a: bool,
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(A if ``keep_a`` else None, B) of this layer for the whole system.

        ``a_prev``: the previous layer's A [n, n_radial, L, C], needed when ``reads_a``
        (else None); ``b_prev``: its B; ``sender_emb``: [n, a]. The node factors are
        made once here, the edge work by blocks of receivers.
        """
        # per l group or per block, split once (see ReceiverBlocks)
        node_v = self._bchi_node_factor(b_prev, sender_emb).unbind(1) if self.bchi else None
        a_groups = a_blocks = None
        if a_prev is not None and self.ar_amplitude is not None:
            a_groups = [t.contiguous() for t in torch.split(a_prev, self.group_sizes, dim=2)]
        if a_prev is not None and self.memory is not None:
            a_blocks = blocks.split(a_prev)
        new_a = partial(self._new_a, blocks, radial_mixing, node_v, a_groups, a_blocks)
        return blocks.a_and_b(new_a, keep_a)

    def _new_a(
        self,
        blocks: ReceiverBlocks,
        radial_mixing: torch.Tensor,
        node_v: tuple[torch.Tensor, ...] | None,
        a_groups: list[torch.Tensor] | None,
        a_blocks: tuple[torch.Tensor, ...] | None,
        a0: int,
        a1: int,
    ) -> torch.Tensor:
        """This layer's A of receivers a0:a1."""
        rows = blocks.edge_senders(a0, a1)
        update: torch.Tensor | None = None
        if node_v is not None:
            m = self._bchi_sum(blocks.products(a0, a1), node_v, rows)
            # channel c = (a_send, a_recv): the receiver embedding tiled over a_send
            recv_c = blocks.receiver_emb(a0).repeat(1, self.n_atom_basis)
            update = mix_radial(m * recv_c[:, None, None, :], radial_mixing, self.l_ranges)
        if a_groups is not None:
            vec = blocks.edge_vectors(a0)
            lengths = torch.linalg.vector_norm(vec, dim=-1, keepdim=True)
            ar = self._radial_message(a_groups, lengths, rows, blocks)
            update = ar if update is None else update + ar
        if update is None:
            shape = (a1 - a0, self.n_radial, self.n_components, self.channels)
            update = blocks.vectors.new_zeros(shape)
        new_a = update * self.mp_norm
        if a_blocks is not None and self.memory is not None:
            memory = self.memory[self.group_of_component].permute(1, 0, 2)
            new_a = new_a + blocks.block_of(a_blocks, a0) * memory
        return new_a

    def _bchi_node_factor(self, b_feat: torch.Tensor, send_emb: torch.Tensor) -> torch.Tensor:
        """Sender factor of the B-chi message, [n, l groups, channels]: the sender's
        embedding times an MLP of its B features, one weight per l group."""
        assert self.bchi is not None
        n = b_feat.shape[0]
        a = self.n_atom_basis
        n_groups = len(self.l_ranges)
        w = self.bchi(b_feat.flatten(1)).view(n, self.n_l_groups, self.n_w_channels)
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
        m = torch.cat(parts, dim=2).view(nb, c, self.n_components, self.n_rbf)
        return m.permute(0, 3, 2, 1)

    def _radial_chunk(
        self,
        a_groups: list[torch.Tensor],
        inv_r0: torch.Tensor,
        k: int,
        lengths: torch.Tensor,
        senders: torch.Tensor,
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
        a_groups: list[torch.Tensor],
        lengths: torch.Tensor,
        senders: torch.Tensor,
        blocks: ReceiverBlocks,
    ) -> torch.Tensor:
        """amp * sum_j A_j * exp(-r_ij / r0) * f_cut(r_ij), per (radial, l, channel).

        The decay differs per (radial, l group, channel), so this sum is elementwise
        per edge; it runs by edge chunks (``ReceiverBlocks.by_edge_chunks``).
        """
        assert self.ar_amplitude is not None and self.ar_inverse_range is not None
        amp = self.ar_amplitude[self.group_of_component].permute(1, 0, 2)  # [r', L, C]
        inv_r0 = self.ar_inverse_range.permute(1, 0, 2)  # [r', G, C]
        chunk = partial(self._radial_chunk, a_groups, inv_r0, blocks.k)
        return blocks.by_edge_chunks(chunk, lengths, senders) * amp
