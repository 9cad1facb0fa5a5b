"""A fix to Inductor's C++ code generation that our compiled calls need, until the
torch we pin carries it upstream.

Inductor's ``LoopNest.max_parallel_depth`` may move a kernel's OpenMP parallelism from
its outer loops onto an inner reduction when the outer loops hold little work. It
counts their iterations as ``size // step``, and a vectorised loop narrower than one
vector (6 components, 16 lanes) counts 0. So a reduction over 10 radial functions, inside
a serial loop over all 19,968 edge slots, opens a parallel region per slot. In the
cacefit water model at 192 atoms, that one kernel of the edge-basis backward took 21 of
41 ms per call. With the count rounded up, it takes 0.8 ms.

This is pytorch/pytorch#190757, fixed upstream by #190928 (``CeilDiv`` for
``FloorDiv``). ``apply()`` wraps the method to round up the same way. Where torch already
rounds up, the wrapper changes nothing; where Inductor's internals differ from what it
expects, it is not applied, and compiled calls stay correct, only slower.

The generated code changes, but Inductor's cache key does not see this. So ``apply()``
also adds ``CACHE_TAG`` to the key (``torch.compiler.config.cache_key_tag``), once, for
the whole process, as the wrapper is: a cache written without the fix is not reused.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

_log = logging.getLogger(__name__)
_lock = threading.Lock()
_applied: bool | None = None

CACHE_TAG = "cace-server-inductor-fixes-1"


def apply() -> bool:
    """Apply the fix once per process; whether it is in place."""
    global _applied
    with _lock:
        if _applied is None:
            _applied = _wrap_max_parallel_depth()
            if _applied:
                _tag_cache_key()
        return _applied


def _tag_cache_key() -> None:
    import torch

    config = torch.compiler.config
    if CACHE_TAG not in config.cache_key_tag.split("|"):
        config.cache_key_tag = "|".join(filter(None, (config.cache_key_tag, CACHE_TAG)))


def _wrap_max_parallel_depth() -> bool:
    import sympy

    try:
        from torch._inductor.codegen import cpp
    except ImportError:  # pragma: no cover - a torch without Inductor's C++ backend
        return False
    loop_nest = getattr(cpp, "LoopNest", None)
    depth_type = getattr(cpp, "ParallelDepth", None)
    original = getattr(loop_nest, "max_parallel_depth", None)
    if loop_nest is None or depth_type is None or original is None:
        _log.debug("Inductor's LoopNest has changed; its parallel-depth fix is not applied")
        return False

    def known(value: Any) -> int | None:
        return int(value) if isinstance(value, (int, sympy.Integer)) else None

    def max_parallel_depth(self: Any) -> Any:
        depth = original(self)
        start = getattr(depth, "start_depth", 0)
        loops = getattr(self, "loops", None)
        if not start or not loops:
            return depth
        # the outer loops' iterations, a loop narrower than its step counting as one
        outer = 1
        for loop in loops[:start]:
            size, step = known(loop.size), known(loop.steps)
            if size is None or not step:
                return depth
            outer *= -(-size // step)
        inner_size, inner_step = known(loops[start].size), known(loops[start].steps)
        if inner_size is None or not inner_step:
            return depth
        # Inductor's own threshold: move inward only if the inner loop is much longer
        if outer * 300 < inner_size // inner_step:
            return depth
        return depth_type(parallel_depth=start, start_depth=0)

    loop_nest.max_parallel_depth = max_parallel_depth
    return True
