"""``RemoteCACE``: an ASE calculator whose numbers come from a cace-server.

``atoms.calc = RemoteCACE(url)`` and every ASE workflow (MD, relaxation, NEB)
runs unchanged. Each evaluation is one HTTP round trip that returns energy and
forces together (and stress for periodic systems), so ASE's follow-up property
calls for the same positions are served from the calculator's cache.
"""

from __future__ import annotations

from typing import Any

from ase.calculators.calculator import Calculator, PropertyNotImplementedError, all_changes

from cace_client.client import CACEClient


class RemoteCACE(Calculator):
    """Energy, free energy, forces, stress (periodic systems) and per-atom energies.

    ``binary=True`` sends positions and receives forces as raw float64 bytes
    (msgpack), the fast form for large systems; it falls back to JSON when msgpack
    is not installed. Numbers are exact either way.
    """

    implemented_properties = [  # noqa: RUF012 - ASE declares it a mutable instance attribute
        "energy",
        "free_energy",
        "forces",
        "stress",
        "energies",
    ]

    def __init__(
        self,
        url: str,
        model: str | None = None,
        token: str | None = None,
        binary: bool = True,
        *,
        timeout: float = 120.0,
        retries: int = 3,
        client: CACEClient | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.url = url
        self.model = model
        self.client = client or CACEClient(
            url, token, timeout=timeout, retries=retries, binary=binary, model=model
        )

    def calculate(
        self,
        atoms: Any = None,
        properties: list[str] | None = None,
        system_changes: list[str] = all_changes,
    ) -> None:
        properties = properties or ["energy"]
        super().calculate(atoms, properties, system_changes)
        assert self.atoms is not None
        periodic = bool(self.atoms.pbc.all())
        if "stress" in properties and not periodic:
            raise PropertyNotImplementedError("stress needs a structure periodic in 3-D")
        wanted = ["energy", "forces"]
        if periodic:
            wanted.append("stress")
        if "energies" in properties:
            wanted.append("energies")
        out = self.client.calculate(self.atoms, properties=wanted)
        self.results = {
            "energy": float(out["energy"]),
            "free_energy": float(out.get("free_energy", out["energy"])),
            "forces": out["forces"],
        }
        if out.get("stress") is not None:
            self.results["stress"] = out["stress"]
        if out.get("energies") is not None:
            self.results["energies"] = out["energies"]

    def close(self) -> None:
        self.client.close()
