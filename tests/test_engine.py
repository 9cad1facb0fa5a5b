"""The serving engine with real (small, random) CACE models.

Failures are injected by wrapping a real model (``Faulty``): its ``predict``
raises out-of-memory above a size, returns NaN for chosen structures, or blocks
until released, and otherwise returns what the real model computes.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest
import torch

from cace_server.engine import (
    Engine,
    EngineClosed,
    EngineError,
    EngineSettings,
    InvalidStructure,
    NonFiniteResult,
    NotReady,
    OutOfMemory,
    Overloaded,
    UnknownModel,
    is_out_of_memory,
)
from cace_server.engine.batching import Lane, PendingQueue, WorkItem, select_batch
from cace_server.engine.models import ModelWrapper
from cace_server.engine.stats import EngineStats, Histogram
from cace_server.engine.steps import StepGroup
from cace_server.model import random_model
from cace_server.outputs import Outputs
from cace_server.structures import BatchCost, Prediction, Structure

TOL = 1e-10


def make_structure(
    n_atoms: int, *, seed: int, elements: Sequence[int] = (1, 8), periodic: bool = True
) -> Structure:
    """Atoms on a jittered grid (no overlaps), in a cubic box when periodic."""
    rng = np.random.default_rng(seed)
    side = int(np.ceil(n_atoms ** (1 / 3)))
    grid = np.array([(i, j, k) for i in range(side) for j in range(side) for k in range(side)])
    positions = grid[:n_atoms] * 1.6 + rng.uniform(-0.2, 0.2, (n_atoms, 3))
    numbers = rng.choice(elements, n_atoms)
    if periodic:
        box = side * 1.6
        return Structure.create(numbers, positions, np.eye(3) * box, True)
    return Structure.create(numbers, positions)


def assert_same(got: Prediction, want: Prediction, *, stress: bool = True) -> None:
    assert got.energy == pytest.approx(want.energy, rel=TOL, abs=TOL)
    assert got.forces is not None and want.forces is not None
    np.testing.assert_allclose(got.forces, want.forces, rtol=TOL, atol=TOL)
    if stress and want.stress is not None:
        assert got.stress is not None
        np.testing.assert_allclose(got.stress, want.stress, rtol=TOL, atol=TOL)


class Faulty(ModelWrapper):
    """A real model whose ``predict`` can misbehave; everything else is the model's."""

    def __init__(
        self,
        inner: Any,
        *,
        oom_above_atoms: int | None = None,
        oom_error: type[BaseException] = torch.cuda.OutOfMemoryError,
        nan_for_atoms: int | None = None,
    ) -> None:
        super().__init__(inner)
        self.oom_above_atoms = oom_above_atoms
        self.oom_error = oom_error
        self.nan_for_atoms = nan_for_atoms
        self.calls: list[int] = []  # structures per predict call
        self.pairs: list[int] = []  # neighbour pairs per predict call
        self.gate = threading.Event()  # predict waits for it while ``blocking``
        self.gate.set()
        self.entered = threading.Event()

    def block(self) -> None:
        self.entered.clear()
        self.gate.clear()

    def predict(self, structures: Sequence[Any], outputs: Outputs) -> list[Prediction]:
        self.calls.append(len(structures))
        self.pairs.append(sum(p.n_pairs for p in structures))
        self.entered.set()
        assert self.gate.wait(30)
        n_atoms = sum(p.n_atoms for p in structures)
        if self.oom_above_atoms is not None and n_atoms > self.oom_above_atoms:
            raise self.oom_error(f"CUDA out of memory. Tried to allocate {n_atoms} GiB")
        predictions = self.inner.predict(structures, outputs)
        for p, prediction in zip(structures, predictions, strict=True):
            if p.n_atoms == self.nan_for_atoms:
                prediction.energy = float("nan")
        return predictions


@pytest.fixture(scope="module")
def model() -> Any:
    return random_model((1, 8), seed=0)


@pytest.fixture(scope="module")
def structures() -> list[Structure]:
    sizes = [3, 5, 8, 12, 7, 20, 9, 4]
    return [make_structure(n, seed=i, periodic=i % 3 != 2) for i, n in enumerate(sizes)]


def reference(model: Any, structures: Sequence[Structure]) -> list[Prediction]:
    return [model.predict([s])[0] for s in structures]


def settings(**kw: Any) -> EngineSettings:
    kw.setdefault("batch_wait_ms", 20.0)
    return EngineSettings(**kw)


def engine_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("cace-engine")]


# -- results -----------------------------------------------------------------------------------


def test_batched_equals_one_by_one(model: Any, structures: list[Structure]) -> None:
    want = reference(model, structures)
    with Engine(model, settings=settings()) as engine:
        assert engine.ready
        got = engine.evaluate_sync(structures)
        snap = engine.snapshot()
    assert len(got) == len(structures)
    for g, w in zip(got, want, strict=True):
        assert_same(g, w)
        assert g.extras["model"] == "default"
    assert snap.batches == 1 and snap.model_calls == 1
    assert snap.batch_structures.max == len(structures)
    assert snap.structures == len(structures)
    assert snap.atoms == sum(len(s) for s in structures)
    assert snap.requests == 1 and snap.latency_s.count == 1
    assert snap.queue_depth == 0 and snap.in_flight == 0
    assert snap.errors == {}


def test_concurrent_coroutines_and_threads_are_batched(
    model: Any, structures: list[Structure]
) -> None:
    many = [make_structure(4 + i % 9, seed=100 + i) for i in range(32)]
    want = reference(model, many)

    async def main() -> list[list[Prediction]]:
        async with Engine(model, settings=settings()) as engine:
            results = await asyncio.gather(*(engine.evaluate([s]) for s in many))
            snap = engine.snapshot()
        assert snap.batch_structures.max > 1
        assert snap.batches < len(many)
        assert snap.requests == len(many) and snap.latency_s.count == len(many)
        return results

    results = asyncio.run(main())
    for (got,), w in zip(results, want, strict=True):
        assert_same(got, w)

    # Threads with the blocking API share batches too.
    with Engine(model, settings=settings()) as engine:
        out: dict[int, Prediction] = {}

        def call(i: int) -> None:
            out[i] = engine.evaluate_sync([many[i]], timeout=30)[0]

        threads = [threading.Thread(target=call, args=(i,)) for i in range(12)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert engine.snapshot().batch_structures.max > 1
    for i in range(12):
        assert_same(out[i], want[i])


def test_stress_flag(model: Any, structures: list[Structure]) -> None:
    periodic = structures[0]
    with Engine(model, settings=settings()) as engine:
        futures = engine.submit([periodic], outputs=["energy", "forces"]) + engine.submit(
            [periodic]
        )
        without, with_stress = (f.result(30) for f in futures)
    assert without.stress is None and without.virial is None
    assert with_stress.stress is not None
    assert_same(without, with_stress, stress=False)


def test_several_models(model: Any) -> None:
    other = random_model((1, 6, 8), seed=1)
    water = [make_structure(6 + i, seed=200 + i) for i in range(6)]
    organic = [make_structure(6 + i, seed=300 + i, elements=(1, 6, 8)) for i in range(6)]
    with Engine({"water": model, "organic": other}, settings=settings()) as engine:
        assert engine.default_model == "water"
        assert set(engine.models) == {"water", "organic"}
        info = engine.model_info("organic")
        assert info.elements == (1, 6, 8) and not info.default
        assert info.dtype == "float64" and info.device == "cpu" and info.n_parameters > 0

        async def main() -> tuple[list[Prediction], list[Prediction]]:
            a = asyncio.gather(*(engine.evaluate([s]) for s in water))
            b = asyncio.gather(*(engine.evaluate([s], model="organic") for s in organic))
            ra, rb = await asyncio.gather(a, b)
            return [r[0] for r in ra], [r[0] for r in rb]

        got_water, got_organic = asyncio.run(main())
        assert engine.snapshot().structures_by_model == {"water": 6, "organic": 6}
        # The default model rejects carbon; the other model takes it.
        with pytest.raises(InvalidStructure, match="C"):
            engine.evaluate_sync(organic[:1])
    for g, w in zip(got_water, reference(model, water), strict=True):
        assert_same(g, w)
        assert g.extras["model"] == "water"
    for g, w in zip(got_organic, reference(other, organic), strict=True):
        assert_same(g, w)
        assert g.extras["model"] == "organic"


# -- failures ------------------------------------------------------------------------------------


def test_bad_structure_fails_alone(model: Any, structures: list[Structure]) -> None:
    carbon = Structure.create([8, 6, 1], [[0, 0, 0], [1.2, 0, 0], [0, 1.1, 0]])
    mixed: list[Any] = [structures[0], carbon, structures[1], "not a structure", structures[2]]
    want = reference(model, [structures[0], structures[1], structures[2]])
    with Engine(model, settings=settings()) as engine:
        got = engine.evaluate_sync(mixed, return_exceptions=True)
        assert isinstance(got[1], InvalidStructure) and got[1].index == 1
        assert "C (Z=6)" in str(got[1])
        assert isinstance(got[3], InvalidStructure) and "str" in str(got[3])
        for g, w in zip([got[0], got[2], got[4]], want, strict=True):
            assert isinstance(g, Prediction)
            assert_same(g, w)
        # Without return_exceptions the first error is raised; the engine still serves.
        with pytest.raises(InvalidStructure, match="structure 1"):
            asyncio.run(engine.evaluate([structures[0], carbon]))
        assert_same(engine.evaluate_sync([structures[3]])[0], reference(model, [structures[3]])[0])
        assert engine.snapshot().errors == {"invalid_structure": 3}


def test_unknown_model(model: Any, structures: list[Structure]) -> None:
    with Engine(model, settings=settings()) as engine:
        with pytest.raises(UnknownModel, match="nope"):
            asyncio.run(engine.evaluate(structures[:1], model="nope"))
        with pytest.raises(UnknownModel):
            engine.model_info("nope")
        assert len(engine.evaluate_sync(structures[:2])) == 2
        snap = engine.snapshot()
    assert snap.errors == {"unknown_model": 1}
    assert snap.requests == 2


@pytest.mark.parametrize(
    "oom_error",
    [torch.cuda.OutOfMemoryError, RuntimeError, MemoryError],
    ids=["cuda", "runtime", "memory"],
)
def test_out_of_memory_splits_the_batch(model: Any, oom_error: type[BaseException]) -> None:
    small = [make_structure(8, seed=400 + i) for i in range(8)]
    big = make_structure(40, seed=499)
    faulty = Faulty(model, oom_above_atoms=30, oom_error=oom_error)
    want = reference(model, small)
    with Engine(faulty, settings=settings()) as engine:
        faulty.calls.clear()
        got = engine.evaluate_sync(small)
        for g, w in zip(got, want, strict=True):
            assert_same(g, w)
        # 8 x 8 atoms -> halves of 32 atoms (still too big) -> quarters of 16 atoms.
        assert faulty.calls == [8, 4, 2, 2, 4, 2, 2]
        assert engine.snapshot().oom_splits == 3

        # A structure too big even alone fails alone; the others of its batch succeed.
        mixed = engine.evaluate_sync([small[0], big, small[1]], return_exceptions=True)
        assert isinstance(mixed[1], OutOfMemory) and mixed[1].index == 1
        assert "40 atoms" in str(mixed[1])
        assert isinstance(mixed[0], Prediction) and isinstance(mixed[2], Prediction)
        assert_same(mixed[0], want[0])
        assert_same(mixed[2], want[1])
        assert engine.snapshot().errors == {"out_of_memory": 1}


def test_non_finite_output_fails_alone(model: Any) -> None:
    batch = [make_structure(n, seed=500 + n) for n in (5, 9, 6)]
    faulty = Faulty(model, nan_for_atoms=9)
    with Engine(faulty, settings=settings(warmup=False)) as engine:
        got = engine.evaluate_sync(batch, return_exceptions=True)
        assert faulty.calls == [3]  # one batch; the NaN is caught per structure
        assert isinstance(got[1], NonFiniteResult) and "energy" in str(got[1])
        want = reference(model, [batch[0], batch[2]])
        assert isinstance(got[0], Prediction) and isinstance(got[2], Prediction)
        assert_same(got[0], want[0])
        assert_same(got[2], want[1])
        assert engine.snapshot().errors == {"non_finite": 1}


def test_model_error_is_isolated(model: Any) -> None:
    class Broken(Faulty):
        def predict(self, structures: Sequence[Any], outputs: Outputs) -> list[Prediction]:
            self.calls.append(len(structures))
            if any(p.n_atoms == 7 for p in structures):
                raise ValueError("boom")
            return list(self.inner.predict(structures, outputs))

    batch = [make_structure(n, seed=600 + n) for n in (5, 7, 6, 8)]
    with Engine(Broken(model), settings=settings(warmup=False)) as engine:
        got = engine.evaluate_sync(batch, return_exceptions=True)
        assert isinstance(got[1], EngineError) and "boom" in str(got[1])
        assert all(isinstance(got[i], Prediction) for i in (0, 2, 3))


# -- life cycle ----------------------------------------------------------------------------------


def test_warmup_ready_and_start_failure(model: Any, structures: list[Structure]) -> None:
    faulty = Faulty(model)
    engine = Engine(faulty, settings=settings())
    assert not engine.ready
    with pytest.raises(NotReady):
        engine.submit(structures[:1])
    engine.start()
    try:
        # warm-up: an open cluster, a periodic box, a batch of four boxes (CPU: no largest batch)
        assert engine.ready and faulty.calls == [1, 1, 4]
        assert engine.snapshot().batches == 0  # warm-up is not counted as traffic
    finally:
        engine.close()
    assert not engine.ready

    broken = Engine({"missing": "/nonexistent/model.safetensors"})
    with pytest.raises(EngineError, match="failed to start"):
        broken.start(timeout=30)
    assert broken.closed
    assert not engine_threads()


def test_close_with_pending_requests(model: Any, structures: list[Structure]) -> None:
    faulty = Faulty(model)
    engine = Engine(faulty, settings=settings(batch_wait_ms=0)).start()
    faulty.block()
    running = engine.submit(structures[:1])
    assert faulty.entered.wait(10)  # the worker is now inside predict
    waiting = engine.submit(structures[1:4])
    closer = threading.Thread(target=engine.close)
    closer.start()
    for f in waiting:
        with pytest.raises(EngineClosed):
            f.result(10)
    assert closer.is_alive()  # close() waits for the batch being computed
    faulty.gate.set()
    closer.join(10)
    assert not closer.is_alive()
    assert_same(running[0].result(0), reference(model, structures[:1])[0])
    with pytest.raises(EngineClosed):
        engine.submit(structures[:1])
    assert not engine_threads()
    assert engine.snapshot().errors == {"engine_closed": 4}


def test_close_with_drain_finishes_pending(model: Any, structures: list[Structure]) -> None:
    faulty = Faulty(model)
    engine = Engine(faulty, settings=settings(batch_wait_ms=0)).start()
    faulty.block()
    first = engine.submit(structures[:1])
    assert faulty.entered.wait(10)
    rest = engine.submit(structures[1:4])
    closer = threading.Thread(target=lambda: engine.close(drain=True))
    closer.start()
    time.sleep(0.05)
    faulty.gate.set()
    closer.join(10)
    want = reference(model, structures[:4])
    for f, w in zip(first + rest, want, strict=True):
        assert_same(f.result(0), w)
    assert not engine_threads()


def test_close_races_with_submitters(model: Any, structures: list[Structure]) -> None:
    """Every accepted structure ends resolved (result or EngineClosed), none hangs."""
    engine = Engine(model, settings=settings(batch_wait_ms=1, warmup=False)).start()
    futures: list[Any] = []
    stop = threading.Event()

    def submitter() -> None:
        while not stop.is_set():
            try:
                futures.extend(engine.submit(structures[:3]))
            except EngineClosed:
                return
            except Overloaded:
                pass
            time.sleep(0.002)

    threads = [threading.Thread(target=submitter) for _ in range(3)]
    for t in threads:
        t.start()
    time.sleep(0.2)
    engine.close()
    stop.set()
    for t in threads:
        t.join(10)
    outcomes = [f.exception(10) for f in futures]
    assert all(e is None or isinstance(e, EngineClosed) for e in outcomes)
    assert any(e is None for e in outcomes)
    assert engine.snapshot().queue_depth == 0
    assert not engine_threads()


def test_overloaded_and_cancelled(model: Any, structures: list[Structure]) -> None:
    faulty = Faulty(model)
    with Engine(faulty, settings=settings(batch_wait_ms=0, max_queue=3)) as engine:
        with pytest.raises(Overloaded, match="exceeds max_queue"):
            engine.submit(structures[:4])
        faulty.block()
        busy = engine.submit(structures[:1])
        assert faulty.entered.wait(10)
        queued = engine.submit(structures[1:3])
        with pytest.raises(Overloaded, match="queue full"):
            engine.submit(structures[3:5])

        async def cancel_one() -> None:
            task = asyncio.ensure_future(engine.evaluate(structures[5:6]))
            await asyncio.sleep(0.05)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

        asyncio.run(cancel_one())
        faulty.calls.clear()
        faulty.gate.set()
        for f in busy + queued:
            assert isinstance(f.result(10), Prediction)
        time.sleep(0.05)
        assert sum(faulty.calls) == 2  # the cancelled structure was never computed
        snap = engine.snapshot()
        assert snap.errors == {"overloaded": 2, "cancelled": 1}
        assert snap.queue_depth == 0


def test_batch_bounds(model: Any) -> None:
    many = [make_structure(10, seed=700 + i) for i in range(6)]
    faulty = Faulty(model)
    max_pairs = 2 * max(model.prepare(s).n_pairs for s in many)
    want = reference(model, many)
    with Engine(faulty, settings=settings(warmup=False, max_batch_atoms=25)) as engine:
        got = engine.evaluate_sync(many)
        assert faulty.calls == [2, 2, 2]
        assert engine.snapshot().batch_atoms.max == 20
    for g, w in zip(got, want, strict=True):
        assert_same(g, w)

    faulty.calls.clear()
    faulty.pairs.clear()
    with Engine(faulty, settings=settings(warmup=False, max_batch_pairs=max_pairs)) as engine:
        got = engine.evaluate_sync(many)
    assert 1 < len(faulty.calls) < len(many)
    assert max(faulty.pairs) <= max_pairs
    for g, w in zip(got, want, strict=True):
        assert_same(g, w)


# -- small parts ---------------------------------------------------------------------------------


def test_select_batch_keeps_one_model_and_order() -> None:
    def item(model: str, n: int) -> WorkItem:
        w = WorkItem(model, make_structure(n, seed=n), 0, Outputs())
        w.cost = BatchCost(n, 10 * n)
        return w

    from collections import deque

    items = deque([item("a", 50), item("b", 3), item("a", 4), item("a", 60), item("a", 5)])
    batch, rest = select_batch(items, max_atoms=60, max_pairs=10_000)
    assert [len(i.structure) for i in batch] == [50, 4, 5]
    assert [len(i.structure) for i in rest] == [3, 60]
    # An oversized head still goes, alone.
    batch, rest = select_batch(deque([item("a", 60), item("a", 2)]), 10, 10_000)
    assert [len(i.structure) for i in batch] == [60]


def test_out_of_memory_detection_and_histogram() -> None:
    assert is_out_of_memory(torch.cuda.OutOfMemoryError("CUDA out of memory"))
    assert is_out_of_memory(RuntimeError("DefaultCPUAllocator: can't allocate memory: 8 GB"))
    assert is_out_of_memory(MemoryError())
    assert not is_out_of_memory(RuntimeError("shape mismatch"))
    assert not is_out_of_memory(ValueError("out of memory"))

    h = Histogram((1, 2, 4))
    for v in (1, 1, 3, 9):
        h.observe(v)
    snap = h.snapshot()
    assert snap.buckets == ((1.0, 2), (2.0, 2), (4.0, 3), (float("inf"), 4))
    assert snap.count == 4 and snap.sum == 14 and snap.max == 9


def test_settings_validation() -> None:
    with pytest.raises(ValueError, match="dtype"):
        EngineSettings(dtype="float16")
    with pytest.raises(ValueError, match="device"):
        EngineSettings(device="gpu")
    with pytest.raises(ValueError, match="max_batch_atoms"):
        EngineSettings(max_batch_atoms=0)
    assert EngineSettings(device="cuda:1", dtype="float32").device == "cuda:1"


def test_model_file_and_dtype(tmp_path: Any, model: Any, structures: list[Structure]) -> None:
    from cace_server.model import save_model

    path = save_model(random_model((1, 8), seed=0), tmp_path / "water.safetensors")
    want = reference(model, structures[:3])
    with Engine(str(path), settings=settings(dtype="float32")) as engine:
        assert engine.default_model == "water"
        info = engine.model_info()
        assert info.dtype == "float32" and info.source == str(path)
        got = engine.evaluate_sync(structures[:3])
    for g, w in zip(got, want, strict=True):
        assert g.energy == pytest.approx(w.energy, rel=1e-4, abs=1e-5)
        assert g.forces is not None and w.forces is not None
        np.testing.assert_allclose(g.forces, w.forces, rtol=1e-3, atol=1e-4)


# -- scheduling: lanes and admission -----------------------------------------------------------


def wait_queued(engine: Engine, n: int) -> None:
    """Until ``n`` items are prepared and waiting for the worker (order is then fixed)."""
    deadline = time.monotonic() + 30
    while len(engine._queue) < n:
        assert time.monotonic() < deadline, len(engine._queue)
        time.sleep(0.005)


def completion_order(futures: dict[str, Any]) -> list[str]:
    order: list[str] = []
    lock = threading.Lock()

    def done(name: str, _future: Any) -> None:
        with lock:
            order.append(name)

    for name, fs in futures.items():
        fs[-1].add_done_callback(lambda f, name=name: done(name, f))
    return order


def test_small_requests_are_not_starved_behind_bulk_ones(model: Any) -> None:
    """FIFO ran the 3-atom request after every bulk request queued before it."""
    faulty = Faulty(model)
    big = [make_structure(40, seed=900 + i, periodic=False) for i in range(4)]
    small = make_structure(3, seed=904, periodic=False)
    cfg = settings(batch_wait_ms=0, max_batch_atoms=32, small_request_atoms=10)
    with Engine(faulty, settings=cfg) as engine:
        faulty.block()
        futures = {"big0": engine.submit(big[0])}
        assert faulty.entered.wait(10)  # big0 is on the device
        for i in (1, 2, 3):
            futures[f"big{i}"] = engine.submit(big[i])
            wait_queued(engine, i)
        futures["small"] = engine.submit(small)
        wait_queued(engine, 4)
        order = completion_order(futures)
        faulty.gate.set()
        for fs in futures.values():
            assert isinstance(fs[0].result(30), Prediction)
    # the small request waited for the batch on the device only; bulk work then
    # continues in order
    assert order == ["big0", "small", "big1", "big2", "big3"], order


def test_ipi_goes_first_then_the_lane_that_used_less_time(model: Any) -> None:
    faulty = Faulty(model)
    cfg = settings(batch_wait_ms=0, max_batch_atoms=32, small_request_atoms=10)
    with Engine(faulty, settings=cfg) as engine:
        faulty.calls.clear()  # the warm-up
        faulty.block()
        futures = {"bulk0": engine.submit(make_structure(40, seed=910, periodic=False))}
        assert faulty.entered.wait(10)
        queued = 0
        for name, structures, lane in [
            ("bulk1", [make_structure(40, seed=911, periodic=False)], None),
            ("bulk2", [make_structure(40, seed=912, periodic=False)], None),
            ("small0", [make_structure(6, seed=913, periodic=False)], None),
            (
                "small1",
                [make_structure(30, seed=914, periodic=False)],
                "small",
            ),  # a lane may be chosen
            ("ipi", [make_structure(15, seed=915, periodic=False)] * 2, "ipi"),
        ]:
            futures[name] = engine.submit(structures, lane=lane)
            queued += len(structures)
            wait_queued(engine, queued)
        order = completion_order(futures)
        faulty.gate.set()
        for fs in futures.values():
            assert isinstance(fs[-1].result(30), Prediction)
    # i-PI's beads first (one batch), then the small lane, which has used less time
    assert faulty.calls[:2] == [1, 2]
    assert order == ["bulk0", "ipi", "small0", "small1", "bulk1", "bulk2"], order


def test_admission_counts_atoms_but_never_refuses_ipi_steps(model: Any) -> None:
    faulty = Faulty(model)
    with Engine(faulty, settings=settings(batch_wait_ms=0, max_queue_atoms=50)) as engine:
        with pytest.raises(Overloaded, match="request of 60 atoms exceeds max_queue_atoms"):
            engine.submit(make_structure(60, seed=920, periodic=False))
        faulty.block()
        running = engine.submit(make_structure(30, seed=921, periodic=False))
        assert faulty.entered.wait(10)
        queued = engine.submit(make_structure(15, seed=922, periodic=False))
        with pytest.raises(Overloaded, match="45 atoms are waiting or computing"):
            engine.submit(make_structure(10, seed=923, periodic=False))
        ipi = engine.submit(make_structure(30, seed=924, periodic=False), lane="ipi")
        assert engine.snapshot().pending_atoms == 75
        faulty.gate.set()
        for f in running + queued + ipi:
            assert isinstance(f.result(30), Prediction)
        time.sleep(0.05)
        assert engine.snapshot().pending_atoms == 0
        assert len(engine.submit(make_structure(40, seed=925, periodic=False))) == 1  # room again


def test_jobs_share_the_device_time_with_the_http_lanes(monkeypatch: Any) -> None:
    """Small, bulk and jobs lanes alternate by the worker time each has used."""
    from types import SimpleNamespace

    from cace_server.engine import batching

    now = [0.0]
    monkeypatch.setattr(batching, "time", SimpleNamespace(monotonic=lambda: now[0]))
    seconds = {Lane.SMALL: 0.5, Lane.BULK: 1.0, Lane.JOBS: 2.0}  # what each batch costs
    queue = PendingQueue()
    structure = make_structure(3, seed=930, periodic=False)
    for lane in seconds:
        items = [WorkItem("m", structure, i, Outputs(), lane) for i in range(8)]
        for item in items:
            item.cost = BatchCost(3, 10)
        queue.put_many(items)
    order = []
    for _ in range(12):
        batch = queue.take_batch(max_atoms=3, max_pairs=100)  # one item a batch
        assert batch is not None and len(batch) == 1
        order.append(batch[0].lane.value[0])
        now[0] += seconds[batch[0].lane]
    # each lane's turn comes when it has used least (ties: small, bulk, jobs)
    assert "".join(order) == "sbjssbssbjss"


def test_an_ipi_step_waits_only_for_the_job_batch_on_the_device() -> None:
    queue = PendingQueue()
    structure = make_structure(3, seed=931, periodic=False)
    jobs = [WorkItem("m", structure, i, Outputs(), Lane.JOBS) for i in range(6)]
    for item in jobs:
        item.cost = BatchCost(3, 10)
    queue.put_many(jobs)  # the jobs lane holds three full batches
    first = queue.take_batch(max_atoms=6, max_pairs=100, wait_s=10)
    assert first == jobs[:2]  # a full batch does not wait for company
    # a one-bead step of one connection: its batch closes once the bead is in
    ipi = WorkItem("m", structure, 0, Outputs(), Lane.IPI, trajectory="ipi:c0")
    ipi.step_group = StepGroup("ipi:address", 1, timeout_s=10)
    queue.put_many([ipi])
    assert queue.take_batch(max_atoms=6, max_pairs=100, wait_s=10) == [ipi]
    assert queue.take_batch(max_atoms=6, max_pairs=100, wait_s=10) == jobs[2:4]


def test_the_queue_counts_the_batches_an_ipi_step_waited_behind() -> None:
    """What ``/metrics`` shows of the lane rule: each i-PI batch waited behind the
    other lanes' batches on the device when it arrived, none taken while it waited."""
    stats = EngineStats()
    queue = PendingQueue(stats)
    structure = make_structure(3, seed=934, periodic=False)
    jobs = [WorkItem("m", structure, i, Outputs(), Lane.JOBS) for i in range(6)]
    for item in jobs:
        item.cost = BatchCost(3, 10)
    queue.put_many(jobs)

    def bead(step: int) -> WorkItem:
        item = WorkItem("m", structure, 0, Outputs(), Lane.IPI, trajectory="ipi:c0")
        item.step_group = StepGroup(f"ipi:{step}", 1, timeout_s=10)
        return item

    assert queue.take_batch(max_atoms=6, max_pairs=100) == jobs[:2]  # on the device
    first = bead(0)
    queue.put_many([first])  # arrives behind that job batch, goes before the others
    assert queue.take_batch(max_atoms=6, max_pairs=100) == [first]
    second = bead(1)
    queue.put_many([second])  # arrives while its own lane's batch computes
    assert queue.take_batch(max_atoms=6, max_pairs=100) == [second]
    assert queue.take_batch(max_atoms=6, max_pairs=100) == jobs[2:4]
    snap = stats.snapshot()
    assert snap.batches_by_lane == {"jobs": 2, "ipi": 2}
    assert snap.ipi_waited_behind == {1: 1, 0: 1}
    assert snap.ipi_waited_behind_lane == {"jobs": 1}


def test_the_jobs_lane_is_held_to_the_atom_budget(model: Any) -> None:
    with Engine(model, settings=settings(batch_wait_ms=0, max_queue_atoms=50)) as engine:
        with pytest.raises(Overloaded, match="request of 60 atoms exceeds max_queue_atoms"):
            engine.submit(make_structure(60, seed=932, periodic=False), lane="jobs")
        (future,) = engine.submit(make_structure(20, seed=933, periodic=False), lane="jobs")
        assert isinstance(future.result(30), Prediction)
