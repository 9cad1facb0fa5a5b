"""A PES file for ``i-pi-py_driver -m custom``: our model, one structure per call.

This is what a user has without cace-server: i-PI's own Python driver calling the
model on each bead separately. Used by benchmarks/ipi.py as a baseline.

    i-pi-py_driver -m custom -P benchmarks/ipi_cace_pes.py -u -a NAME \\
        -o model=water.safetensors,template=init.xyz,dtype=float32
"""

from __future__ import annotations

import ase.io
import numpy as np
import torch
from ipi.pes.dummy import Dummy_driver

from cace_server.ipi.convert import results_to_wire, structures_from_wire
from cace_server.model import load_model

__DRIVER_NAME__ = "cace_custom"
__DRIVER_CLASS__ = "CaceCustomDriver"


class CaceCustomDriver(Dummy_driver):
    def __init__(
        self, model: str, template: str, dtype: str = "float64", threads: str = "2", *args, **kwargs
    ):  # type: ignore[no-untyped-def]
        self.model = load_model(model, dtype=dtype)
        self.numbers = np.asarray(ase.io.read(template).get_atomic_numbers())
        torch.set_num_threads(int(threads))
        super().__init__(*args, **kwargs)

    def compute_structure(self, cell, pos):  # type: ignore[no-untyped-def]
        structures = structures_from_wire(
            np.asarray(cell)[None], np.asarray(pos)[None], self.numbers, True
        )
        prediction = self.model.predict(structures)
        energies, forces, virials = results_to_wire(prediction, structures)
        return float(energies[0]), forces[0], virials[0], ""
