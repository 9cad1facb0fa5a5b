"""Buffers that a compiled graph keeps, marked where the model computes them.

Inductor inlines a pointwise producer into every consumer. Where the producer
broadcasts a small tensor along a middle dimension, the consumer's index into it is not
affine in the vectorised loop, and the whole consumer falls back to scalar code. One
case is the receiver embedding [n, t] over A's columns (n, r', (s, t)). Its consumers
are the symmetriser's row gathers, which read A many times, forward and backward. A
buffer written once costs one pass and leaves those consumers vectorised (profile in the
commit that added this module: the symmetriser's kernels, 3.7 ms of a 192-atom call,
became 1 ms).

``materialized(t)`` is ``t`` itself in eager calls. While a compiled call is traced
(``tracing_for_inductor()``, per thread: eager calls go on while a shape compiles in the
background), it records Inductor's stride-order prim, which Inductor lowers to a
buffer of its own with contiguous strides.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import torch

_tracing = threading.local()


@contextlib.contextmanager
def tracing_for_inductor() -> Iterator[None]:
    """Mark this thread's model calls as traced for Inductor (see the module)."""
    before = getattr(_tracing, "active", False)
    _tracing.active = True
    try:
        yield
    finally:
        _tracing.active = before


def materialized(t: torch.Tensor) -> torch.Tensor:
    """``t``, kept as a contiguous buffer of its own in a compiled graph; no autograd
    (used inside the forward and backward of custom autograd Functions)."""
    if not getattr(_tracing, "active", False):
        return t
    from torch._inductor import inductor_prims

    strides: list[int] = []
    step = 1
    for size in reversed(t.shape):
        strides.insert(0, step)
        step *= max(size, 1)
    return inductor_prims.force_stride_order(t, strides)  # type: ignore[no-any-return]
