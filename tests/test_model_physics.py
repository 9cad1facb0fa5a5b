"""Physical consistency of the model on random models of several shapes."""

from __future__ import annotations

import numpy as np
import pytest
from ase import Atoms
from scipy.spatial.transform import Rotation

from cace_server.model import random_model
from cace_server.structures import Structure, StructureError

MODELS = {
    "local": dict(seed=1),
    "local-embed": dict(
        seed=2, elements=(1, 6, 7, 8), n_atom_basis=2, embed_receiver=False, max_l=2
    ),
    "mp-nu4": dict(seed=3, num_message_passing=2, max_nu=4, trainable_rbf=False),
    "long-range": dict(seed=4, long_range=True),
}


@pytest.fixture(scope="module", params=sorted(MODELS))
def model(request):
    return random_model(**MODELS[request.param])


def random_structure(
    rng: np.random.Generator,
    elements,
    n: int,
    cell: np.ndarray | None,
    pbc,
    min_dist: float = 0.9,
) -> Structure:
    box = cell if cell is not None else np.eye(3) * 5.0
    positions: list[np.ndarray] = []
    while len(positions) < n:
        p = rng.random(3) @ box
        if all(np.linalg.norm(p - q) > min_dist for q in positions):
            positions.append(p)
    numbers = rng.choice(elements, size=n)
    return Structure.create(numbers, np.array(positions), cell, pbc)


TRICLINIC = np.array([[6.0, 0.0, 0.0], [1.2, 5.5, 0.0], [-0.7, 0.9, 6.3]])


def structures_for(model, rng) -> list[Structure]:
    el = list(model.elements)
    if model.has_charges:  # Ewald needs fully periodic or fully open structures
        return [
            random_structure(rng, el, 10, TRICLINIC, True),
            random_structure(rng, el, 7, None, False),
        ]
    return [
        random_structure(rng, el, 10, TRICLINIC, True),
        random_structure(rng, el, 7, None, False),
        random_structure(rng, el, 9, np.diag([5.0, 6.0, 7.0]), [True, False, True]),
    ]


def test_rotation_translation_invariance(model):
    rng = np.random.default_rng(10)
    rot = Rotation.random(random_state=11).as_matrix()
    for s in structures_for(model, rng):
        p = model.predict([s])[0]
        moved = Structure.create(
            s.numbers, s.positions @ rot.T + np.array([0.3, -1.1, 2.0]), s.cell @ rot.T, s.pbc
        )
        q = model.predict([moved])[0]
        assert abs(p.energy - q.energy) < 1e-9 * max(1.0, abs(p.energy))
        np.testing.assert_allclose(q.forces, p.forces @ rot.T, atol=1e-9)
        if p.stress is not None:
            np.testing.assert_allclose(q.stress, rot @ p.stress @ rot.T, atol=1e-10)


def test_permutation_invariance(model):
    rng = np.random.default_rng(12)
    for s in structures_for(model, rng):
        perm = rng.permutation(len(s))
        p = model.predict([s])[0]
        q = model.predict([Structure.create(s.numbers[perm], s.positions[perm], s.cell, s.pbc)])[0]
        assert abs(p.energy - q.energy) < 1e-9 * max(1.0, abs(p.energy))
        np.testing.assert_allclose(q.forces, p.forces[perm], atol=1e-9)


def _energy(model, numbers, positions, cell, pbc) -> float:
    return model.predict([Structure.create(numbers, positions, cell, pbc)], ["energy"])[0].energy


def test_forces_are_minus_energy_gradient(model):
    rng = np.random.default_rng(13)
    h = 1e-5
    for s in structures_for(model, rng):
        forces = model.predict([s])[0].forces
        for atom in rng.choice(len(s), size=3, replace=False):
            for axis in range(3):
                plus, minus = s.positions.copy(), s.positions.copy()
                plus[atom, axis] += h
                minus[atom, axis] -= h
                fd = (
                    _energy(model, s.numbers, plus, s.cell, s.pbc)
                    - _energy(model, s.numbers, minus, s.cell, s.pbc)
                ) / (2 * h)
                assert abs(forces[atom, axis] + fd) < 1e-6, (atom, axis)


def test_stress_is_strain_derivative(model):
    rng = np.random.default_rng(14)
    s = structures_for(model, rng)[0]  # triclinic, periodic
    p = model.predict([s])[0]
    h = 1e-6
    for i, j in [(0, 0), (1, 1), (2, 2), (0, 1), (1, 2), (0, 2)]:
        values = []
        for sign in (1, -1):
            eps = np.zeros((3, 3))
            eps[i, j] += sign * h / 2
            eps[j, i] += sign * h / 2
            deform = np.eye(3) + eps
            values.append(_energy(model, s.numbers, s.positions @ deform, s.cell @ deform, s.pbc))
        fd = (values[0] - values[1]) / (2 * h) / s.volume
        assert abs(p.stress[i, j] - fd) < 1e-7, (i, j)
    np.testing.assert_allclose(p.virial, -p.stress * s.volume, atol=1e-12)


def test_batch_equals_one_by_one(model):
    rng = np.random.default_rng(15)
    structures = structures_for(model, rng) + structures_for(model, rng)
    batched = model.predict(structures)
    for s, b in zip(structures, batched, strict=True):
        single = model.predict([s])[0]
        assert abs(single.energy - b.energy) < 1e-10 * max(1.0, abs(b.energy))
        np.testing.assert_allclose(b.forces, single.forces, atol=1e-10)
        if single.stress is not None:
            np.testing.assert_allclose(b.stress, single.stress, atol=1e-12)


def test_grouped_prediction_keeps_order_and_values(model):
    """``predict`` splits a batch into groups of ``group_atoms``; results stay in order."""
    rng = np.random.default_rng(17)
    structures = structures_for(model, rng) + structures_for(model, rng)
    whole = model.predict(structures)
    old = model.group_atoms
    try:
        model.group_atoms = max(len(s) for s in structures)
        assert len(model._groups([model.prepare(s) for s in structures])) > 1
        grouped = model.predict(structures)
    finally:
        model.group_atoms = old
    for w, g in zip(whole, grouped, strict=True):
        assert abs(w.energy - g.energy) < 1e-10 * max(1.0, abs(w.energy))
        np.testing.assert_allclose(g.forces, w.forces, atol=1e-10)


def test_blocked_evaluation_equals_whole(model):
    """The memory-bounded block path gives the same numbers as one block."""
    rng = np.random.default_rng(16)
    s = random_structure(rng, list(model.elements), 40, np.eye(3) * 9.0, True)
    whole = model.predict([s])[0]
    rep = model.representation
    old = rep.atom_block, rep.block_above, getattr(model.ewald, "element_budget", None)
    try:
        model.representation.atom_block = 7
        model.representation.block_above = 0
        if model.ewald is not None:
            model.ewald.element_budget = 9 * 40  # a few atoms per block
        blocked = model.predict([s])[0]
    finally:
        rep.atom_block, rep.block_above = old[0], old[1]
        if model.ewald is not None:
            model.ewald.element_budget = old[2]
    assert abs(whole.energy - blocked.energy) < 1e-10 * max(1.0, abs(whole.energy))
    np.testing.assert_allclose(blocked.forces, whole.forces, atol=1e-10)
    np.testing.assert_allclose(blocked.stress, whole.stress, atol=1e-12)


def test_supercell_energy_per_atom(model):
    if model.has_charges:
        pytest.skip(
            "the Ewald sum's k-grid depends on the cell size; only short-range models tile exactly"
        )
    rng = np.random.default_rng(17)
    s = random_structure(rng, list(model.elements), 6, np.diag([4.0, 4.5, 5.0]), True)
    atoms = Atoms(numbers=s.numbers, positions=s.positions, cell=s.cell, pbc=True)
    big = atoms.repeat((2, 1, 3))
    p = model.predict([s])[0]
    q = model.predict([Structure.from_ase(big)])[0]
    assert abs(p.energy / len(s) - q.energy / len(big)) < 1e-10
    np.testing.assert_allclose(q.forces[: len(s)], p.forces, atol=1e-10)
    np.testing.assert_allclose(q.stress, p.stress, atol=1e-12)


def test_float32_close_to_float64():
    m64 = random_model(seed=5, long_range=True)
    m32 = random_model(seed=5, long_range=True, dtype="float32")
    s = random_structure(np.random.default_rng(18), [1, 8], 12, TRICLINIC, True)
    a, b = m64.predict([s])[0], m32.predict([s])[0]
    assert abs(a.energy - b.energy) < 1e-4 * max(1.0, abs(a.energy))
    np.testing.assert_allclose(b.forces, a.forces, atol=1e-4)


def test_bad_structures_are_refused_clearly():
    model = random_model(seed=0)
    with pytest.raises(StructureError, match="Cl"):
        model.predict([Structure.create([1, 17], [[0, 0, 0], [1, 0, 0]])])
    with pytest.raises(StructureError, match="no atoms"):
        Structure.create([], np.zeros((0, 3)))
    with pytest.raises(StructureError, match="NaN"):
        Structure.create([1, 8], [[0, 0, 0], [np.nan, 0, 0]])
    with pytest.raises(StructureError, match="shape"):
        Structure.create([1, 8], [[0, 0, 0]])
    with pytest.raises(StructureError, match=r"singular|zero"):
        Structure.create([1, 8], [[0, 0, 0], [1, 0, 0]], np.zeros((3, 3)), True)
    lr = random_model(seed=0, long_range=True)
    with pytest.raises(StructureError, match="periodic in all three"):
        lr.predict(
            [Structure.create([1, 8], [[0, 0, 0], [1, 0, 0]], np.eye(3) * 5, [True, True, False])]
        )


def test_isolated_atoms_have_energy_and_zero_forces():
    """No neighbour pairs at all: the energy is the atoms' own, forces and virial zero."""
    for model in (random_model(seed=0), random_model(seed=0, long_range=True)):
        p = model.predict([Structure.create([8], [[0.0, 0.0, 0.0]])])[0]
        assert np.isfinite(p.energy)
        assert np.all(p.forces == 0.0) and np.all(p.virial == 0.0)


def test_geometry_that_would_crash_the_neighbour_list_is_refused():
    """vesin's cell list divides by zero on extremely elongated cells: refuse them first."""
    model = random_model(seed=0)
    long_thin = Structure.create([1, 8], [[0, 0, 0], [1, 0, 0]], np.diag([1e6, 1.0, 1.0]), True)
    with pytest.raises(StructureError, match="too elongated"):
        model.predict([long_thin])
