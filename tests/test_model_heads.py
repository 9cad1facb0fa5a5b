"""Heads on the representation: weighted energy sums, multi-channel charges, dipoles
and Born effective charges, descriptors; one representation pass per batch."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cace_server.model import random_model
from cace_server.model.config import EwaldConfig, PolarizationConfig, ReadoutConfig
from cace_server.model.representation import CACERepresentation
from cace_server.structures import Structure


def WITH_BEC(model):
    return model.default_outputs | {"bec"}


def _water(seed: int = 0, periodic: bool = False, n: int = 4) -> Structure:
    rng = np.random.default_rng(seed)
    centres = rng.uniform(0, 6.0, (n, 3))
    positions = []
    for c in centres:
        positions += [c, c + np.array([0.96, 0.0, 0.0]), c + np.array([-0.24, 0.93, 0.0])]
    numbers = [8, 1, 1] * n
    if periodic:
        return Structure.create(numbers, np.array(positions), np.eye(3) * 7.0, True)
    return Structure.create(numbers, np.array(positions))


def _dipole_model(periodic_form: bool = True, **kw):
    readouts = [
        ReadoutConfig(name="energy", hidden=[8]),
        ReadoutConfig(name="q", kind="charge", hidden=[8]),
    ]
    return random_model(
        readouts=readouts,
        ewald=EwaldConfig(charge_readout="q"),
        polarization=PolarizationConfig(charge_readout="q", periodic=periodic_form, bec=True),
        **kw,
    )


def test_one_representation_pass_for_every_head() -> None:
    """Energy, long-range and dipole heads share one representation evaluation."""
    model = _dipole_model()
    assert sum(isinstance(m, CACERepresentation) for m in model.modules()) == 1
    calls = []
    handle = model.representation.register_forward_hook(lambda *a: calls.append(1))
    try:
        model.predict([_water(1), _water(2), _water(3, periodic=True)], WITH_BEC(model))
    finally:
        handle.remove()
    assert len(calls) == 1


def test_bec_is_the_derivative_of_the_open_dipole() -> None:
    model = _dipole_model()
    s = _water(4)
    pred = model.predict([s], WITH_BEC(model))[0]
    assert pred.bec is not None and pred.dipole is not None
    h = 1e-5
    for atom, axis in [(0, 0), (1, 2), (5, 1)]:
        plus, minus = s.positions.copy(), s.positions.copy()
        plus[atom, axis] += h
        minus[atom, axis] -= h
        dp = model.predict([Structure.create(s.numbers, plus)])[0].dipole
        dm = model.predict([Structure.create(s.numbers, minus)])[0].dipole
        fd = (dp - dm) / (2 * h)
        np.testing.assert_allclose(pred.bec[atom, axis], fd, atol=1e-7)


def test_bec_acoustic_sum_rule_and_rotation() -> None:
    """Mean-free charges: sum_i Z_i = 0; Z rotates as a rank-2 tensor."""
    model = _dipole_model()
    s = _water(5)
    pred = model.predict([s], WITH_BEC(model))[0]
    np.testing.assert_allclose(pred.bec.sum(axis=0), 0.0, atol=1e-10)
    angle = 0.7
    rot = np.array(
        [[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1.0]]
    )
    rotated = model.predict([Structure.create(s.numbers, s.positions @ rot.T)], WITH_BEC(model))[0]
    np.testing.assert_allclose(rotated.dipole, rot @ pred.dipole, atol=1e-10)
    expected = np.einsum("ab,nbc,dc->nad", rot, pred.bec, rot)
    np.testing.assert_allclose(rotated.bec, expected, atol=1e-9)


def test_periodic_dipole_is_the_berry_phase_form() -> None:
    """P = normalization * cell @ S / (2 pi i), S_b = sum_i (q_i - <q>) exp(2 pi i s_ib);
    the dipole is its real part, and the BEC comes only on request."""
    model = _dipole_model()
    s = _water(6, periodic=True)
    pred = model.predict([s])[0]
    assert pred.bec is None
    q = pred.charges * model.charge_unit
    q = q - q.mean()
    frac = s.positions @ np.linalg.inv(s.cell)
    big_s = (q[:, None] * np.exp(2j * np.pi * frac)).sum(axis=0)
    p = model.config.polarization.normalization * (s.cell @ big_s) / (2j * np.pi)
    np.testing.assert_allclose(pred.dipole, p.real, atol=1e-12)


def test_batched_heads_equal_one_by_one() -> None:
    model = _dipole_model()
    structures = [_water(7), _water(8, periodic=True), _water(9, n=3)]
    together = model.predict(structures, model.outputs)
    for s, t in zip(structures, together, strict=True):
        alone = model.predict([s], model.outputs)[0]
        assert t.energy == pytest.approx(alone.energy, abs=1e-10)
        np.testing.assert_allclose(t.forces, alone.forces, atol=1e-10)
        np.testing.assert_allclose(t.dipole, alone.dipole, atol=1e-10)
        np.testing.assert_allclose(t.bec, alone.bec, atol=1e-10)
        np.testing.assert_allclose(t.charges, alone.charges, atol=1e-12)
        np.testing.assert_allclose(t.descriptors, alone.descriptors, atol=1e-12)


def test_weighted_heads_and_multichannel_charges() -> None:
    """Energy = sum of weighted heads; several charge channels add their Ewald sums."""
    base = dict(
        readouts=[
            ReadoutConfig(name="energy", hidden=[8], weight=0.5),
            ReadoutConfig(name="q", kind="charge", hidden=[8], n_out=3),
        ],
        ewald=EwaldConfig(charge_readout="q", weight=0.01),
    )
    model = random_model(**base)
    s = _water(10, periodic=True)
    pred = model.predict([s])[0]
    assert pred.charges.shape == (len(s), 3)
    # Same weights with the long-range term switched off -> the short-range part.
    model.config.ewald.weight = 0.0
    sr = model.predict([s])[0].energy
    model.config.ewald.weight = 1.0
    full = model.predict([s])[0].energy
    assert pred.energy == pytest.approx(sr + 0.01 * (full - sr), rel=1e-12)
    # Forces are still the gradient of the weighted energy.
    model.config.ewald.weight = 0.01
    h = 1e-5
    plus, minus = s.positions.copy(), s.positions.copy()
    plus[2, 1] += h
    minus[2, 1] -= h
    e_plus = model.predict([Structure.create(s.numbers, plus, s.cell, s.pbc)])[0].energy
    e_minus = model.predict([Structure.create(s.numbers, minus, s.cell, s.pbc)])[0].energy
    assert pred.forces[2, 1] == pytest.approx(-(e_plus - e_minus) / (2 * h), abs=1e-7)


def test_outputs_and_description() -> None:
    model = _dipole_model()
    assert set(model.outputs) >= {"energy", "forces", "charges", "dipole", "bec"}
    d = model.describe()
    assert d["long_range"]["kind"] == "ewald"
    assert "bec" in d["outputs"]
    plain = random_model()
    assert "dipole" not in plain.outputs and "charges" not in plain.outputs


def test_descriptors_are_the_heads_input() -> None:
    model = random_model()
    s = _water(11)
    pred = model.predict([s], model.default_outputs | {"descriptors"})[0]
    assert pred.descriptors.shape == (len(s), model.representation.n_features)
    head = model.readouts["energy"]
    x = torch.as_tensor(pred.descriptors, dtype=model.dtype)
    np.testing.assert_allclose(head(x).sum().item(), pred.energy, rtol=1e-12)
