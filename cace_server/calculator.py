"""An ASE calculator that runs a CACE model in this process (no server).

For remote evaluation use ``cace_client.RemoteCACE``; both return the same
numbers for the same model file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ase.calculators.calculator import Calculator, all_changes

from cace_server.model.io import load_model
from cace_server.model.potential import CACEPotential
from cace_server.outputs import Outputs
from cace_server.structures import Structure, voigt


class CACECalculator(Calculator):
    """Energy, forces, stress (3-D periodic cells) and latent charges (CACE-LR)."""

    implemented_properties = ["energy", "free_energy", "forces", "stress", "energies"]  # noqa: RUF012

    def __init__(
        self,
        model: CACEPotential | str | Path,
        *,
        device: str = "cpu",
        dtype: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.model = (
            model
            if isinstance(model, CACEPotential)
            else load_model(model, device=device, dtype=dtype)
        )

    def calculate(
        self,
        atoms: Any = None,
        properties: Any = ("energy",),
        system_changes: Any = all_changes,
    ) -> None:
        super().calculate(atoms, properties, system_changes)
        structure = Structure.from_ase(self.atoms)
        want_stress = "stress" in properties and bool(structure.pbc.all())
        outputs = self.model.default_outputs
        if not want_stress:
            outputs = Outputs(name for name in outputs if name != "stress")
        prediction = self.model.predict([structure], outputs)[0]
        self.results = {"energy": prediction.energy, "free_energy": prediction.energy}
        self.results["forces"] = prediction.forces
        if prediction.energies is not None:
            self.results["energies"] = prediction.energies
        if prediction.stress is not None:
            self.results["stress"] = voigt(prediction.stress)
        if prediction.charges is not None:
            self.results["charges"] = prediction.charges
