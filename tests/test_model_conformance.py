"""Every model family against the one contract the engine relies on (ServedModel).

torch-sim's ``validate_model_outputs`` is the precedent. For each family (the
reference checkpoints, one published checkpoint of every importer family, the two
synthetic checkpoints (one with a per-atom input, given by its structures), the
bundled model, a model with a dipole/BEC head, and the wrappers the engine and the
tests put around models) the same checks run:

- it has every member of :class:`ServedModel` and describes itself in JSON;
- every declared output comes back, with its documented shape, in float64;
- an output it does not declare is refused, and what was not asked is not returned;
- a batch gives what the structures give one by one;
- evaluating does not change the structures it was given;
- forces are minus the energy gradient, stress the strain derivative per volume
  (central finite differences, float64).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from cace_server.engine.faults import FaultyModel
from cace_server.engine.models import ModelWrapper, ServedModel
from cace_server.outputs import CATALOGUE, OutputNotOffered, Outputs
from cace_server.structures import BatchCost, Structure
from tests.conftest import REFERENCE_DIR
from tests.published_support import family_of, manifest, model_names, prefixes
from tests.published_support import structure as published_structure

REFERENCE = REFERENCE_DIR
PUBLISHED = REFERENCE / "published"
SYNTHETIC = REFERENCE / "synthetic"
COMMITTEE = Path(__file__).parent / "data" / "committee"


def _water_box(n_side: int = 2, seed: int = 0) -> Structure:
    """A small periodic box of water molecules, slightly disordered."""
    rng = np.random.default_rng(seed)
    spacing = 3.1
    centres = np.array(
        [(i, j, k) for i in range(n_side) for j in range(n_side) for k in range(n_side)],
        dtype=float,
    )
    local = np.array([[0.0, 0.0, 0.0], [0.96, 0.0, 0.0], [-0.24, 0.93, 0.0]])
    positions = (centres[:, None] * spacing + local[None]).reshape(-1, 3)
    positions += rng.normal(0, 0.05, positions.shape)
    cell = np.eye(3) * n_side * spacing + rng.normal(0, 0.05, (3, 3))
    return Structure.create(np.tile([8, 1, 1], n_side**3), positions, cell, True)


def _water_cluster(seed: int) -> Structure:
    box = _water_box(2, seed)
    return Structure.create(box.numbers[:9], box.positions[:9])


def _published(name: str) -> tuple[ServedModel, list[Structure]]:
    from cace_server.model import convert_original

    model = convert_original(PUBLISHED / name, dtype="float64")
    npz = np.load(PUBLISHED / name.replace(".pth", ".npz"))
    return model, [
        published_structure(npz, prefix)
        for prefix in ("box", "cluster")
        if f"{prefix}_numbers" in npz.files
    ]


def _synthetic(name: str) -> Callable[[], tuple[ServedModel, list[Structure]]]:
    """A checkpoint of ``synthetic/`` on its own structures (with their per-atom inputs)."""

    def build() -> tuple[ServedModel, list[Structure]]:
        from cace_server.model import convert_original

        if not (SYNTHETIC / f"{name}.pth").is_file():
            pytest.skip(f"{SYNTHETIC / name}.pth is absent (set CACE_REFERENCE_DIR)")
        npz = np.load(SYNTHETIC / f"{name}.npz")
        model = convert_original(SYNTHETIC / f"{name}.pth", dtype="float64")
        return model, [published_structure(npz, p) for p in prefixes(npz)]

    return build


def _moved(structure: Structure, positions: np.ndarray, cell: np.ndarray) -> Structure:
    """``structure`` at new positions and cell, with its per-atom inputs."""
    return Structure.create(
        structure.numbers, positions, cell, structure.pbc, arrays=dict(structure.arrays)
    )


def _smallest_per_family() -> dict[str, str]:
    if not (PUBLISHED / "manifest.json").is_file():
        return {}
    best: dict[str, tuple[int, str]] = {}
    for name in model_names(PUBLISHED):
        family = family_of(manifest(PUBLISHED)[name])
        size = (PUBLISHED / name).stat().st_size
        if family not in best or size < best[family][0]:
            best[family] = (size, name)
    return {family: name for family, (_, name) in sorted(best.items())}


def _reference(file: str) -> Callable[[], tuple[ServedModel, list[Structure]]]:
    def build() -> tuple[ServedModel, list[Structure]]:
        from cace_server.model import convert_original

        if not (REFERENCE / file).is_file():
            pytest.skip(f"{REFERENCE / file} is absent (set CACE_REFERENCE_DIR)")
        return convert_original(REFERENCE / file, dtype="float64"), _waters()

    return build


def _waters() -> list[Structure]:
    return [_water_box(2, seed=1), _water_cluster(seed=2)]


def _bundled() -> tuple[ServedModel, list[Structure]]:
    from cace_server.model import load_model
    from cace_server.server import default_model_path

    return load_model(default_model_path(), dtype="float64"), _waters()


def _dipole_bec() -> tuple[ServedModel, list[Structure]]:
    from tests.test_model_heads import _dipole_model

    return _dipole_model(), _waters()


def _committee() -> tuple[ServedModel, list[Structure]]:
    from cace_server.model import load_served

    members = ",".join(str(COMMITTEE / f"seed{i}.safetensors") for i in range(1, 5))
    return load_served(members, dtype="float64"), _waters()


def _wrapped() -> tuple[ServedModel, list[Structure]]:
    from cace_server.model import random_model

    return ModelWrapper(random_model((1, 8), seed=4)), _waters()


def _fault_injector() -> tuple[ServedModel, list[Structure]]:
    from cace_server.model import random_model

    return FaultyModel(random_model((1, 8), seed=5), after=10**6, delay_s=0.0), _waters()


def _test_dipole_wrapper() -> tuple[ServedModel, list[Structure]]:
    from cace_server.model import random_model
    from tests.test_engine_outputs import WithDipole

    return WithDipole(random_model((1, 8), seed=6)), _waters()


def _compiled(
    build: Callable[[], tuple[ServedModel, list[Structure]]],
) -> Callable[[], tuple[ServedModel, list[Structure]]]:
    """The family with the compiled model call (model/compiled.py); the checks below
    call it in many shapes (outputs, batch sizes), each compiled on first use."""

    def build_compiled() -> tuple[ServedModel, list[Structure]]:
        from cace_server.model.compiled import compile_model

        model, structures = build()
        assert isinstance(model, torch.nn.Module) and compile_model(model)
        return model, structures

    return build_compiled


FAMILIES: dict[str, Callable[[], tuple[ServedModel, list[Structure]]]] = {
    "reference lr (best_model.pth)": _reference("best_model.pth"),
    "reference mp1 (mp_nu3_mp1.pth)": _reference("mp_nu3_mp1.pth"),
    "bundled water model": _bundled,
    "native dipole/bec heads": _dipole_bec,
    "committee of 4 seeds": _committee,
    "ModelWrapper": _wrapped,
    "fault injector (not yet failing)": _fault_injector,
    "test model adding a dipole (test_engine_outputs)": _test_dipole_wrapper,
    "synthetic cutoff not float32": _synthetic("cutoff-not-float32"),
    "synthetic head reading a per-atom input": _synthetic("atomwise-extra-feature"),
    **{
        f"published {family}": (lambda name=name: _published(name))
        for family, name in _smallest_per_family().items()
    },
}


def _small_long_range_message_passing() -> tuple[ServedModel, list[Structure]]:
    from cace_server.model import random_model

    return random_model((1, 8), seed=7, long_range=True, num_message_passing=1), _waters()


# The compiled call of a model with every kind of block (message passing, Ewald): the
# checks compile a dozen shapes of it (outputs asked, batch sizes), so it is slow; the
# published models' compiled parity is in test_published.py.
COMPILED = {
    "compiled long range + message passing (random)": _compiled(_small_long_range_message_passing),
}


@pytest.fixture(
    scope="module",
    params=[
        *sorted(FAMILIES),
        *(pytest.param(name, marks=pytest.mark.slow) for name in sorted(COMPILED)),
    ],
)
def family(
    request: pytest.FixtureRequest, inductor_cache: str
) -> tuple[ServedModel, list[Structure]]:
    return {**FAMILIES, **COMPILED}[request.param]()


def test_every_importer_family_is_checked() -> None:
    if not (PUBLISHED / "manifest.json").is_file():
        pytest.skip(f"{PUBLISHED} is absent (set CACE_REFERENCE_DIR)")
    families = {family_of(manifest(PUBLISHED)[n]) for n in model_names(PUBLISHED)}
    assert {f"published {f}" for f in families} <= set(FAMILIES)


def _matches(shape: tuple[int, ...], documented: str, n_atoms: int) -> bool:
    """Whether ``shape`` is one of the documented shapes, e.g. "(N,) or (N, k)"."""
    for option in documented.split(" or "):
        dims = [d.strip() for d in option.strip("()").split(",") if d.strip()]
        if len(dims) != len(shape):
            continue
        if all(
            (d == "N" and s == n_atoms) or d in ("k", "M") or (d.isdigit() and int(d) == s)
            for d, s in zip(dims, shape, strict=True)
        ):
            return True
    return False


def _energy_of(model: ServedModel, structure: Structure) -> float:
    return model.predict([model.prepare(structure)], Outputs(["energy"]))[0].energy


def test_has_the_whole_contract(family: tuple[ServedModel, list[Structure]]) -> None:
    model, structures = family
    assert isinstance(model, ServedModel)
    assert set(model.outputs) <= set(CATALOGUE)
    assert model.cutoff > 0 and len(model.elements) > 0 and model.n_parameters > 0
    assert re.fullmatch(r"float(32|64)", str(model.dtype).removeprefix("torch."))
    json.dumps(dict(model.describe()))
    prepared = model.prepare(structures[0])
    cost = model.batch_cost(prepared)
    assert isinstance(cost, BatchCost) and cost.atoms == len(structures[0]) and cost.pairs > 0
    verlet = model.verlet_list(0.5)
    again, _reused = verlet.prepare(structures[0])
    assert model.batch_cost(again) == cost


def test_declared_outputs_have_their_documented_shapes(
    family: tuple[ServedModel, list[Structure]],
) -> None:
    model, structures = family
    everything = Outputs(model.outputs)
    for structure, prediction in zip(
        structures,
        model.predict([model.prepare(s) for s in structures], everything),
        strict=True,
    ):
        n = len(structure)
        arrays = prediction.array_outputs()
        for name in everything:
            spec = CATALOGUE[name]
            if name == "energy":
                assert np.isfinite(prediction.energy)
                continue
            if name == "stress" and not structure.pbc.all():
                assert prediction.stress is None  # stress only of 3-D periodic structures
                continue
            for field in spec.fields:
                value = arrays.get(field)
                assert value is not None, f"{name}: {field} missing"
                shape = (3, 3) if field == "virial" else value.shape
                assert _matches(shape, spec.shape, n), (field, value.shape, spec.shape)
                assert value.dtype == np.float64 and np.all(np.isfinite(value)), field
        undeclared = set(arrays) - everything.fields
        assert not undeclared, f"returned what it does not declare: {undeclared}"


def test_undeclared_outputs_are_refused_and_unasked_ones_not_returned(
    family: tuple[ServedModel, list[Structure]],
) -> None:
    model, structures = family
    missing = [name for name in CATALOGUE if name not in model.outputs]
    prepared = [model.prepare(structures[0])]
    for name in missing:
        with pytest.raises(OutputNotOffered):
            model.predict(prepared, Outputs([name]))
    for name in model.outputs:
        prediction = model.predict(prepared, Outputs([name]))[0]
        assert set(prediction.array_outputs()) <= Outputs([name]).fields


def test_a_batch_equals_one_by_one_and_inputs_are_not_mutated(
    family: tuple[ServedModel, list[Structure]],
) -> None:
    model, structures = family
    outputs = Outputs.default_for(model.outputs)
    before = [(s.positions.copy(), s.cell.copy(), s.numbers.copy()) for s in structures]
    together = model.predict([model.prepare(s) for s in structures], outputs)
    for structure, (positions, cell, numbers) in zip(structures, before, strict=True):
        np.testing.assert_array_equal(structure.positions, positions)
        np.testing.assert_array_equal(structure.cell, cell)
        np.testing.assert_array_equal(structure.numbers, numbers)
    for structure, batched in zip(structures, together, strict=True):
        alone = model.predict([model.prepare(structure)], outputs)[0]
        if "energy" in model.outputs:
            scale = 1.0 + abs(alone.energy)
            assert batched.energy == pytest.approx(alone.energy, rel=1e-10, abs=1e-10 * scale)
        a, b = alone.array_outputs(), batched.array_outputs()
        assert set(a) == set(b)
        for key in a:
            np.testing.assert_allclose(b[key], a[key], rtol=1e-9, atol=1e-9, err_msg=key)


def test_forces_and_stress_are_derivatives_of_the_energy(
    family: tuple[ServedModel, list[Structure]],
) -> None:
    model, structures = family
    if "forces" not in model.outputs:
        pytest.skip("the model computes no energy (a bare representation)")
    h = 1e-4
    box = next((s for s in structures if s.pbc.all()), None)
    assert box is not None
    prediction = model.predict([model.prepare(box)], Outputs(["energy", "forces", "stress"]))[0]
    assert prediction.forces is not None and prediction.stress is not None
    rng = np.random.default_rng(0)
    for atom in rng.choice(len(box), 2, replace=False):
        for axis in range(3):
            energies = []
            for sign in (1, -1):
                positions = box.positions.copy()
                positions[atom, axis] += sign * h
                moved = _moved(box, positions, box.cell)
                energies.append(_energy_of(model, moved))
            fd = -(energies[0] - energies[1]) / (2 * h)
            got = prediction.forces[atom, axis]
            assert got == pytest.approx(fd, abs=1e-5 * (1 + abs(fd))), (atom, axis)
    for a, b in ((0, 0), (1, 2)):
        energies = []
        for sign in (1, -1):
            strain = np.eye(3)
            strain[a, b] += sign * h / (2 if a != b else 1)
            strain[b, a] += sign * h / 2 if a != b else 0.0
            strained = _moved(box, box.positions @ strain, box.cell @ strain)
            energies.append(_energy_of(model, strained))
        fd = (energies[0] - energies[1]) / (2 * h) / box.volume
        got = prediction.stress[a, b]
        assert got == pytest.approx(fd, abs=1e-5 * (1 + abs(fd))), (a, b)


def test_a_model_that_skips_part_of_the_contract_is_not_a_served_model() -> None:
    class OnlyPredicts:
        elements = (1,)
        cutoff = 4.0

        def prepare(self, structure: Structure) -> Any:
            return structure

        def predict(self, structures: Any, outputs: Outputs) -> list[Any]:
            return []

    assert not isinstance(OnlyPredicts(), ServedModel)
