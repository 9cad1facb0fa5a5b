"""Small multilayer perceptrons used by the readouts and the B-chi messages."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu,
    "relu": F.relu,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "identity": lambda x: x,
}


class MLP(torch.nn.Module):
    """Linear layers of the given output sizes; activation after all but the last."""

    def __init__(self, n_in: int, sizes: Sequence[int], activation: str, bias: bool = True) -> None:
        super().__init__()
        if not sizes:
            raise ValueError("an MLP needs at least one layer")
        dims = [n_in, *sizes]
        self.layers = torch.nn.ModuleList(
            torch.nn.Linear(dims[k], dims[k + 1], bias=bias) for k in range(len(sizes))
        )
        self.activation_name = activation
        self.activation = _ACTIVATIONS[activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        last = len(self.layers) - 1
        for k, layer in enumerate(self.layers):
            x = layer(x)
            if k < last:
                x = self.activation(x)
        return x


class AtomwiseReadout(torch.nn.Module):
    """Per-atom outputs from node features: scale * (MLP(x) + optional linear(x)).

    One output is returned as [n_atoms], several (multi-channel latent charges) as
    [n_atoms, n_out].
    """

    def __init__(
        self,
        n_in: int,
        hidden: Sequence[int],
        activation: str,
        bias: bool,
        linear_branch: bool,
        n_out: int = 1,
        scale: float = 1.0,
    ) -> None:
        super().__init__()
        self.mlp = MLP(n_in, [*hidden, n_out], activation, bias=bias)
        self.linear = torch.nn.Linear(n_in, n_out, bias=bias) if linear_branch else None
        self.scale = float(scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.mlp(x)
        if self.linear is not None:
            y = y + self.linear(x)
        if self.scale != 1.0:
            y = y * self.scale
        return y.squeeze(-1) if y.shape[-1] == 1 else y
