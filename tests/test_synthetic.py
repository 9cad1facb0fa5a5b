"""Checkpoints no published file covers convert and equal the original.

Reads ../shared/reference/synthetic (README there), with the tolerances of the
published folder (tests/published_support.py):

* ``cutoff-not-float32``: a cutoff of 5.29 Å, which the original's envelope holds as
  the float32 buffer 5.289999961853027 while its neighbour list uses 5.29, and an
  Ewald term with sigma 1.5 and dl 3;
* ``atomwise-extra-feature``: an energy head that reads the per-atom input
  ``charge_states`` after the node features, on three charge-state patterns.
"""

from __future__ import annotations

import numpy as np
import pytest

from cace_server.model import convert_original
from cace_server.structures import StructureError
from tests.conftest import REFERENCE_DIR
from tests.published_support import compare_checkpoint, model_names, prefixes, structure

SYNTHETIC = REFERENCE_DIR / "synthetic"
NAMES = model_names(SYNTHETIC) if SYNTHETIC.is_dir() else []


def _skip_without_data() -> None:
    if not NAMES:
        pytest.skip(f"synthetic reference models not present at {SYNTHETIC}")


def test_synthetic_folder_has_both_models() -> None:
    _skip_without_data()
    assert NAMES == ["atomwise-extra-feature.pth", "cutoff-not-float32.pth"]


@pytest.mark.parametrize("float32", [False, True], ids=["float64", "float32"])
@pytest.mark.parametrize("name", NAMES or ["<absent>"])
def test_synthetic_model_equals_original(name: str, float32: bool) -> None:
    _skip_without_data()
    result = compare_checkpoint(SYNTHETIC, name, float32=float32)
    assert result.converted, result.error
    assert {"energy", "forces"} <= set(result.scores), result.error
    bad = {q: result.deviations[q] for q, s in result.scores.items() if s > 1.0}
    assert not bad, f"deviations beyond tolerance: {bad}"


def test_envelope_uses_the_stored_float32_cutoff() -> None:
    _skip_without_data()
    model = convert_original(SYNTHETIC / "cutoff-not-float32.pth", dtype="float64")
    assert model.cutoff == 5.29
    assert model.config.envelope_cutoff == float(np.float32(5.29))
    assert model.representation.cutoff_fn.cutoff == float(np.float32(5.29))


def test_every_charge_state_pattern_is_compared() -> None:
    _skip_without_data()
    npz = np.load(SYNTHETIC / "atomwise-extra-feature.npz")
    assert prefixes(npz) == ["box", "cluster", "mixed"]
    model = convert_original(SYNTHETIC / "atomwise-extra-feature.pth", dtype="float64")
    assert model.required_inputs == ("charge_states",)
    box, mixed = structure(npz, "box"), structure(npz, "mixed")
    np.testing.assert_array_equal(box.positions, mixed.positions)
    # The input changes the result: the two patterns differ as the original's do.
    e_box, e_mixed = (p.energy for p in model.predict([box, mixed]))
    ref_box, ref_mixed = float(npz["box_CACE_energy"][0]), float(npz["mixed_CACE_energy"][0])
    assert abs((e_box - e_mixed) - (ref_box - ref_mixed)) < 1e-9
    assert abs(e_box - e_mixed) > 0.5


def test_missing_per_atom_input_is_a_structure_error() -> None:
    _skip_without_data()
    model = convert_original(SYNTHETIC / "atomwise-extra-feature.pth", dtype="float64")
    npz = np.load(SYNTHETIC / "atomwise-extra-feature.npz")
    s = structure(npz, "cluster")
    bare = type(s).create(s.numbers, s.positions, s.cell, s.pbc)
    with pytest.raises(StructureError, match="charge_states"):
        model.predict([bare])
    wide = type(s).create(
        s.numbers, s.positions, s.cell, s.pbc, arrays={"charge_states": np.zeros((len(s), 2))}
    )
    with pytest.raises(StructureError, match="reads 1"):
        model.predict([wide])


@pytest.mark.parametrize("name", NAMES or ["<absent>"])
def test_model_file_keeps_the_stored_constants_and_inputs(name: str, tmp_path) -> None:
    from cace_server.model import load_model, save_model

    _skip_without_data()
    model = convert_original(SYNTHETIC / name, dtype="float64")
    loaded = load_model(save_model(model, tmp_path / "m.safetensors"), dtype="float64")
    ours, theirs = loaded.config.to_dict(), model.config.to_dict()
    assert {**ours, "dtype": ""} == {**theirs, "dtype": ""}
    assert loaded.config.envelope_cutoff == model.config.envelope_cutoff
    assert loaded.required_inputs == model.required_inputs
    npz = np.load(SYNTHETIC / name.replace(".pth", ".npz"))
    s = structure(npz, "box")
    assert loaded.predict([s])[0].energy == model.predict([s])[0].energy
