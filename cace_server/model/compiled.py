"""A compiled model call: energy, forces and stress as one graph, by shape buckets.

Eager, one 192-atom call is ~730 operations, each paying the dispatcher, autograd's
bookkeeping and an allocation (on a GPU, a kernel launch each): the arithmetic is a
small part of the time. Here the whole call (the forward pass and the
``torch.autograd.grad`` that gives forces and virial) is traced into one aten graph
with ``make_fx``, so the backward pass of our custom autograd Functions is traced
too, and that graph is compiled by Inductor (C++/OpenMP on a CPU, Triton on CUDA,
with CUDA graphs in ``reduce-overhead`` mode).

A compiled graph has fixed shapes, so a call is laid out before it runs:

- edges in the [receiver, slot] layout with ``slots`` per atom (the representation's
  own layout), a padding slot holding a constant vector beyond the cutoff, so the
  edge count of a step no longer changes a shape, only the most neighbours of one
  atom does, and that is rounded up to a bucket of ``SLOT_QUANTUM``;
- atoms padded with dummy atoms up to a bucket of ``ATOM_QUANTUM``: a dummy has no
  edges, adds nothing to any energy (``atom_mask``) and carries no charge.

The shape of a call (its ``CallShape``) keys a table of compiled graphs; a call
whose shape fits one already compiled, with a few slots to spare, reuses it, so an
MD run whose neighbour counts drift meets a handful of shapes, all compiled during
warm-up. What a graph bakes in from the host (structures per call; for long-range
models the k-grid plan and the atoms of each structure) is part of its shape.

A shape that fails to trace or compile is logged once, counted, and served eagerly
from then on: a compile failure never fails a request.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import torch

from cace_server.model.neighbors import GraphBatch

if TYPE_CHECKING:
    from cace_server.model.potential import BatchOutput, CACEPotential

_log = logging.getLogger(__name__)

# Slots per atom are rounded up to a multiple of this, atoms to a multiple of that.
SLOT_QUANTUM = 8
ATOM_QUANTUM = 32
# A new shape is compiled with this many slots more than its call needs, so that an
# MD run whose most neighbours of one atom grow by a few keeps its shape; a call may
# use a compiled shape with up to SLOT_SPARE more slots than it needs.
COMPILE_SPARE = SLOT_QUANTUM
SLOT_SPARE = COMPILE_SPARE + 2 * SLOT_QUANTUM
# Compile modes: Inductor's default, or reduce-overhead (CUDA graphs on CUDA).
MODES = ("default", "reduce-overhead")

_OUTPUT_NAMES = (
    "energy",
    "atom_energy",
    "charges",
    "forces",
    "virial",
    "descriptors",
    "dipole",
    "bec",
)


def round_up(value: int, quantum: int) -> int:
    return max(quantum, -(-value // quantum) * quantum)


@dataclass(frozen=True)
class CallShape:
    """Everything a compiled graph is specialised on."""

    atoms: int  # padded atom count
    slots: int  # edge slots per atom
    systems: int
    # the long-range plan (k-grid extents, atoms per structure), None without one
    plan: tuple[Any, ...] | None
    # forces, virial, descriptors, bec
    outputs: tuple[bool, bool, bool, bool]
    inputs: tuple[str, ...]

    def describe(self) -> str:
        flags = "".join(c for c, on in zip("FSDB", self.outputs, strict=True) if on)
        return f"{self.systems}x{self.atoms} atoms, {self.slots} slots, outputs E{flags}"


@dataclass
class CompileStats:
    """What the compiled path has done (read by the server's metrics)."""

    compiles: int = 0
    compile_seconds: float = 0.0
    calls: int = 0
    eager_calls: int = 0
    fallbacks: int = 0
    shapes: list[str] = field(default_factory=list)


def plan_signature(model: CACEPotential, batch: GraphBatch) -> tuple[Any, ...] | None:
    """The host-side long-range plan of a batch as a hashable (None without Ewald)."""
    if model.ewald is None or batch.cell_host is None or batch.pbc_host is None:
        return None
    plan = model.ewald.plan(batch.cell_host, batch.pbc_host, batch.n_atoms)
    return tuple(
        (
            g.kind,
            g.systems,
            g.n_max,
            g.start,
            None if g.atom_index is None else g.atom_index.tobytes(),
            g.extents,
            g.mesh,
        )
        for g in plan.groups
    )


def slot_layout(batch: GraphBatch, atoms: int, slots: int) -> GraphBatch:
    """``batch`` in the [receiver, slot] layout with ``slots`` per atom, padded to
    ``atoms`` atoms. Device-side ops only, nothing read back (the caller knows from
    the host that no atom has more than ``slots`` neighbours)."""
    n, device = batch.positions.shape[0], batch.positions.device
    pad = atoms - n
    total = atoms * slots
    receivers = batch.receivers
    ones = torch.ones_like(receivers)
    counts = torch.zeros(n, dtype=receivers.dtype, device=device).index_add(0, receivers, ones)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(receivers.shape[0], device=device) - starts.index_select(0, receivers)
    flat = receivers * slots + rank
    senders = torch.zeros(total, dtype=torch.long, device=device).index_copy(0, flat, batch.senders)
    shifts = torch.zeros(total, 3, dtype=batch.unit_shifts.dtype, device=device).index_copy(
        0, flat, batch.unit_shifts
    )
    slot_mask = torch.zeros(total, dtype=torch.bool, device=device).index_fill(0, flat, True)
    last = batch.n_systems - 1

    def padded(t: torch.Tensor, fill: float = 0) -> torch.Tensor:
        if not pad:
            return t
        return torch.cat([t, t.new_full((pad, *t.shape[1:]), fill)])

    system = padded(batch.system, last)
    atom_mask = padded(torch.ones(n, dtype=torch.bool, device=device), False)
    return replace(
        batch,
        positions=padded(batch.positions),
        species=padded(batch.species),
        system=system,
        receivers=torch.arange(atoms, device=device).repeat_interleave(slots),
        senders=senders,
        unit_shifts=shifts,
        edge_system=system.repeat_interleave(slots),
        inputs={k: padded(v) for k, v in batch.inputs.items()},
        max_neighbors=slots,
        slots=slots,
        slot_mask=slot_mask,
        atom_mask=atom_mask,
    )


_TENSOR_FIELDS = (
    "positions",
    "cell",
    "pbc",
    "species",
    "system",
    "receivers",
    "senders",
    "unit_shifts",
    "edge_system",
    "slot_mask",
    "atom_mask",
)


class CompiledCall:
    """The compiled evaluation of one :class:`CACEPotential`, one graph per shape."""

    def __init__(self, model: CACEPotential, mode: str = "default") -> None:
        if mode not in MODES:
            raise ValueError(f"compile mode must be one of {MODES}, got {mode!r}")
        self.model = model
        self.mode = mode
        self.stats = CompileStats()
        self._graphs: dict[CallShape, Callable[..., Any] | None] = {}
        self._names: dict[CallShape, tuple[str, ...]] = {}
        self._lock = threading.Lock()
        # Dummy atoms would change a dipole model's mean-charge correction.
        self.pads_atoms = model.polarization is None

    # -- shapes ----------------------------------------------------------------------------
    def shape_of(self, batch: GraphBatch, outputs: tuple[bool, bool, bool, bool]) -> CallShape:
        """The shape a batch is run in: the compiled one that holds it with the fewest
        slots (at most SLOT_SPARE more than it needs), else a new one."""
        n = int(batch.positions.shape[0])
        atoms = round_up(n, ATOM_QUANTUM) if self.pads_atoms else n
        needed = max(batch.max_neighbors or 0, 1)
        new = CallShape(
            atoms,
            round_up(needed + COMPILE_SPARE, SLOT_QUANTUM),
            batch.n_systems,
            plan_signature(self.model, batch),
            outputs,
            tuple(sorted(batch.inputs)),
        )
        best: CallShape | None = None
        for shape in self._graphs:
            if (
                replace(shape, slots=new.slots) == new
                and needed <= shape.slots <= needed + SLOT_SPARE
                and (best is None or shape.slots < best.slots)
            ):
                best = shape
        return new if best is None else best

    @property
    def shapes(self) -> list[CallShape]:
        return [s for s, g in self._graphs.items() if g is not None]

    # -- calls -----------------------------------------------------------------------------
    def __call__(
        self,
        batch: GraphBatch,
        *,
        forces: bool,
        virial: bool,
        bec: bool = False,
        descriptors: bool = False,
    ) -> BatchOutput:
        flags = (forces, virial, descriptors, bec)
        shape = self.shape_of(batch, flags)
        graph = self._graphs.get(shape, ...)
        if graph is ...:
            graph = self._compile(shape, batch)
        if graph is None:
            self.stats.eager_calls += 1
            return self._eager(batch, flags)
        self.stats.calls += 1
        laid_out = slot_layout(batch, shape.atoms, shape.slots)
        with torch.no_grad():
            values = graph(*self._tensors(laid_out))
        return self._output(dict(zip(self._names[shape], values, strict=True)))

    def _eager(self, batch: GraphBatch, flags: tuple[bool, bool, bool, bool]) -> BatchOutput:
        forces, virial, descriptors, bec = flags
        with torch.enable_grad():
            return self.model.compute(
                batch, forces=forces, virial=virial, bec=bec, descriptors=descriptors
            )

    @staticmethod
    def _tensors(batch: GraphBatch) -> list[torch.Tensor]:
        values = [getattr(batch, name) for name in _TENSOR_FIELDS]
        return values + [batch.inputs[k] for k in sorted(batch.inputs)]

    @staticmethod
    def _output(values: dict[str, torch.Tensor]) -> BatchOutput:
        from cace_server.model.potential import BatchOutput

        return BatchOutput(**{name: values.get(name) for name in _OUTPUT_NAMES})  # type: ignore[arg-type]

    # -- compiling -------------------------------------------------------------------------
    def _compile(self, shape: CallShape, batch: GraphBatch) -> Callable[..., Any] | None:
        with self._lock:
            if shape in self._graphs:
                return self._graphs[shape]
            t0 = time.perf_counter()
            try:
                graph = self._build(shape, batch)
            except Exception as exc:
                self.stats.fallbacks += 1
                _log.warning(
                    "compiling the model call for %s failed, served eagerly: %s: %s",
                    shape.describe(),
                    type(exc).__name__,
                    str(exc).splitlines()[0] if str(exc) else "",
                )
                self._graphs[shape] = None
                return None
            seconds = time.perf_counter() - t0
            self.stats.compiles += 1
            self.stats.compile_seconds += seconds
            self.stats.shapes.append(shape.describe())
            _log.info("compiled the model call for %s in %.1f s", shape.describe(), seconds)
            self._graphs[shape] = graph
            return graph

    def _build(self, shape: CallShape, batch: GraphBatch) -> Callable[..., Any]:
        from torch.fx.experimental.proxy_tensor import make_fx

        laid_out = slot_layout(batch, shape.atoms, shape.slots)
        example = self._tensors(laid_out)
        forces, virial, descriptors, bec = shape.outputs
        names: list[str] = []
        n_fields = len(_TENSOR_FIELDS)

        def call(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
            fields = dict(zip(_TENSOR_FIELDS, tensors[:n_fields], strict=True))
            inputs = dict(zip(shape.inputs, tensors[n_fields:], strict=True))
            traced = replace(laid_out, inputs=inputs, **fields)  # type: ignore[arg-type]
            with torch.enable_grad():
                out = self.model.compute(
                    traced, forces=forces, virial=virial, bec=bec, descriptors=descriptors
                )
            values = {name: getattr(out, name) for name in _OUTPUT_NAMES}
            names[:] = [k for k, v in values.items() if v is not None]
            return tuple(v.detach() for v in values.values() if v is not None)

        graph = make_fx(call, tracing_mode="real")(*example)
        self._names[shape] = tuple(names)
        compiled = torch.compile(
            graph, backend=_inductor_backend(laid_out.positions.device, self.mode), dynamic=False
        )
        # The first call compiles; it also checks the graph against the eager call.
        with torch.no_grad():
            compiled(*example)
        return compiled


def compile_model(model: torch.nn.Module, mode: str = "default") -> list[CompiledCall]:
    """Give every CACEPotential in ``model`` (itself, or a committee's members) a
    compiled call; returns them."""
    from cace_server.model.potential import CACEPotential

    calls = []
    for module in model.modules():
        if isinstance(module, CACEPotential):
            module.compiled = CompiledCall(module, mode)
            calls.append(module.compiled)
    return calls


def total_stats(calls: Sequence[CompiledCall]) -> CompileStats:
    out = CompileStats()
    for c in calls:
        s = c.stats
        out.compiles += s.compiles
        out.compile_seconds += s.compile_seconds
        out.calls += s.calls
        out.eager_calls += s.eager_calls
        out.fallbacks += s.fallbacks
        out.shapes.extend(s.shapes)
    return out


def _inductor_backend(device: torch.device, mode: str) -> Callable[..., Any]:
    """Inductor, with two choices of ours.

    On a CPU, ``index_add`` (the backward of every gather: each edge's sender and
    receiver rows) is kept as ATen's kernel instead of being decomposed into a
    generated scatter of element-wise atomic adds: profiled on the cacefit water
    model at 192 atoms, the generated scatters took ~35 of ~55 ms per call, ATen's
    row-wise kernel a few ms. On CUDA, atomics are what GPUs do well and the default
    stands; ``reduce-overhead`` there also captures the call as a CUDA graph.
    """
    from torch._inductor.compile_fx import compile_fx
    from torch._inductor.decomposition import select_decomp_table

    table = select_decomp_table()
    if device.type == "cpu":
        table = {k: v for k, v in table.items() if k.name() != "aten::index_add"}
    patches = {"triton.cudagraphs": True} if mode == "reduce-overhead" else {}

    def backend(graph: torch.fx.GraphModule, example: list[torch.Tensor]) -> Any:
        return compile_fx(graph, example, decompositions=table, config_patches=patches)

    return backend
