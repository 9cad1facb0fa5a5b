"""A reference calculator for the labelling tests, loaded by import path
(``tests.label_support:CountingEMT``): ASE's EMT that logs which structures it
computed, can be slowed down, and fails on structures of a given size."""

from __future__ import annotations

import time
from typing import Any

from ase.calculators.emt import EMT

from cace_server.train.label import structure_key


class CountingEMT(EMT):  # type: ignore[misc]
    def __init__(
        self, log: str, delay: float = 0.0, fail_natoms: int | None = None, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        self.log = log
        self.delay = delay
        self.fail_natoms = fail_natoms

    def calculate(self, atoms: Any = None, *args: Any, **kwargs: Any) -> None:
        if atoms is not None and len(atoms) == self.fail_natoms:
            raise RuntimeError(f"no convergence for {len(atoms)} atoms")
        if atoms is not None:
            with open(self.log, "a") as f:
                f.write(structure_key(atoms) + "\n")
        time.sleep(self.delay)
        super().calculate(atoms, *args, **kwargs)
