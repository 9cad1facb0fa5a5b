"""Message passing and blocking: exact derivatives, blocked == whole, no host syncs,
and totals accumulated in float64."""

from __future__ import annotations

import collections
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from cace_server.model import random_model
from cace_server.model.neighbors import collate
from cace_server.model.potential import CACEPotential
from cace_server.structures import Structure

# Two message-passing layers, every kind of message; node memory without the radial
# message; and B-chi only with shared weights (the published cacefit / cace-lr-fit
# models use B-chi only, whose A never leaves its block of receivers).
MP_MODELS = {
    "all-kinds": dict(seed=21, elements=(1, 6, 8), num_message_passing=2, n_atom_basis=2),
    "memory-bchi": dict(
        seed=23,
        num_message_passing=2,
        message_passing=dict(memory=True, radial=False, bchi=True),
    ),
    "bchi-shared": dict(
        seed=22,
        num_message_passing=2,
        max_nu=4,
        message_passing=dict(
            memory=False,
            radial=False,
            bchi=True,
            bchi_hidden=[8],
            bchi_shared_channels=True,
            bchi_shared_l=True,
        ),
    ),
}


def _model(name: str) -> CACEPotential:
    from cace_server.model.config import MessagePassingConfig

    kwargs = dict(MP_MODELS[name])
    if "message_passing" in kwargs:
        kwargs["message_passing"] = MessagePassingConfig(**kwargs["message_passing"])  # type: ignore[arg-type]
    return random_model(**kwargs)  # type: ignore[arg-type]


@pytest.fixture(scope="module", params=sorted(MP_MODELS))
def mp_model(request) -> CACEPotential:
    return _model(request.param)


def _box(model: CACEPotential, n: int, seed: int) -> Structure:
    rng = np.random.default_rng(seed)
    cell = np.array([[7.0, 0.0, 0.0], [0.8, 6.5, 0.0], [-0.5, 0.6, 7.2]])
    positions: list[np.ndarray] = []
    while len(positions) < n:
        p = rng.random(3) @ cell
        if all(np.linalg.norm(p - q) > 1.0 for q in positions):
            positions.append(p)
    numbers = rng.choice(list(model.elements), size=n)
    return Structure.create(numbers, np.array(positions), cell, True)


@contextmanager
def forced_blocks(model: CACEPotential, block: int) -> Iterator[None]:
    rep = model.representation
    old = rep.atom_block, rep.block_above
    rep.atom_block, rep.block_above = block, 0
    try:
        yield
    finally:
        rep.atom_block, rep.block_above = old


def _energy(model: CACEPotential, s: Structure, positions: np.ndarray, cell: np.ndarray) -> float:
    return model.predict([Structure.create(s.numbers, positions, cell, s.pbc)], ["energy"])[
        0
    ].energy


def test_forces_and_stress_by_finite_differences(mp_model):
    """Unblocked (the default path); the blocked path equals it (test below)."""
    s = _box(mp_model, 14, seed=31)
    p = mp_model.predict([s])[0]
    rng = np.random.default_rng(32)
    h = 1e-5
    for atom in rng.choice(len(s), size=1, replace=False):
        for axis in range(3):
            plus, minus = s.positions.copy(), s.positions.copy()
            plus[atom, axis] += h
            minus[atom, axis] -= h
            fd = (_energy(mp_model, s, plus, s.cell) - _energy(mp_model, s, minus, s.cell)) / (
                2 * h
            )
            assert abs(p.forces[atom, axis] + fd) < 1e-6, (atom, axis)
    h = 1e-6
    for i, j in [(0, 0), (1, 2)]:
        values = []
        for sign in (1, -1):
            eps = np.zeros((3, 3))
            eps[i, j] += sign * h / 2
            eps[j, i] += sign * h / 2
            deform = np.eye(3) + eps
            values.append(_energy(mp_model, s, s.positions @ deform, s.cell @ deform))
        fd = (values[0] - values[1]) / (2 * h) / s.volume
        assert abs(p.stress[i, j] - fd) < 1e-7, (i, j)


def test_blocked_equals_whole_including_training_gradients(mp_model):
    """Blocks of 4 receivers (many blocks, ragged last one) give the same energy, forces,
    virial and, through the trainer's double backward, the same parameter gradients."""
    structures = [_box(mp_model, 13, seed=41), _box(mp_model, 9, seed=42)]
    batch = collate([mp_model.prepare(s) for s in structures], mp_model.device)
    params = [p for p in mp_model.parameters()]

    def run() -> tuple[torch.Tensor, ...]:
        for p in params:
            p.requires_grad_(True)
        try:
            out = mp_model.compute(batch, create_graph=True)
            assert out.forces is not None and out.virial is not None
            loss = out.energy.sum() + (out.forces**2).sum() + (out.virial**2).sum()
            grads = torch.autograd.grad(loss, params, allow_unused=True)
        finally:
            for p in params:
                p.requires_grad_(False)
        flat = torch.cat([g.flatten() for g in grads if g is not None])
        return out.energy.detach(), out.forces.detach(), out.virial.detach(), flat

    whole = run()
    with forced_blocks(mp_model, 4):
        blocked = run()
    for w, b in zip(whole, blocked, strict=True):
        torch.testing.assert_close(b, w, rtol=1e-10, atol=1e-10)


class _OpCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        self.ops[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("layers", [0, 2])
def test_unblocked_representation_never_reads_back_from_the_device(layers):
    model = random_model(seed=5, num_message_passing=layers)
    batch = collate([model.prepare(_box(model, 12, seed=s)) for s in (1, 2, 3)], model.device)
    rep = model.representation
    assert rep.block_size(int(batch.species.shape[0]), batch.species.device) is None
    vectors = torch.randn(batch.receivers.shape[0], 3, dtype=torch.float64) + 2.0
    with _OpCounter() as counter:
        rep(
            vectors.requires_grad_(True),
            batch.species,
            batch.receivers,
            batch.senders,
            max_neighbors=batch.max_neighbors,
        ).sum().backward()
    syncs = {k: v for k, v in counter.ops.items() if "local_scalar" in k or "item" in k}
    assert not syncs, syncs


def test_total_energy_is_accumulated_in_float64():
    """12,288 atoms with large reference energies: the float32 model's total equals the
    float64 sum of its float32 per-atom energies (a float32 sum is off by ~1e-2 eV)."""
    model = random_model(
        seed=7,
        dtype="float32",
        cutoff=2.2,
        n_radial=2,
        max_l=1,
        max_nu=2,
        atomic_energies={1: -13.6123, 8: -2041.3437},
    )
    # 16 x 16 x 48 simple cubic lattice, 1.5 Å apart, slightly shaken: 12,288 atoms.
    grid = np.stack(np.meshgrid(np.arange(16), np.arange(16), np.arange(48), indexing="ij"), -1)
    positions = grid.reshape(-1, 3) * 1.5
    rng = np.random.default_rng(3)
    numbers = rng.choice([1, 8], size=len(positions))
    positions = positions + rng.normal(0, 0.02, positions.shape)
    s = Structure.create(numbers, positions, np.diag([24.0, 24.0, 72.0]), True)
    assert len(s) == 12288
    batch = collate([model.prepare(s)], model.device)
    with torch.no_grad():
        out = model.compute(batch, forces=False, virial=False)
    assert out.energy.dtype == torch.float64
    assert out.atom_energy.dtype == torch.float32
    exact = out.atom_energy.double().sum().item()
    assert abs(out.energy.item() - exact) < 1e-6
    assert abs(out.atom_energy.sum().item() - exact) > 1e-4  # what a float32 total loses
