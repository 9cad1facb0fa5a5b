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
from then on: a compile failure never fails a request. In a server
(``background=True``) a shape met for the first time is served eagerly while it
compiles on a thread of its own, so no request waits the tens of seconds a compile
takes; the shapes an MD run will use are compiled during warm-up instead (see the
engine's ``compile_warmup``).
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import torch

from cace_server.model import inductor_fixes
from cace_server.model.fusion import tracing_for_inductor
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
# In the background mode, a shape compiles once this many calls have met it: shapes
# met a few times stay eager (the first forces of an i-PI run reach the server over a
# few partial batches as i-PI accepts its connections: 4 odd calls measured for 8
# beads; an odd request).
COMPILE_AFTER = 16
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

    def add(self, other: CompileStats) -> None:
        self.compiles += other.compiles
        self.compile_seconds += other.compile_seconds
        self.calls += other.calls
        self.eager_calls += other.eager_calls
        self.fallbacks += other.fallbacks
        self.shapes.extend(other.shapes)


# Every compiled call of the process adds here too (the server's metrics read it).
PROCESS_STATS = CompileStats()
_STATS_LOCK = threading.Lock()


def process_stats() -> CompileStats:
    """A copy of what every compiled call of this process has done."""
    with _STATS_LOCK:
        out = CompileStats()
        out.add(PROCESS_STATS)
        return out


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


def slot_layout(
    batch: GraphBatch, atoms: int, slots: int, systems: int | None = None
) -> GraphBatch:
    """``batch`` in the [receiver, slot] layout with ``slots`` per atom, padded to
    ``atoms`` atoms and ``systems`` structures (empty ones, open, with a unit cell,
    that the padding atoms belong to). Device-side ops only, nothing read back (the
    caller knows from the host that no atom has more than ``slots`` neighbours)."""
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
    systems = batch.n_systems if systems is None else systems
    extra = systems - batch.n_systems
    last = systems - 1

    def padded(t: torch.Tensor, fill: float = 0) -> torch.Tensor:
        if not pad:
            return t
        return torch.cat([t, t.new_full((pad, *t.shape[1:]), fill)])

    system = padded(batch.system, last)
    atom_mask = padded(torch.ones(n, dtype=torch.bool, device=device), False)
    if extra:
        eye = torch.eye(3, dtype=batch.cell.dtype, device=device).expand(extra, 3, 3)
        batch = replace(
            batch,
            cell=torch.cat([batch.cell, eye]),
            pbc=torch.cat([batch.pbc, batch.pbc.new_zeros(extra, 3)]),
            n_atoms=[*batch.n_atoms, *([0] * extra)],
            n_pairs=[*batch.n_pairs, *([0] * extra)] if batch.n_pairs else [],
        )
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

    def __init__(
        self, model: CACEPotential, mode: str = "default", *, background: bool = False
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"compile mode must be one of {MODES}, got {mode!r}")
        self.model = model
        self.mode = mode
        # True: a new shape compiles on a thread while its calls run eagerly.
        self.background = background
        # False: every call runs eagerly (the engine's generic warm-up).
        self.enabled = True
        self.stats = CompileStats()
        self._graphs: dict[CallShape, Callable[..., Any] | None] = {}
        self._names: dict[CallShape, tuple[str, ...]] = {}
        self._lock = threading.Lock()
        self._compiling = threading.Lock()
        self._pending: set[CallShape] = set()
        self._seen: dict[CallShape, int] = {}
        # Dummy atoms would change a dipole model's mean-charge correction.
        self.pads_atoms = model.polarization is None

    def _count(self, **changes: float) -> None:
        with _STATS_LOCK:
            for stats in (self.stats, PROCESS_STATS):
                for name, value in changes.items():
                    setattr(stats, name, getattr(stats, name) + value)

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
        with self._lock:  # a compile on another thread may publish meanwhile
            compiled = list(self._graphs)
        best: CallShape | None = None
        for shape in compiled:
            if self._holds(shape, new, needed) and (
                best is None or (shape.atoms, shape.slots) < (best.atoms, best.slots)
            ):
                best = shape
        return new if best is None else best

    def _holds(self, shape: CallShape, new: CallShape, needed_slots: int) -> bool:
        """Whether a call of shape ``new`` (its most neighbours ``needed_slots``) can run
        in compiled ``shape``: the same outputs and inputs, enough slots (at most
        SLOT_SPARE more) and, for a model without a long-range plan, enough atoms and
        structures (at most twice the atoms: the padding is computed too). A batch
        with fewer structures than a compiled one (a PIMD step whose beads arrived
        over two batches) is padded with empty structures."""
        if not needed_slots <= shape.slots <= needed_slots + SLOT_SPARE:
            return False
        if (shape.outputs, shape.inputs, shape.plan) != (new.outputs, new.inputs, new.plan):
            return False
        if (shape.atoms, shape.systems) == (new.atoms, new.systems):
            return True
        return (
            self.pads_atoms
            and shape.plan is None
            and new.atoms <= shape.atoms <= 2 * new.atoms
            and new.systems <= shape.systems
        )

    @property
    def shapes(self) -> list[CallShape]:
        with self._lock:
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
        if not self.enabled:
            return self._eager(batch, flags)
        shape = self.shape_of(batch, flags)
        graph = self._graphs.get(shape, ...)
        if graph is ...:
            if self.background:
                self._compile_later(shape, batch)
                graph = None
            else:
                graph = self._compile(shape, batch)
        if graph is None:
            self._count(eager_calls=1)
            return self._eager(batch, flags)
        self._count(calls=1)
        laid_out = slot_layout(batch, shape.atoms, shape.slots, shape.systems)
        if self.mode == "reduce-overhead":
            # Each call is a new CUDA-graph replay; the previous call's outputs were
            # copied to the host before this one (predict does, group by group).
            torch.compiler.cudagraph_mark_step_begin()
        with torch.no_grad():
            values = graph(*self._tensors(laid_out))
        out = dict(zip(self._names[shape], values, strict=True))
        # per-structure outputs without the padding structures
        for name in ("energy", "virial", "dipole"):
            if name in out:
                out[name] = out[name][: batch.n_systems]
        return self._output(out)

    def _eager(self, batch: GraphBatch, flags: tuple[bool, bool, bool, bool]) -> BatchOutput:
        forces, virial, descriptors, bec = flags
        with torch.enable_grad():
            return self.model.compute(
                batch, forces=forces, virial=virial, bec=bec, descriptors=descriptors
            )

    @staticmethod
    def _tensors(batch: GraphBatch) -> list[torch.Tensor]:
        """The graph's inputs, contiguous: compiled code assumes the strides it saw."""
        values = [getattr(batch, name) for name in _TENSOR_FIELDS]
        values += [batch.inputs[k] for k in sorted(batch.inputs)]
        return [v.contiguous() for v in values]

    @staticmethod
    def _output(values: dict[str, torch.Tensor]) -> BatchOutput:
        from cace_server.model.potential import BatchOutput

        return BatchOutput(**{name: values.get(name) for name in _OUTPUT_NAMES})  # type: ignore[arg-type]

    # -- compiling -------------------------------------------------------------------------
    def _compile_later(self, shape: CallShape, batch: GraphBatch) -> None:
        """Compile ``shape`` on a thread of its own once COMPILE_AFTER calls met it."""
        with self._lock:
            if shape in self._pending or shape in self._graphs:
                return
            if len(self._seen) > 4096:  # odd shapes of a long-lived server
                self._seen.clear()
            self._seen[shape] = self._seen.get(shape, 0) + 1
            if self._seen[shape] < COMPILE_AFTER:
                return
            self._pending.add(shape)

        def run() -> None:
            try:
                self._compile(shape, batch)
            finally:
                with self._lock:
                    self._pending.discard(shape)

        threading.Thread(target=run, name="cace-compile", daemon=True).start()

    def _compile(self, shape: CallShape, batch: GraphBatch) -> Callable[..., Any] | None:
        # One compile at a time; ``_lock`` is held only to read or publish, so calls
        # (served eagerly meanwhile) never wait for a compile on another thread.
        with self._compiling:
            with self._lock:
                if shape in self._graphs:
                    return self._graphs[shape]
            t0 = time.perf_counter()
            graph: Callable[..., Any] | None
            try:
                graph = self._build(shape, batch)
            except Exception as exc:
                self._count(fallbacks=1)
                # Inductor wraps the compiler's own error; name that one.
                cause = getattr(exc, "inner_exception", None) or exc.__cause__ or exc
                _log.warning(
                    "compiling the model call for %s failed, served eagerly: %s: %s",
                    shape.describe(),
                    type(cause).__name__,
                    str(cause).strip().splitlines()[0] if str(cause).strip() else "",
                )
                graph = None
            else:
                seconds = time.perf_counter() - t0
                self._count(compiles=1, compile_seconds=seconds)
                with _STATS_LOCK:
                    self.stats.shapes.append(shape.describe())
                    PROCESS_STATS.shapes.append(shape.describe())
                _log.info("compiled the model call for %s in %.1f s", shape.describe(), seconds)
            with self._lock:
                self._graphs[shape] = graph
            return graph

    def _build(self, shape: CallShape, batch: GraphBatch) -> Callable[..., Any]:
        from torch.fx.experimental.proxy_tensor import make_fx

        laid_out = slot_layout(batch, shape.atoms, shape.slots, shape.systems)
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

        with tracing_for_inductor():
            graph = make_fx(call, tracing_mode="real")(*example)
        self._names[shape] = tuple(names)
        # Inductor on the traced graph directly: no dynamo frame, so no guards that
        # could recompile a shape while serving.
        with torch.no_grad():
            compiled = _inductor(graph, example, laid_out.positions.device, self.mode)
            compiled(*example)
        return compiled


def compiled_calls(model: Any) -> list[CompiledCall]:
    """The compiled calls of every CACEPotential in ``model`` (none when not compiled)."""
    from cace_server.model.potential import CACEPotential

    if not isinstance(model, torch.nn.Module):
        return []
    return [
        m.compiled
        for m in model.modules()
        if isinstance(m, CACEPotential) and m.compiled is not None
    ]


def compile_model(
    model: torch.nn.Module, mode: str = "default", *, background: bool = False
) -> list[CompiledCall]:
    """Give every CACEPotential in ``model`` (itself, or a committee's members) a
    compiled call; returns them."""
    from cace_server.model.potential import CACEPotential

    calls = []
    for module in model.modules():
        if isinstance(module, CACEPotential):
            module.compiled = CompiledCall(module, mode, background=background)
            calls.append(module.compiled)
    return calls


def total_stats(calls: Sequence[CompiledCall]) -> CompileStats:
    out = CompileStats()
    for c in calls:
        out.add(c.stats)
    return out


class _DecompositionTable(dict[Any, Callable[..., Any]]):
    """Inductor's decompositions less some operators, pickled (into Inductor's cache
    key) as the names left out: the table itself does not pickle, and a key that
    cannot be made bypasses the on-disk cache."""

    left_out: tuple[str, ...] = ()

    def __reduce__(self) -> tuple[Any, tuple[tuple[str, ...]]]:
        return (_decompositions, (self.left_out,))


@functools.cache
def _decompositions(left_out: tuple[str, ...]) -> _DecompositionTable:
    from torch._inductor.decomposition import select_decomp_table

    table = _DecompositionTable(
        {k: v for k, v in select_decomp_table().items() if k.name() not in left_out}
    )
    table.left_out = left_out
    return table


def _inductor(
    graph: torch.fx.GraphModule, example: list[torch.Tensor], device: torch.device, mode: str
) -> Callable[..., Any]:
    """Inductor, with two choices of ours and a fix (``inductor_fixes``).

    On a CPU, ``index_add`` (the backward of every gather: each edge's sender and
    receiver rows) is kept as ATen's kernel instead of being decomposed into a
    generated scatter of element-wise atomic adds: profiled on the cacefit water
    model at 192 atoms, the generated scatters took ~35 of ~55 ms per call, ATen's
    row-wise kernel a few ms. On CUDA, atomics are what GPUs do well and the default
    stands; ``reduce-overhead`` there also captures the call as a CUDA graph.
    """
    from torch._inductor.compile_fx import compile_fx

    inductor_fixes.apply()
    table = _decompositions(("aten::index_add",) if device.type == "cpu" else ())
    from torch._guards import TracingContext, tracing
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    patches = {"triton.cudagraphs": True} if mode == "reduce-overhead" else {}
    # A tracing context with a shape environment, as dynamo would give: Inductor's
    # on-disk FX graph cache is bypassed without one. The inputs are still taken as
    # static (ignore_shape_env): every shape is compiled for its own sizes, where a
    # graph with no size-specialising operation would otherwise get symbolic ones.
    with tracing(TracingContext(FakeTensorMode(shape_env=ShapeEnv()))):
        return compile_fx(  # type: ignore[return-value]
            graph, example, decompositions=table, config_patches=patches, ignore_shape_env=True
        )
