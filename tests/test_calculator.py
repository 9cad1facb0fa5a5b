"""The in-process ASE calculator: same numbers as the model, ASE's conventions."""

from __future__ import annotations

import numpy as np
from ase import Atoms
from ase.build import molecule

from cace_server.calculator import CACECalculator
from cace_server.model.build import random_model
from cace_server.structures import Structure


def test_calculator_matches_model_and_ase_stress_convention():
    model = random_model(seed=5)
    rng = np.random.default_rng(3)
    atoms = Atoms(
        "OHH" * 6,
        positions=rng.uniform(0, 6.0, size=(18, 3)),
        cell=[[6.0, 0, 0], [0.4, 6.2, 0], [0.1, 0.3, 5.9]],
        pbc=True,
    )
    atoms.calc = CACECalculator(model)
    want = model.predict([Structure.from_ase(atoms)])[0]
    assert atoms.get_potential_energy() == want.energy
    np.testing.assert_array_equal(atoms.get_forces(), want.forces)
    stress = atoms.get_stress()  # Voigt xx yy zz yz xz xy
    assert stress.shape == (6,)
    np.testing.assert_allclose(atoms.get_stress(voigt=False), want.stress, atol=1e-12)

    # ASE's stress is (1/V) dE/d(strain): check one component by finite differences.
    h = 1e-5
    energies = []
    for sign in (1, -1):
        strained = atoms.copy()
        strain = np.eye(3)
        strain[0, 0] += sign * h
        strained.set_cell(atoms.cell @ strain, scale_atoms=True)
        strained.calc = CACECalculator(model)
        energies.append(strained.get_potential_energy())
    fd = (energies[0] - energies[1]) / (2 * h) / atoms.get_volume()
    assert abs(fd - stress[0]) < 1e-6 * max(1.0, abs(fd))


def test_calculator_without_cell_gives_no_stress_but_forces():
    atoms = molecule("H2O")
    atoms.calc = CACECalculator(random_model(seed=2))
    assert np.isfinite(atoms.get_potential_energy())
    assert atoms.get_forces().shape == (3, 3)
    assert "stress" not in atoms.calc.results
