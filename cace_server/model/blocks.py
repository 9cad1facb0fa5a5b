"""One call's system as blocks of receiving atoms: the one place that blocks, chunks
and checkpoints the edge work of the representation (the first A basis and every
message-passing layer).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from functools import partial
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint

from cace_server.model.angular import Symmetrizer

# A function of a span of receivers [a0, a1) -> their rows of a node tensor.
BlockFn = Callable[[int, int], torch.Tensor]


def _slots(receivers: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """Row of each edge in the [receiver, slot] layout (edges sorted by receiver)."""
    counts = torch.bincount(receivers, minlength=n)
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.arange(receivers.shape[0], device=receivers.device)
    return receivers * k + slot - starts.index_select(0, receivers)


def _recomputed(fn: Callable[..., torch.Tensor], calls: Iterable[tuple[Any, ...]]) -> torch.Tensor:
    """fn(*args) for each args, concatenated; each call is recomputed in the backward
    pass instead of storing its intermediates (activation checkpointing)."""
    return torch.cat([checkpoint(fn, *args, use_reentrant=False) for args in calls])


def _then(
    after: Callable[[torch.Tensor], torch.Tensor], fn: BlockFn, a0: int, a1: int
) -> torch.Tensor:
    return after(fn(a0, a1))


class ReceiverBlocks:
    """One call's system as blocks of receiving atoms: the edges in the [receiver, slot]
    layout, the per-block inputs, and the one place that blocks, chunks and
    checkpoints, shared by the first A basis and every message-passing layer.

    Edges are laid out as [receiver, slot] (slot: the edge's position among its
    receiver's edges, padded to the most neighbours of any receiver with dummy edges
    beyond the cutoff, whose radial weight is exactly zero). Every neighbour sum is
    then a batched matrix product per receiver, and a block of receivers is a slice
    of rows, known on the host without reading anything back.

    Neighbour sums are products [b, small, slots] x [b, slots, L_g * n_rbf]: the
    long (radial x angular) side is the output's row, which BLAS runs ~5x faster
    than the transposed product on these shapes. The (radial x angular) edge tensor
    is built per l group, so that no slice of one big edge tensor (whose backward
    zero-fills the whole tensor per slice) is ever taken.

    Unblocked (``block`` None), the edge basis and its products are computed once for
    all layers; blocked, each block is recomputed from its edge vectors in the
    backward pass, so memory holds node tensors and one block of edge tensors.
    """

    def __init__(
        self,
        vectors: torch.Tensor,
        receivers: torch.Tensor | None,
        senders: torch.Tensor,
        receiver_emb: torch.Tensor,
        *,
        block: int | None,
        max_neighbors: int | None,
        cutoff: float,
        edge_basis: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
        symmetrizer: Symmetrizer,
        group_sizes: list[int],
        edge_chunk: int,
    ) -> None:
        n = receiver_emb.shape[0]
        if receivers is None:
            # Already in the layout, k = max_neighbors slots per receiver (a compiled
            # call's padded batch: its shapes must not depend on the edge count).
            assert max_neighbors is not None and vectors.shape[0] == n * max_neighbors
            self.n, self.k, self.block = n, max_neighbors, block
            self.vectors, self.senders = vectors, senders
        else:
            if max_neighbors is None:
                counts = torch.bincount(receivers, minlength=n)
                # reads back from the device
                max_neighbors = int(counts.max()) if vectors.shape[0] else 0
            k = max(max_neighbors, 1)
            flat = _slots(receivers, n, k)
            pad = torch.tensor([2.0 * cutoff, 0.0, 0.0], dtype=vectors.dtype)
            self.n, self.k, self.block = n, k, block
            self.vectors = pad.to(vectors.device).expand(n * k, 3).index_copy(0, flat, vectors)
            self.senders = senders.new_zeros(n * k).index_copy(0, flat, senders)
        k = self.k
        self.spans = (
            [(0, n)] if block is None else [(s, min(s + block, n)) for s in range(0, n, block)]
        )
        # Per-block inputs are split off once, here: a slice taken inside a block would
        # have a backward that zero-fills the whole system's gradient per block (at
        # 98,304 atoms, 96 blocks x 112 MB for the edge vectors alone: 4.6 s per call).
        self.step = n if block is None else block
        self._vector_blocks = torch.split(self.vectors, self.step * k)
        self._receiver_blocks = torch.split(receiver_emb, self.step)
        self._edge_basis = edge_basis
        self._symmetrizer = symmetrizer
        self._group_sizes = group_sizes
        # Edges per chunk of the radial message's [edges, r', L, C] products.
        self.edge_chunk = edge_chunk
        self._basis_cache: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
        self._product_cache: dict[tuple[int, int], list[torch.Tensor]] = {}

    # -- per-block inputs ------------------------------------------------------------------
    def split(self, node: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """A node tensor [n, ...] split once into its blocks (see ``block_of``)."""
        return torch.split(node, self.step)

    def block_of(self, parts: tuple[torch.Tensor, ...], a0: int) -> torch.Tensor:
        """The block starting at receiver a0 of a tensor split by ``split``."""
        return parts[a0 // self.step]

    def receiver_emb(self, a0: int) -> torch.Tensor:
        """Receiver embeddings of the block starting at a0, [b, a]."""
        return self._receiver_blocks[a0 // self.step]

    def edge_vectors(self, a0: int) -> torch.Tensor:
        """Edge vectors of the block starting at a0, [b * k, 3]."""
        return self._vector_blocks[a0 // self.step]

    def edge_senders(self, a0: int, a1: int) -> torch.Tensor:
        """Sender of each edge of receivers a0:a1, [b * k]."""
        return self.senders[a0 * self.k : a1 * self.k]

    def edge_basis(self, a0: int, a1: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(radial * cutoff [b, k, n_rbf], angular [L, b, k]) of receivers a0:a1."""
        if (a0, a1) in self._basis_cache:
            return self._basis_cache[(a0, a1)]
        radial, angular = self._edge_basis(self.edge_vectors(a0))
        out = (radial.view(a1 - a0, self.k, -1), angular.view(-1, a1 - a0, self.k))
        if self.block is None:
            self._basis_cache[(a0, a1)] = out
        return out

    def products(self, a0: int, a1: int) -> list[torch.Tensor]:
        """radial x angular per l group, [b, k, L_g * n_rbf] (l major)."""
        if (a0, a1) in self._product_cache:
            return self._product_cache[(a0, a1)]
        radial, angular = self.edge_basis(a0, a1)
        xs = [
            (ang.permute(1, 2, 0)[:, :, :, None] * radial[:, :, None, :]).flatten(2)
            for ang in torch.split(angular, self._group_sizes)
        ]
        if self.block is None:
            self._product_cache[(a0, a1)] = xs
        return xs

    # -- blocking, chunking, checkpointing ---------------------------------------------------
    def run(self, fn: BlockFn, *, symmetrized: bool = False) -> torch.Tensor:
        """fn over the blocks of receivers, each recomputed in the backward pass.
        ``symmetrized``: fn returns A and the symmetriser runs inside the block, so
        only B leaves it."""
        if symmetrized:
            fn = partial(_then, self._symmetrizer, fn)
        if self.block is None:
            return fn(0, self.n)
        return _recomputed(fn, self.spans)

    def a_and_b(self, fn: BlockFn, keep_a: bool) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(A, B) of the whole system from a block function returning A. An A that is
        not kept (None) lives only inside its block: only B is stored (at l_max 3 a
        third of A), which is what bounds memory at 98,304 atoms."""
        if keep_a:
            a_feat = self.run(fn)
            return a_feat, self._symmetrizer(a_feat)
        return None, self.run(fn, symmetrized=True)

    def by_edge_chunks(
        self,
        fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        per_edge: torch.Tensor,
        senders: torch.Tensor,
    ) -> torch.Tensor:
        """fn(per_edge, senders) of one block's edges, by chunks of whole receivers of at
        most ``edge_chunk`` edges, each recomputed in the backward pass."""
        k = self.k
        n_recv = per_edge.shape[0] // k
        rows = max(1, self.edge_chunk // k)
        if n_recv <= rows:
            # One chunk: nothing to bound, and recomputing it in the backward pass
            # (twice when training on forces) would only cost time.
            return fn(per_edge, senders)
        return _recomputed(
            fn,
            (
                (
                    per_edge[s * k : min(s + rows, n_recv) * k],
                    senders[s * k : min(s + rows, n_recv) * k],
                )
                for s in range(0, n_recv, rows)
            ),
        )
