"""Dipole and Born-effective-charge models (LES-BEC): ``cace.modules.polarization``
``Polarization`` and ``Dephase``, and ``cace.modules.grad.Grad``.

``Polarization`` turns the latent charges into a polarization (in a periodic cell
the original's Berry-phase form), ``Grad`` differentiates it with respect to the
positions and ``Dephase`` multiplies by the conjugate phase of each atom, which
gives the Born effective charges. Our model computes the same from its charge
head; the BEC is requested per evaluation because it costs extra backward passes.
"""

from __future__ import annotations

from cace_server.model.checkpoint import PickledObject, UnsupportedCheckpointError
from cace_server.model.config import PolarizationConfig
from cace_server.model.importer.assembly import ModelScope
from cace_server.model.importer.core import charges_of
from cace_server.model.importer.registry import output_module_reader
from cace_server.model.importer.tree import attr


def polarization_charge_inputs(module: PickledObject) -> list[str]:
    return [str(attr(module, "charge_key", "q"))]


@output_module_reader(
    ("cace.modules.polarization", "Polarization"),
    charge_inputs=polarization_charge_inputs,
    family="polarization",
)
def read_polarization(module: PickledObject, scope: ModelScope) -> None:
    if attr(module, "output_index") is not None:
        raise UnsupportedCheckpointError("single-component polarization heads are not supported")
    scope.assembly.set_polarization(
        PolarizationConfig(
            charge_readout=charges_of(scope, str(attr(module, "charge_key", "q"))),
            normalization=float(attr(module, "normalization_factor", 1.0 / 9.48933)),
            remove_mean=bool(attr(module, "remove_mean", True)),
            periodic=bool(attr(module, "pbc", False)),
            bec=False,
        )
    )
    scope.gradients[str(attr(module, "output_key", "polarization"))] = "polarization"


@output_module_reader(("cace.modules.grad", "Grad"), family="polarization")
def read_grad(module: PickledObject, scope: ModelScope) -> None:
    y, x = attr(module, "y_key"), attr(module, "x_key")
    polarization = scope.assembly.polarization
    if scope.gradients.get(y) != "polarization" or x != "positions" or polarization is None:
        raise UnsupportedCheckpointError(
            f"gradient of {y!r} with respect to {x!r}: only d(polarization)/d(positions) "
            "(Born effective charges) is supported"
        )
    polarization.bec = True
    scope.gradients[str(attr(module, "output_key", "gradient"))] = "bec"


@output_module_reader(("cace.modules.polarization", "Dephase"), family="polarization")
def read_dephase(module: PickledObject, scope: ModelScope) -> None:
    if scope.gradients.get(attr(module, "input_key")) != "bec":
        raise UnsupportedCheckpointError("Dephase of anything but the BEC is not supported")
    if attr(module, "input_index") is not None:
        raise UnsupportedCheckpointError("single-component Dephase is not supported")
