"""The long-range module: parity with the original's k-sum, batching without host reads,
the smooth mode's continuity in the cell, and the mesh back end's error."""

from __future__ import annotations

import contextlib
import itertools
import math

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from cace_server.model.config import EwaldConfig
from cace_server.model.longrange import EwaldSum, LongRangeOptions
from cace_server.structures import Structure, StructureError

TRICLINIC = np.array([[7.0, 0.0, 0.0], [1.3, 6.4, 0.0], [-0.8, 0.7, 7.6]])


def naive_kspace(r: np.ndarray, q: np.ndarray, cell: np.ndarray, dl: float, sigma: float) -> float:
    """The original's k-set written out: every n in the box, one of each +-k, exp(i k.r)."""
    recip = 2 * np.pi * np.linalg.inv(cell).T
    nk = [max(1, int(np.linalg.norm(a) / dl)) for a in cell]
    k_max_sq = (2 * np.pi / dl) ** 2
    q = q.reshape(len(r), -1)
    total = 0.0
    for n in itertools.product(*(range(-m, m + 1) for m in nk)):
        first = next((x for x in n if x != 0), 0)
        if first <= 0:
            continue  # k = 0, or the partner of a kept vector
        k = np.asarray(n, dtype=float) @ recip
        k_sq = float(k @ k)
        if k_sq > k_max_sq:
            continue
        s = (q * np.exp(1j * (r @ k))[:, None]).sum(axis=0)
        total += 2 * math.exp(-0.5 * sigma**2 * k_sq) / k_sq * float((np.abs(s) ** 2).sum())
    return total / abs(np.linalg.det(cell))


def random_system(rng: np.random.Generator, n: int, cell: np.ndarray, channels: int = 0):
    r = rng.uniform(-0.2, 1.2, size=(n, 3)) @ cell  # some atoms outside the cell
    q = rng.normal(size=(n, channels) if channels else n)
    return r, q


def ewald(**options) -> EwaldSum:
    return EwaldSum(EwaldConfig(dl=2.0, sigma=1.0), LongRangeOptions(**options))


def energies(module: EwaldSum, systems, pbc=True) -> torch.Tensor:
    r = torch.as_tensor(np.concatenate([s[0] for s in systems]))
    q = torch.as_tensor(np.concatenate([s[1] for s in systems]))
    cells = np.stack([s[2] for s in systems])
    pbc_rows = np.array([[pbc] * 3] * len(systems))
    plan = module.plan(cells, pbc_rows, [len(s[0]) for s in systems])
    return module(r, q, torch.as_tensor(cells), plan=plan)


@pytest.mark.parametrize("channels", [0, 2])
def test_direct_equals_the_original_k_sum(channels):
    rng = np.random.default_rng(1)
    r, q = random_system(rng, 15, TRICLINIC, channels)
    got = float(energies(ewald(method="direct"), [(r, q, TRICLINIC)])[0])
    assert got == pytest.approx(naive_kspace(r, q, TRICLINIC, 2.0, 1.0), rel=1e-12)
    # with the self-interaction removed, the Gaussian self-energy is subtracted
    module = EwaldSum(EwaldConfig(dl=2.0, sigma=1.0, remove_self_interaction=True))
    removed = float(energies(module, [(r, q, TRICLINIC)])[0])
    assert removed == pytest.approx(got - (q**2).sum() / (2 * np.pi) ** 1.5, rel=1e-12)


def test_channels_add_up():
    rng = np.random.default_rng(2)
    r, q = random_system(rng, 12, TRICLINIC, 3)
    module = ewald(method="direct")
    whole = float(energies(module, [(r, q, TRICLINIC)])[0])
    parts = [float(energies(module, [(r, q[:, c], TRICLINIC)])[0]) for c in range(3)]
    assert whole == pytest.approx(sum(parts), rel=1e-12)


@pytest.mark.parametrize("method", ["direct", "mesh"])
@pytest.mark.parametrize("mode", ["parity", "smooth"])
def test_mixed_batch_equals_one_by_one(method, mode):
    """Beads sharing a cell, other cells, other sizes and open structures in one call."""
    rng = np.random.default_rng(3)
    cubic = np.eye(3) * 8.0
    systems = [
        (*random_system(rng, 10, cubic), cubic),
        (*random_system(rng, 10, cubic), cubic),
        (*random_system(rng, 7, TRICLINIC), TRICLINIC),
        (*random_system(rng, 10, cubic), cubic),
        (*random_system(rng, 13, np.eye(3) * 11.0), np.eye(3) * 11.0),
    ]
    module = ewald(method=method, mode=mode)
    together = energies(module, systems).numpy()
    alone = [float(energies(module, [s])[0]) for s in systems]
    np.testing.assert_allclose(together, alone, rtol=1e-12)
    zeros = np.zeros((3, 3))
    open_systems = [(*random_system(rng, n, cubic), zeros) for n in (5, 9, 9)]
    together = energies(module, open_systems, pbc=False).numpy()
    alone = [float(energies(module, [s], pbc=False)[0]) for s in open_systems]
    np.testing.assert_allclose(together, alone, rtol=1e-12)


def test_partial_periodicity_is_refused_on_the_host():
    with pytest.raises(StructureError, match="periodic in all three directions or in none"):
        ewald().plan(np.eye(3)[None] * 8.0, np.array([[True, True, False]]), [4])


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="mode"):
        LongRangeOptions(mode="fuzzy")
    with pytest.raises(ValueError, match="method"):
        LongRangeOptions(method="fmm")
    with pytest.raises(ValueError, match="mesh_order"):
        LongRangeOptions(mesh_order=5)


class OpCounter(TorchDispatchMode):
    """Counts the aten ops run under it and the host reads among them."""

    HOST_READS = ("_local_scalar_dense", "item", "tolist")

    def __init__(self) -> None:
        super().__init__()
        self.ops = 0
        self.host_reads: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        name = func.__name__
        if any(name.startswith(h) for h in self.HOST_READS):
            self.host_reads.append(name)
        return func(*args, **(kwargs or {}))


def count_ops(module: EwaldSum, n_beads: int, n_atoms: int = 24) -> OpCounter:
    """Energy, forces and virial of n_beads structures sharing one cell, as the model asks."""
    rng = np.random.default_rng(4)
    cell = np.eye(3) * 9.0
    r0, _ = random_system(rng, n_atoms, cell)
    positions = np.concatenate([r0 + rng.normal(0, 0.05, r0.shape) for _ in range(n_beads)])
    cells = np.repeat(cell[None], n_beads, axis=0)
    pbc = np.ones((n_beads, 3), dtype=bool)
    plan = module.plan(cells, pbc, [n_atoms] * n_beads)  # host data only
    r = torch.as_tensor(positions).requires_grad_(True)
    strain = torch.zeros(n_beads, 3, 3, dtype=torch.float64, requires_grad=True)
    q = torch.as_tensor(rng.normal(size=n_beads * n_atoms))
    with OpCounter() as counter:
        strained = torch.as_tensor(cells) @ (torch.eye(3, dtype=torch.float64) + strain)
        energy = module(r, q, strained, plan=plan)
        torch.autograd.grad(energy.sum(), [r, strain])
    return counter


@pytest.mark.parametrize("method", ["direct", "mesh"])
@pytest.mark.parametrize("mode", ["parity", "smooth"])
def test_batch_has_no_host_reads_and_a_fixed_op_count(method, mode):
    module = ewald(method=method, mode=mode)
    counts = {}
    for beads in (1, 8, 32):
        counter = count_ops(module, beads)
        assert counter.host_reads == [], counter.host_reads
        counts[beads] = counter.ops
    assert counts[1] == counts[8] == counts[32], counts
    # the budget (forward and backward, measured 351/390 direct, 589/628 mesh): one fixed
    # graph, whatever the number of beads
    assert counts[32] <= {"direct": 400, "mesh": 650}[method], counts


@pytest.mark.parametrize("method", ["direct", "mesh"])
@pytest.mark.parametrize("mode", ["parity", "smooth"])
def test_runs_on_the_meta_device(method, mode):
    """Tensors without data: any read of a value on the host (.tolist(), .item(),
    int(t), even on a CPU tensor, which no dispatch mode sees) fails there."""
    module = ewald(method=method, mode=mode)
    cubic = np.eye(3) * 9.0
    cells = np.stack([cubic, cubic, cubic, TRICLINIC, np.zeros((3, 3)), np.zeros((3, 3))])
    pbc = np.array([[True] * 3] * 4 + [[False] * 3] * 2)
    n_atoms = [24, 24, 24, 11, 5, 7]
    plan = module.plan(cells, pbc, n_atoms)  # host data only
    meta = {"device": "meta", "dtype": torch.float64}
    r = torch.empty(sum(n_atoms), 3, **meta, requires_grad=True)
    q = torch.empty(sum(n_atoms), 2, **meta)
    strain = torch.zeros(len(n_atoms), 3, 3, **meta, requires_grad=True)
    cell = torch.empty(len(n_atoms), 3, 3, **meta) @ (torch.eye(3, **meta) + strain)
    energy = module(r, q, cell, plan=plan)
    grads = torch.autograd.grad(energy.sum(), [r, strain])
    assert energy.shape == (6,) and grads[0].shape == r.shape


def test_smooth_mode_stress_is_the_strain_derivative():
    """Finite differences of the smooth energy along a general strain equal the virial."""
    rng = np.random.default_rng(5)
    r, q = random_system(rng, 20, TRICLINIC)
    module = ewald(mode="smooth", method="direct")
    direction = rng.normal(size=(3, 3))
    direction = 0.5 * (direction + direction.T)

    def energy(strain: torch.Tensor) -> torch.Tensor:
        deform = torch.eye(3, dtype=torch.float64) + strain
        plan = module.plan(TRICLINIC[None], np.ones((1, 3), bool), [len(r)])
        return module(
            torch.as_tensor(r) @ deform,
            torch.as_tensor(q),
            torch.as_tensor(TRICLINIC)[None] @ deform,
            plan=plan,
        )[0]

    strain = torch.zeros(3, 3, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(energy(strain), strain)
    h = 1e-6
    d = torch.as_tensor(direction)
    fd = (energy(h * d) - energy(-h * d)).item() / (2 * h)
    assert fd == pytest.approx(float((grad * d).sum()), rel=1e-6, abs=1e-9)


# -- the reference water model -------------------------------------------------------------


@contextlib.contextmanager
def long_range(model, **options):
    """The session's model with other long-range options for one test."""
    old = model.ewald.options
    model.configure_long_range(**options)
    try:
        yield model
    finally:
        model.configure_long_range(old)


def scaled_water(atoms, scale: float) -> Structure:
    a = atoms.copy()
    a.set_cell(atoms.cell * scale, scale_atoms=True)
    return Structure.from_ase(a)


@pytest.mark.parametrize("mode", ["parity", "smooth"])
def test_isotropic_cell_scan_jumps_only_in_parity_mode(water_model, liquid_water, mode):
    """E along a slow isotropic scan of liquid-64's cell against the computed virial.

    Between neighbouring scan points, E(s2) - E(s1) must equal the trapezoid integral of
    dE/ds = -tr(virial) / s. The original's k-set gains 36 vectors (|n|^2 = 38) at
    s = sqrt(38) * dl / L = 0.99306: parity mode jumps there, smooth mode nowhere.
    """
    scales = np.linspace(0.99, 1.01, 11)
    with long_range(water_model, mode=mode, method="direct"):
        predictions = water_model.predict([scaled_water(liquid_water, s) for s in scales])
    energy = np.array([p.energy for p in predictions])
    slope = np.array([-np.trace(p.virial) / s for p, s in zip(predictions, scales, strict=True)])
    step = scales[1] - scales[0]
    mismatch = np.abs(np.diff(energy) - 0.5 * step * (slope[1:] + slope[:-1]))
    # the trapezoid rule's own error at this step is below 5e-5 eV (measured)
    crossing = int(np.searchsorted(scales, math.sqrt(38) * 2.0 / liquid_water.cell[0, 0])) - 1
    if mode == "smooth":
        assert mismatch.max() < 1e-4, mismatch
    else:
        assert mismatch[crossing] > 1e-3, mismatch  # the jump: 8.7 meV
        assert np.delete(mismatch, crossing).max() < 1e-4, mismatch


def test_smooth_mode_stays_close_to_parity(water_model, liquid_water):
    """Away from a crossing the smooth weights change liquid-64's energy by a few meV."""
    s = Structure.from_ase(liquid_water)
    parity = water_model.predict([s])[0]
    with long_range(water_model, mode="smooth"):
        smooth = water_model.predict([s])[0]
    assert abs(smooth.energy - parity.energy) < 0.01  # 4.6 meV measured, of 35.8 eV
    assert np.abs(smooth.forces - parity.forces).max() < 0.02


def test_mesh_error_on_1536_waters(water_model, liquid_water):
    """The defaults' error against the direct sum: energy 1e-5 relative, forces 1e-3 eV/Å."""
    s = Structure.from_ase(liquid_water.repeat((2, 2, 2)))
    prepared = water_model.prepare(s)
    with long_range(water_model, method="direct"):
        direct = water_model.predict([prepared])[0]
    with long_range(water_model, method="mesh"):
        mesh = water_model.predict([prepared])[0]
    assert abs(mesh.energy - direct.energy) < 1e-5 * abs(direct.energy)
    assert np.abs(mesh.forces - direct.forces).max() < 1e-3
    assert np.abs(mesh.stress - direct.stress).max() < 1e-5


# -- settings ------------------------------------------------------------------------------


def test_settings_choose_the_long_range_per_model():
    from cace_server.engine import Engine, EngineSettings
    from cace_server.model import random_model
    from cace_server.settings import load_settings

    settings = load_settings(
        environ={"CACE_SERVER_LONG_RANGE_MODE": "smooth"},
        overrides={"long_range_method": ["auto", "big=mesh"]},
    )
    # a model's own options over those for every model
    assert settings.engine.long_range_for("") == {"mode": "smooth", "method": "auto"}
    assert settings.engine.long_range_for("big") == {"mode": "smooth", "method": "mesh"}
    with pytest.raises(ValueError, match="long_range_mode must be one of"):
        load_settings(environ={}, overrides={"long_range_mode": ["fuzzy"]})
    with pytest.raises(ValueError, match="given twice"):
        load_settings(environ={}, overrides={"long_range_method": ["a=mesh", "a=direct"]})

    engine_settings = EngineSettings(
        long_range_mode=("smooth",), long_range_method=("big=mesh",), warmup=False
    )
    models = {
        "small": random_model(seed=1, long_range=True),
        "big": random_model(seed=2, long_range=True),
    }
    with Engine(models, settings=engine_settings):
        small, big = models["small"], models["big"]  # configured in place on loading
        assert (small.ewald.options.mode, small.ewald.options.method) == ("smooth", "auto")
        assert (big.ewald.options.mode, big.ewald.options.method) == ("smooth", "mesh")
