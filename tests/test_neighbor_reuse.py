"""Verlet lists and device-built neighbour lists give the forces of fresh lists.

The device path (torch tensors through vesin) runs here on CPU tensors: the same
code a CUDA model runs, on the CPU.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cace_server.model import random_model
from cace_server.model.neighbors import VerletList, prepare_structure
from cace_server.model.radial import PolynomialCutoff
from cace_server.structures import Structure

TOL = 1e-10  # eV/Å, float64


def water_like(seed: int, n: int = 48, length: float = 7.5) -> Structure:
    rng = np.random.default_rng(seed)
    side = int(np.ceil(n ** (1 / 3)))
    grid = np.array([(i, j, k) for i in range(side) for j in range(side) for k in range(side)])[:n]
    positions = (grid + rng.uniform(-0.15, 0.15, (n, 3))) * (length / side)
    return Structure.create(np.tile([8, 1, 1], n // 3), positions, np.eye(3) * length, True)


def moved(s: Structure, rng: np.random.Generator, step: float) -> Structure:
    return Structure.create(s.numbers, s.positions + rng.normal(0, step, s.positions.shape),
                            s.cell, s.pbc)  # fmt: skip


def pair_set(prepared) -> set[tuple[int, int, int, int, int]]:
    arrays = [
        np.asarray(a.cpu() if isinstance(a, torch.Tensor) else a)
        for a in (prepared.receivers, prepared.senders, prepared.unit_shifts)
    ]
    r, s, sh = arrays
    return {(int(a), int(b), *map(int, c)) for a, b, c in zip(r, s, sh, strict=True)}


def test_cutoff_function_and_its_derivative_are_exactly_zero_beyond_the_cutoff() -> None:
    cutoff = PolynomialCutoff(5.0, 6)
    r = torch.tensor([5.0, 5.0 + 1e-12, 5.3, 7.0], dtype=torch.float64, requires_grad=True)
    value = cutoff(r)
    (grad,) = torch.autograd.grad(value.sum(), r)
    assert torch.all(value == 0) and torch.all(grad == 0)


@pytest.mark.parametrize("device", [None, torch.device("cpu")], ids=["numpy", "torch-tensors"])
def test_verlet_list_reuse_gives_the_forces_of_fresh_lists(device: torch.device | None) -> None:
    model = random_model((1, 8), seed=11, dtype="float64", cutoff=3.5)
    skin = 0.6
    verlet = VerletList(model.elements, model.cutoff, skin, device)
    rng = np.random.default_rng(0)
    s = water_like(1)
    reused = []
    for _ in range(8):
        s = moved(s, rng, 0.02)  # beads move little per step
        prepared, was_reused = verlet.prepare(s)
        reused.append(was_reused)
        fresh = prepare_structure(s, model.elements, model.cutoff)
        if device is None:  # on the CPU the reused list is cut back to the cutoff
            assert pair_set(prepared) == pair_set(fresh)
        else:  # on a device it keeps the skin pairs, which contribute exactly zero
            assert pair_set(prepared) >= pair_set(fresh)
        got, want = model.predict([prepared])[0], model.predict([fresh])[0]
        assert abs(got.energy - want.energy) <= TOL
        np.testing.assert_allclose(got.forces, want.forces, rtol=0, atol=TOL)
        np.testing.assert_allclose(got.stress, want.stress, rtol=0, atol=TOL)
    assert reused[0] is False and any(reused)
    assert verlet.builds + verlet.reuses == 8 and verlet.builds < 8


def test_verlet_list_rebuilds_when_needed() -> None:
    model = random_model((1, 8), seed=11, dtype="float64", cutoff=3.5)
    verlet = VerletList(model.elements, model.cutoff, 0.4)
    s = water_like(2)
    assert verlet.prepare(s)[1] is False
    assert verlet.prepare(s)[1] is True
    # one atom moves just over half the skin: rebuild
    positions = s.positions.copy()
    positions[5, 0] += 0.21
    far = Structure.create(s.numbers, positions, s.cell, s.pbc)
    assert verlet.prepare(far)[1] is False
    # the cell changes (NPT): rebuild
    squeezed = Structure.create(far.numbers, far.positions, far.cell * 0.999, True)
    assert verlet.prepare(squeezed)[1] is False
    assert verlet.prepare(squeezed)[1] is True
    # another structure (different species): rebuild
    swapped = Structure.create(squeezed.numbers[::-1], squeezed.positions, squeezed.cell, True)
    assert verlet.prepare(swapped)[1] is False
    assert verlet.builds == 4 and verlet.reuses == 2


def test_device_built_lists_equal_host_lists() -> None:
    model = random_model((1, 8), seed=5, dtype="float64", cutoff=3.5, long_range=True)
    structures = [water_like(k) for k in range(3)]
    host = [prepare_structure(s, model.elements, model.cutoff) for s in structures]
    device = [
        prepare_structure(s, model.elements, model.cutoff, torch.device("cpu")) for s in structures
    ]
    for h, d in zip(host, device, strict=True):
        assert isinstance(d.receivers, torch.Tensor)
        assert torch.all(d.receivers[1:] >= d.receivers[:-1])  # sorted by receiver
        assert pair_set(h) == pair_set(d)
    for got, want in zip(model.predict(device), model.predict(host), strict=True):
        assert abs(got.energy - want.energy) <= TOL
        np.testing.assert_allclose(got.forces, want.forces, rtol=0, atol=TOL)


def test_one_connection_serving_several_beads_keeps_a_list_for_each() -> None:
    from cace_server.engine.stats import EngineStats
    from cace_server.engine.trajectories import TrajectoryLists

    model = random_model((1, 8), seed=11, dtype="float64", cutoff=3.5)
    stats = EngineStats()
    lists = TrajectoryLists(skin=0.4, max_neighbor_lists=16, stats=stats)
    rng = np.random.default_rng(3)
    beads = [moved(water_like(1), rng, 0.3) for _ in range(4)]  # far apart from each other
    for _step in range(3):  # i-PI sends bead 0, 1, 2, 3 over the one connection, each step
        beads = [moved(b, rng, 0.01) for b in beads]
        for b in beads:
            prepared = lists.prepare("m", model, "ipi:c0", 0, b)
            fresh = prepare_structure(b, model.elements, model.cutoff)
            assert pair_set(prepared) == pair_set(fresh)
    snap = stats.snapshot()
    assert (snap.neighbor_lists_built, snap.neighbor_lists_reused) == (4, 8)


def test_a_job_keeps_each_structures_list_under_its_slot_and_forgets_them() -> None:
    """A job's live set shrinks and reorders: ``slots`` (its structure indices) keep
    each structure's Verlet list; ``forget_trajectory`` drops them when it ends."""
    from cace_server.engine import Engine, EngineSettings

    model = random_model((1, 8), seed=11, dtype="float64", cutoff=3.5)
    rng = np.random.default_rng(4)
    a, b = water_like(1), water_like(2, n=36, length=6.5)
    settings = EngineSettings(dtype="float64", neighbor_skin=0.5, batch_wait_ms=0)
    with Engine(model, settings=settings) as engine:

        def run(structures: list[Structure], slots: list[int] | None) -> tuple[int, int]:
            before = engine.snapshot()
            futures = engine.submit(structures, lane="jobs", trajectory="job:1", slots=slots)
            for s, future in zip(structures, futures, strict=True):
                got = future.result(60)
                fresh = model.predict([prepare_structure(s, model.elements, model.cutoff)])[0]
                np.testing.assert_allclose(got.forces, fresh.forces, rtol=0, atol=TOL)
                assert got.cost is not None and got.cost.atoms == len(s) and got.cost.pairs > 0
            after = engine.snapshot()
            return (
                after.neighbor_lists_built - before.neighbor_lists_built,
                after.neighbor_lists_reused - before.neighbor_lists_reused,
            )

        def step() -> None:
            nonlocal a, b
            a, b = moved(a, rng, 0.01), moved(b, rng, 0.01)

        assert run([a, b], [0, 1]) == (2, 0)
        step()
        assert run([b, a], [1, 0]) == (0, 2)  # positions swapped, slots kept
        step()
        assert run([a], [0]) == (0, 1)  # b finished; a is now at position 0 alone
        with pytest.raises(ValueError, match="1 slots for 2 structures"):
            engine.submit([a, b], trajectory="job:1", slots=[0])
        step()
        assert run([b, a], None) == (2, 0)  # by position, each meets the other's list
        assert "job:1" in engine._trajectories.species(engine.default_model)
        engine.forget_trajectory("job:1")
        assert len(engine._trajectories) == 0 and not engine._trajectories.species(
            engine.default_model
        )
        step()
        assert run([a, b], [0, 1]) == (2, 0)  # forgotten: built anew
