"""The compiled model call (cace_server/model/compiled.py) against the eager one.

Small random models keep the compiles few and short (each one is ~10-25 s on this
CPU): every module-scoped compiled model below is shared by the tests that use it,
and one Inductor cache dir serves the session (``inductor_cache``). Float64 parity
is 1e-12: eV/Å for forces, eV/Å³ for stress, e for charges, eV for per-atom
energies, and for total energies 1e-12 relative to max(1 eV, |E|).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pytest
import torch

from cace_server.model import CACEPotential, Committee, random_model
from cace_server.model.compiled import (
    ATOM_QUANTUM,
    SLOT_SPARE,
    CompiledCall,
    compile_model,
    slot_layout,
    total_stats,
)
from cace_server.model.config import (
    EwaldConfig,
    PolarizationConfig,
    ReadoutConfig,
)
from cace_server.model.neighbors import GraphBatch, collate
from cace_server.outputs import COMMITTEE_OUTPUTS
from cace_server.structures import Prediction, Structure

pytestmark = pytest.mark.usefixtures("inductor_cache")

# A model small enough to compile quickly, with every part of the representation.
TINY: dict[str, Any] = dict(n_atom_basis=2, n_rbf=4, n_radial=4, max_l=2, max_nu=2)
# Models that test one more part (long range, message passing, dipole) compile a
# smaller angular basis: the representation's own is tested at max_l=2.
SMALLER: dict[str, Any] = {**TINY, "max_l": 1}
ENERGY = ReadoutConfig(name="energy", hidden=[8])
CHARGE = ReadoutConfig(name="q", kind="charge", hidden=[8])
KEY = "charge_states"

QUANTITIES = ("forces", "stress", "virial", "energies", "charges", "dipole", "bec")
EVERYTHING = ["energy", "forces", "stress", *COMMITTEE_OUTPUTS]


def local_model(seed: int = 1, dtype: str = "float64") -> CACEPotential:
    return random_model(seed=seed, dtype=dtype, readouts=[ENERGY], **TINY)


def ewald_model() -> CACEPotential:
    return random_model(seed=4, readouts=[ENERGY, CHARGE], ewald=EwaldConfig("q"), **SMALLER)


def mp_model() -> CACEPotential:
    """Message passing, and an energy head that reads a per-atom input (one compile
    for both)."""
    head = ReadoutConfig(name="energy", hidden=[8], inputs={KEY: 1})
    return random_model(seed=3, readouts=[head], num_message_passing=1, **SMALLER)


def dipole_model() -> CACEPotential:
    return random_model(
        seed=6,
        readouts=[ENERGY, CHARGE],
        ewald=EwaldConfig("q"),
        polarization=PolarizationConfig(charge_readout="q", bec=True),
        **SMALLER,
    )


def compiled_twin(build: Callable[[], CACEPotential]) -> tuple[CACEPotential, CompiledCall]:
    """The same model (same seed, same weights) with a compiled call."""
    model = build()
    (call,) = compile_model(model)
    return model, call


def water(
    seed: int, n: int = 3, box: float = 6.5, periodic: bool = True, inputs: bool = False
) -> Structure:
    """``n`` slightly disordered water molecules in a cubic box (or the same, open)."""
    rng = np.random.default_rng(seed)
    local = np.array([[0.0, 0.0, 0.0], [0.96, 0.0, 0.0], [-0.24, 0.93, 0.0]])
    grid = np.array([(i, j, k) for i in range(3) for j in range(3) for k in range(3)], float)
    centres = grid[rng.permutation(len(grid))[:n]] * (box / 3) + 0.3
    positions = (centres[:, None] + local[None]).reshape(-1, 3)
    positions += rng.normal(0, 0.05, positions.shape)
    arrays = {KEY: rng.choice([-1.0, 0.0, 1.0], size=(3 * n, 1))} if inputs else None
    cell = np.eye(3) * box if periodic else None
    return Structure.create([8, 1, 1] * n, positions, cell, periodic, arrays=arrays)


def jiggled(s: Structure, seed: int, scale: float) -> Structure:
    rng = np.random.default_rng(seed)
    moved = s.positions + rng.normal(0, scale, s.positions.shape)
    return Structure.create(s.numbers, moved, s.cell, s.pbc, arrays=dict(s.arrays))


def assert_same(got: Sequence[Prediction], want: Sequence[Prediction], atol: float = 1e-12) -> None:
    assert len(got) == len(want)
    for b, (p, q) in enumerate(zip(got, want, strict=True)):
        assert abs(p.energy - q.energy) <= atol * max(1.0, abs(q.energy)), (b, p.energy, q.energy)
        for name in QUANTITIES:
            a, e = getattr(p, name), getattr(q, name)
            assert (a is None) == (e is None), (b, name)
            if e is not None:
                np.testing.assert_allclose(a, e, rtol=0, atol=atol, err_msg=f"{b}: {name}")


def counters() -> dict[str, dict[str, int]]:
    from torch._dynamo.utils import counters as dynamo

    return {k: dict(v) for k, v in dynamo.items() if k in ("stats", "inductor", "aot_autograd")}


def batch_of(model: CACEPotential, structures: Sequence[Structure]) -> GraphBatch:
    return collate(
        [model.prepare(s) for s in structures], model.device, model.input_widths, model.dtype
    )


# -- padding ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "build",
    [local_model, ewald_model, mp_model, dipole_model],
    ids=lambda f: f.__name__,
)
def test_padding_changes_nothing_eagerly(build: Callable[[], CACEPotential]) -> None:
    """The slot layout with spare slots and dummy atoms, evaluated eagerly, gives what
    the plain batch gives; the dummies get exactly zero force (no compile needed)."""
    model = build()
    structures = [water(1, inputs=bool(model.input_widths))]
    if model.ewald is None:
        structures.append(water(2, n=2, periodic=False, inputs=bool(model.input_widths)))
    batch = batch_of(model, structures)
    n = int(batch.positions.shape[0])
    atoms = n if model.polarization is not None else n + 37
    slots = int(batch.max_neighbors or 0) + 13
    padded = slot_layout(batch, atoms, slots)
    flags: dict[str, bool] = dict(forces=True, virial=True, bec=model.has_bec)
    with torch.enable_grad():
        plain = model.compute(batch, **flags)
        laid = model.compute(padded, **flags)
    for name in ("energy", "virial", "dipole"):
        a, e = getattr(laid, name), getattr(plain, name)
        if e is not None:
            torch.testing.assert_close(a, e, rtol=0, atol=1e-12, msg=name)
    for name in ("forces", "atom_energy", "charges", "bec"):
        a, e = getattr(laid, name), getattr(plain, name)
        if e is not None:
            torch.testing.assert_close(a[:n], e, rtol=0, atol=1e-12, msg=name)
    assert laid.forces is not None
    assert torch.equal(laid.forces[n:], torch.zeros_like(laid.forces[n:]))
    if laid.charges is not None:
        assert torch.equal(laid.charges[n:], torch.zeros_like(laid.charges[n:]))


@pytest.fixture(scope="module")
def local() -> tuple[CACEPotential, CACEPotential, CompiledCall]:
    """(eager, compiled) float64 local model, warmed with the densest structure of the
    module so that the smaller ones run in its shape, with more atoms and slots."""
    eager = local_model()
    model, call = compiled_twin(local_model)
    model.predict([water(3, n=4)])
    assert call.stats.compiles == 1
    return eager, model, call


def test_compiled_padding_carries_no_energy_or_force(local) -> None:
    eager, model, call = local
    s = water(1)
    batch = batch_of(model, [s])
    shape = call.shape_of(batch, (True, True, False, False))
    assert shape in call.shapes, "the small structure runs in the warmed shape"
    assert shape.atoms >= ATOM_QUANTUM > len(s)
    assert shape.slots > int(batch.max_neighbors or 0)
    out = call(batch, forces=True, virial=True)
    assert call.stats.compiles == 1
    n = len(s)
    assert out.forces is not None and out.forces.shape[0] == shape.atoms
    assert torch.equal(out.forces[n:], torch.zeros_like(out.forces[n:]))
    with torch.enable_grad():
        want = eager.compute(batch_of(eager, [s]), forces=True, virial=True)
    torch.testing.assert_close(out.energy, want.energy, rtol=0, atol=1e-12)
    torch.testing.assert_close(out.forces[:n], want.forces, rtol=0, atol=1e-12)
    torch.testing.assert_close(out.virial, want.virial, rtol=0, atol=1e-12)
    torch.testing.assert_close(out.atom_energy[:n], want.atom_energy, rtol=0, atol=1e-12)
    assert_same(model.predict([s]), eager.predict([s]))


# -- parity ------------------------------------------------------------------------------------


def test_float64_parity_periodic_and_open(local) -> None:
    eager, model, call = local
    for s in (water(1), water(2, n=2, periodic=False), water(3, n=4)):
        assert_same(model.predict([s]), eager.predict([s]))
    assert call.stats.compiles == 1 and call.stats.calls >= 3 and call.stats.eager_calls == 0


@pytest.mark.slow  # a minute of compiling each on 2 cores
def test_float32_parity() -> None:
    eager = local_model(dtype="float32")
    model, call = compiled_twin(lambda: local_model(dtype="float32"))
    structures = [water(1), water(2, n=2, periodic=False)]
    got, want = model.predict(structures), eager.predict(structures)
    assert call.stats.compiles == 1 and call.stats.fallbacks == 0
    for p, q in zip(got, want, strict=True):
        assert p.energy == pytest.approx(q.energy, rel=1e-5, abs=1e-5)
        for name in ("forces", "stress", "energies"):
            e = getattr(q, name)
            if e is not None:
                np.testing.assert_allclose(getattr(p, name), e, rtol=1e-4, atol=1e-5)


@pytest.mark.slow  # a minute of compiling each on 2 cores
def test_long_range_parity() -> None:
    """Ewald, periodic and open in one batch, and one by one."""
    eager = ewald_model()
    model, call = compiled_twin(ewald_model)
    structures = [water(1), water(2, n=2, periodic=False)]
    got = model.predict(structures)
    assert call.stats.compiles == 1 and call.stats.fallbacks == 0
    assert got[0].charges is not None
    assert_same(got, eager.predict(structures))
    assert_same(got, [eager.predict([s])[0] for s in structures])


@pytest.mark.slow  # a minute of compiling each on 2 cores
def test_message_passing_and_per_atom_inputs_parity() -> None:
    eager = mp_model()
    model, call = compiled_twin(mp_model)
    structures = [water(1, inputs=True), water(2, n=2, periodic=False, inputs=True)]
    got = model.predict(structures)
    assert call.stats.compiles == 1 and call.stats.fallbacks == 0
    assert_same(got, eager.predict(structures))
    assert_same(got, [eager.predict([s])[0] for s in structures])
    # The input is read: other charge states give other energies from the same graph.
    flipped = [
        Structure.create(s.numbers, s.positions, s.cell, s.pbc, arrays={KEY: -s.arrays[KEY]})
        for s in structures
    ]
    other = model.predict(flipped)
    assert call.stats.compiles == 1
    assert_same(other, eager.predict(flipped))
    assert abs(other[0].energy - got[0].energy) > 1e-6


@pytest.mark.slow
def test_dipole_and_bec_parity() -> None:
    """Slow: the Born effective charges' six backward passes make a big graph (~2 min)."""
    eager = dipole_model()
    model, call = compiled_twin(dipole_model)
    structures = [water(1), water(2, n=2, periodic=False)]
    outputs = ["energy", "forces", "stress", "charges", "dipole", "bec"]
    got = model.predict(structures, outputs)
    assert got[0].bec is not None and got[1].dipole is not None
    assert_same(got, eager.predict(structures, outputs))
    assert call.stats.fallbacks == 0, call.stats
    assert call.stats.compiles == 1 and call.stats.calls == 1


# -- no recompile --------------------------------------------------------------------------------


def test_no_recompile_when_neighbour_counts_drift(local) -> None:
    eager, model, call = local
    s = water(3, n=4)
    model.predict([s])
    compiles, before = call.stats.compiles, counters()
    seen = set()
    for i in range(6):
        moved = jiggled(s, seed=100 + i, scale=0.15)
        seen.add(model.prepare(moved).max_neighbors)
        assert_same(model.predict([moved]), eager.predict([moved]))
    assert len(seen) > 1, "the steps change the most neighbours of one atom"
    assert call.stats.compiles == compiles
    assert counters() == before
    assert max(seen) - min(seen) <= SLOT_SPARE


# -- compile failure -------------------------------------------------------------------------


def _failing_backend(attempts: list[int]) -> Callable[..., Any]:
    """A stand-in for ``compiled._inductor`` (the compiler boundary) that fails."""

    def compile_graph(
        graph: torch.fx.GraphModule, example: list[torch.Tensor], device: torch.device, mode: str
    ) -> Any:
        attempts.append(1)
        raise RuntimeError("injected compiler failure")

    return compile_graph


def test_compile_failure_is_served_eagerly_once(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import cace_server.model.compiled as compiled

    attempts: list[int] = []
    monkeypatch.setattr(compiled, "_inductor", _failing_backend(attempts))
    eager = local_model()
    model, call = compiled_twin(local_model)
    s = water(1)
    with caplog.at_level(logging.WARNING, logger=compiled.__name__):
        first = model.predict([s])
        second = model.predict([jiggled(s, 7, 0.01)])
    warnings = [r for r in caplog.records if r.name == compiled.__name__]
    assert len(warnings) == 1 and "served eagerly" in warnings[0].getMessage()
    assert len(attempts) == 1, "the failed shape is not compiled again"
    assert call.stats.fallbacks == 1 and call.stats.compiles == 0
    assert call.stats.eager_calls == 2 and call.stats.calls == 0
    assert_same(first, eager.predict([s]))
    assert_same(second, eager.predict([jiggled(s, 7, 0.01)]))


def test_compile_failure_warning_names_the_cause(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The one warning says why the compile failed, not only that it did."""
    import cace_server.model.compiled as compiled

    monkeypatch.setattr(compiled, "_inductor", _failing_backend([]))
    model, _ = compiled_twin(local_model)
    with caplog.at_level(logging.WARNING, logger=compiled.__name__):
        model.predict([water(1)])
    (warning,) = [r for r in caplog.records if r.name == compiled.__name__]
    assert "injected compiler failure" in warning.getMessage()


# -- committee -----------------------------------------------------------------------------------


def _members() -> list[CACEPotential]:
    return [local_model(seed=11), local_model(seed=12)]


def test_compiled_committee_equals_eager() -> None:
    structures = [water(1), water(2, n=2, periodic=False)]
    eager = Committee(_members(), alpha=1.7, shared=False)
    committee = Committee(_members(), alpha=1.7, shared=False)
    calls = compile_model(committee)
    assert len(calls) == 2
    got = committee.predict(structures, EVERYTHING)
    want = eager.predict(structures, EVERYTHING)
    stats = total_stats(calls)
    assert stats.compiles == 2 and stats.calls == 2 and stats.fallbacks == 0
    assert_same(got, want)
    for p, q in zip(got, want, strict=True):
        assert p.energy_uncertainty == pytest.approx(q.energy_uncertainty, rel=0, abs=1e-12)
        for name in ("forces_uncertainty", "committee_energies", "committee_forces"):
            np.testing.assert_allclose(getattr(p, name), getattr(q, name), rtol=0, atol=1e-12)


def test_compiled_committee_runs_compiled_members() -> None:
    """A committee compiled as served (its default evaluation) runs its members'
    compiled calls, and equals the eager committee."""
    structures = [water(1), water(2, n=2, periodic=False)]
    eager = Committee(_members(), alpha=1.7)
    committee = copy.deepcopy(eager)
    calls = compile_model(committee)
    got = committee.predict(structures, EVERYTHING)
    stats = total_stats(calls)
    assert stats.calls + stats.eager_calls > 0, (
        f"{committee.describe()['committee']['evaluation']}: no member ran its compiled call"
    )
    assert_same(got, eager.predict(structures, EVERYTHING))
