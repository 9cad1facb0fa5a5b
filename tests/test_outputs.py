"""The requested-outputs type, and that every frontend maps its wire onto it."""

from __future__ import annotations

import dataclasses
from typing import get_args

import numpy as np
import pytest

from cace_server.http.schemas import DEFAULT_PROPERTIES, Property, Result
from cace_server.ipi.engine_evaluator import IPI_EXTRAS, IPI_REQUIRED, ipi_outputs
from cace_server.outputs import CATALOGUE, SERVED, Outputs, UnknownOutput
from cace_server.structures import Prediction


def test_outputs_validate_and_iterate_in_catalogue_order() -> None:
    assert list(Outputs()) == ["energy", "forces", "stress"]
    assert list(Outputs(["bec", "energy", "charges"])) == ["energy", "charges", "bec"]
    with pytest.raises(UnknownOutput, match="'magnetisation'"):
        Outputs(["energy", "magnetisation"])
    both = Outputs.combined([Outputs(["energy"]), Outputs(["forces", "bec"])])
    assert isinstance(both, Outputs) and set(both) == {"energy", "forces", "bec"}
    assert Outputs(["stress"]).fields == {"stress", "virial"}
    assert Outputs(["forces", "bec"]).not_in(("energy", "forces")) == ("bec",)
    assert isinstance(Outputs(["energy"]) | {"forces"}, Outputs)


def test_default_is_what_comes_with_the_energy_pass() -> None:
    offered = ("energy", "forces", "stress", "charges", "dipole", "bec", "descriptors")
    assert list(Outputs.default_for(offered)) == [
        "energy",
        "forces",
        "stress",
        "charges",
        "dipole",
    ]
    assert list(Outputs.default_for(("descriptors",))) == ["descriptors"]


def test_every_catalogue_field_is_a_prediction_attribute() -> None:
    attributes = {f.name for f in dataclasses.fields(Prediction)}
    for spec in CATALOGUE.values():
        assert set(spec.fields) <= attributes, spec.name


def test_keep_only_drops_what_was_not_asked() -> None:
    full = Prediction(
        energy=1.0,
        forces=np.zeros((2, 3)),
        stress=np.eye(3),
        virial=np.eye(3),
        energies=np.zeros(2),
        charges=np.zeros(2),
    )
    kept = full.keep_only(Outputs(["energy", "forces"]))
    assert set(kept.array_outputs()) == {"forces"} and kept.energy == 1.0


def test_http_properties_are_the_served_outputs() -> None:
    """HTTP's property names are output names, one for one (no translation table)."""
    assert set(get_args(Property)) == set(SERVED)
    assert Outputs(DEFAULT_PROPERTIES) == Outputs()
    result_fields = set(Result.model_fields)
    for name in SERVED:
        assert set(CATALOGUE[name].fields) <= result_fields | {"energy"}, name


def test_ipi_asks_for_what_its_extras_carry() -> None:
    assert set(IPI_REQUIRED) | set(IPI_EXTRAS) | {"bec"} <= set(SERVED)
    offered = ("energy", "forces", "stress", "energies", "charges", "dipole", "bec")
    assert list(ipi_outputs(offered, bec=False)) == [
        "energy",
        "forces",
        "stress",
        "charges",
        "dipole",
    ]
    assert "bec" in ipi_outputs(offered, bec=True)
    assert list(ipi_outputs(("energy", "forces", "stress"), bec=True)) == list(Outputs())
