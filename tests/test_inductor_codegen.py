"""What our compiled calls change in Inductor's generated code (``model/fusion.py``,
``model/inductor_fixes.py``), checked on the C++ that Inductor writes for small graphs."""

from __future__ import annotations

import re
from collections.abc import Callable

import torch
from torch._inductor.utils import run_and_get_code
from torch.fx.experimental.proxy_tensor import make_fx

from cace_server.model import inductor_fixes
from cace_server.model.compiled import _inductor
from cace_server.model.fusion import materialized, tracing_for_inductor

CPU = torch.device("cpu")


def compiled_code(
    fn: Callable[..., tuple[torch.Tensor]], *example: torch.Tensor
) -> tuple[torch.Tensor, str]:
    graph = make_fx(fn)(*example)
    # two threads, as on the machines we serve from: one thread emits no OpenMP at all
    with torch._inductor.config.patch({"cpp.threads": 2, "fx_graph_cache": False}):
        (out,), code = run_and_get_code(
            lambda: _inductor(graph, list(example), CPU, "default")(*example)
        )
    return out, "\n".join(code)


def test_a_reduction_under_a_narrow_vector_loop_stays_parallel_outside() -> None:
    # [edges, 10, 6] summed over its 10: the shape of the edge-basis backward. Inductor
    # without the fix counted the 6-wide vector loop as 0 iterations and opened a
    # parallel region inside the serial loop over edges, once per edge.
    a, b = torch.randn(4000, 10, 6), torch.randn(4000, 10)

    def reduce(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor]:
        return ((a * b[:, :, None]).sum(1),)

    out, code = compiled_code(reduce, a, b)
    torch.testing.assert_close(out, reduce(a, b)[0])
    kernel = code[code.index('extern "C"') :]
    # the parallel loop is the one over the 4,000 edges, not the reduction over 10
    parallel_loops = re.findall(
        r"#pragma omp for[^\n]*\n\s*for\([^;]*;[^<]*<static_cast<int64_t>\((\d+)L\)", kernel
    )
    assert parallel_loops and "10" not in parallel_loops, kernel
    assert "4000" in parallel_loops, kernel
    # and code generated with the fix is cached under keys of its own
    assert inductor_fixes.CACHE_TAG in torch.compiler.config.cache_key_tag.split("|")


def test_materialized_is_the_tensor_itself_outside_a_trace_for_inductor() -> None:
    x = torch.randn(3, 4).t()
    assert materialized(x) is x


def test_materialized_keeps_a_contiguous_buffer_in_the_traced_graph() -> None:
    x, w = torch.randn(4, 6), torch.randn(6)

    def scaled(x: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor]:
        return (materialized((x * w).t()),)

    plain = make_fx(scaled)(x, w)
    with tracing_for_inductor():
        marked = make_fx(scaled)(x, w)
    ops = {str(n.target) for n in marked.graph.nodes if n.op == "call_function"}
    assert any("force_stride_order" in op for op in ops), ops
    assert not any("force_stride_order" in str(n.target) for n in plain.graph.nodes)
    (out,) = marked(x, w)
    assert out.is_contiguous() and torch.equal(out, (x * w).t())
    # the mark is per thread and ends with the block
    assert materialized(x) is x
