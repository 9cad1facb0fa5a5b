"""The shared edge pass of a committee gives what its members give one by one.

The shared pass (``cace_server/model/committee_pass.py``) writes out the edge part's
backward per member; every check here compares it with the members' own autograd
evaluation (``Committee(shared=False)`` and the members' ``predict``), float64.
"""

from __future__ import annotations

from pathlib import Path

import ase.build
import ase.io
import numpy as np
import pytest

from cace_server.model import load_model, random_model
from cace_server.model.committee import Committee
from cace_server.structures import Structure

REPO = Path(__file__).resolve().parents[1]
SEEDS = [REPO / "tests" / "data" / "committee" / f"seed{i}.safetensors" for i in range(1, 5)]
EVERYTHING = [
    "energy",
    "forces",
    "stress",
    "energies",
    "energy_uncertainty",
    "forces_uncertainty",
    "committee_energies",
    "committee_forces",
    "committee_virials",
]


@pytest.fixture(scope="module")
def members() -> list:
    return [load_model(p, dtype="float64") for p in SEEDS]


def _structures() -> list[Structure]:
    frames = ase.io.read(REPO / "data" / "water_gfn2_test.extxyz.gz", index=":2")
    water = [Structure.from_ase(a) for a in frames]
    cluster = ase.build.molecule("H2O")
    cluster.positions += 0.05 * np.random.default_rng(0).normal(size=(3, 3))
    lonely = Structure.create([1, 8], [[0, 0, 0], [20.0, 0, 0]])  # no neighbours at all
    return [*water, Structure.from_ase(cluster), lonely]


def _assert_same(a, b, names) -> None:
    for name in names:
        if name == "stress":
            name = "virial"
        x, y = getattr(a, name), getattr(b, name)
        if y is None:
            assert x is None, name
            continue
        np.testing.assert_allclose(x, y, rtol=0, atol=1e-10, err_msg=name)


def test_members_share_the_edge_pass(members) -> None:
    committee = Committee(members)
    assert committee.shared is not None
    assert committee.describe()["committee"]["evaluation"] == "shared edge pass"


@pytest.mark.parametrize(
    "outputs",
    [EVERYTHING, ["energy", "forces", "stress"], ["energy", "energy_uncertainty"]],
    ids=["per-member", "mean-only", "energy-only"],
)
def test_shared_pass_equals_member_loop(members, outputs) -> None:
    structures = _structures()
    shared = Committee(members).predict(structures, outputs)
    loop = Committee(members, shared=False).predict(structures, outputs)
    for a, b in zip(shared, loop, strict=True):
        assert abs(a.energy - b.energy) < 1e-10
        _assert_same(a, b, [n for n in outputs if n != "energy"])


def test_committee_members_equal_the_members_alone(members) -> None:
    structures = _structures()
    out = Committee(members).predict(structures, EVERYTHING)
    alone = [m.predict(structures, ["energy", "forces", "stress"]) for m in members]
    for b, pred in enumerate(out):
        energies = np.array([run[b].energy for run in alone])
        forces = np.stack([run[b].forces for run in alone])
        np.testing.assert_allclose(pred.committee_energies, energies, rtol=0, atol=1e-10)
        np.testing.assert_allclose(pred.committee_forces, forces, rtol=0, atol=1e-10)
        np.testing.assert_allclose(
            pred.committee_virials, np.stack([run[b].virial for run in alone]), atol=1e-10
        )
        assert pred.energy == pytest.approx(energies.mean(), abs=1e-10)
        assert pred.energy_uncertainty == pytest.approx(energies.std(ddof=1), abs=1e-12)
        expected = np.sqrt(forces.var(axis=0, ddof=1).sum(-1))
        np.testing.assert_allclose(pred.forces_uncertainty, expected, atol=1e-10)


def test_members_of_different_radial_widths_share_the_pass() -> None:
    """Members' Bessel bases are side by side; their widths need not agree."""
    members = [
        random_model(seed=1, cutoff=5.0),
        random_model(seed=2, cutoff=5.0, n_rbf=4, n_radial=6),
        random_model(seed=3, cutoff=5.0, max_nu=2, embed_receiver=True),
    ]
    shared = Committee(members)
    assert shared.shared is not None
    structures = _structures()
    got = shared.predict(structures, EVERYTHING)
    want = Committee(members, shared=False).predict(structures, EVERYTHING)
    for a, b in zip(got, want, strict=True):
        _assert_same(a, b, [n for n in EVERYTHING if n != "energy"])


def test_message_passing_members_fall_back_to_the_member_loop(members) -> None:
    other = random_model(seed=4, cutoff=5.0, num_message_passing=1)
    committee = Committee([members[0], other])
    assert committee.shared is None
    assert committee.describe()["committee"]["evaluation"] == "member loop"
    structures = _structures()[:3]
    out = committee.predict(structures, ["energy", "committee_energies", "committee_forces"])
    for b, pred in enumerate(out):
        for m, member in enumerate([members[0], other]):
            alone = member.predict([structures[b]], ["energy", "forces"])[0]
            assert pred.committee_energies[m] == pytest.approx(alone.energy, abs=1e-10)
            np.testing.assert_allclose(pred.committee_forces[m], alone.forces, atol=1e-10)


# -- the member axis (node-level work of members of one architecture) ------------------------
def _stacked(committee: Committee, stack: bool) -> Committee:
    assert committee.shared is not None
    committee.shared.stack = stack
    return committee


def test_member_axis_equals_member_by_member(members) -> None:
    """The stacked node-level pass (used off the CPU) gives the member loop's numbers."""
    structures = _structures()
    stacked = _stacked(Committee(members), True)
    assert stacked.shared is not None and stacked.shared.stacked is not None
    got = stacked.predict(structures, EVERYTHING)
    want = _stacked(Committee(members), False).predict(structures, EVERYTHING)
    for a, b in zip(got, want, strict=True):
        assert abs(a.energy - b.energy) < 1e-10
        _assert_same(a, b, [n for n in EVERYTHING if n != "energy"])


def test_member_axis_needs_one_architecture() -> None:
    same = [random_model(seed=s, cutoff=5.0) for s in (1, 2)]
    assert Committee(same).shared.stacked is not None  # type: ignore[union-attr]
    other = [random_model(seed=1, cutoff=5.0), random_model(seed=2, cutoff=5.0, max_nu=2)]
    assert Committee(other).shared.stacked is None  # type: ignore[union-attr]


def test_member_axis_does_not_grow_the_operation_count_with_members(members) -> None:
    """What a committee costs where calls are bound by kernel launches (a GPU): with
    the member axis, four members take fewer than twice the operations of one."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            self.n += 1
            return func(*args, **(kwargs or {}))

    structure = _structures()[0]
    committee = _stacked(Committee(members), True)
    prepared = committee.prepare(structure)
    counts = {}
    for name, call in {
        "committee": lambda: committee.predict([prepared], EVERYTHING),
        "member": lambda: members[0].predict([prepared], ["energy", "forces", "stress"]),
    }.items():
        with Count() as count:
            call()
        counts[name] = count.n
    assert counts["committee"] < 2 * counts["member"], counts
