"""``RemoteCACE``: an ASE calculator whose numbers come from a cace-server.

``atoms.calc = RemoteCACE(url)`` and every ASE workflow (MD, relaxation, NEB)
runs unchanged. Each evaluation is one HTTP round trip that returns energy and
forces together (and stress for periodic systems), so ASE's follow-up property
calls for the same positions are served from the calculator's cache.
"""

from __future__ import annotations

from typing import Any

from ase.calculators.calculator import Calculator, PropertyNotImplementedError, all_changes

from cace_client.client import CACEClient, CACEServerError

#: What a committee model adds to every evaluation's results.
UNCERTAINTIES = ("energy_uncertainty", "forces_uncertainty")


class RemoteCACE(Calculator):
    """Energy, free energy, forces, stress (periodic systems) and per-atom energies;
    for models that have them, latent ``charges`` (e), the ``dipole`` (e·Å; ASE's
    ``atoms.get_dipole_moment()``) and Born effective charges as ``results["bec"]``
    (e, shape (N, 3, 3), ``bec[i, a, b] = d dipole_b / d R_{i,a}``; ask with
    ``calc.get_property("bec", atoms)``).

    ``binary=True`` sends positions and receives forces as raw float64 bytes
    (msgpack), the fast form for large systems; it falls back to JSON when msgpack
    is not installed. Numbers are exact either way.

    ``inputs``: names of per-atom arrays (``atoms.arrays``) the model reads, e.g.
    ``("charge_states",)``; by default the server is asked once which ones the model
    needs.

    When the served model is a committee, every evaluation also fills
    ``results["energy_uncertainty"]`` (eV) and ``results["forces_uncertainty"]``
    (eV/Å per atom): alpha x the members' standard deviation. The server is asked
    once (``GET /v1/models``) what the model computes.
    """

    implemented_properties = [  # noqa: RUF012 - ASE declares it a mutable instance attribute
        "energy",
        "free_energy",
        "forces",
        "stress",
        "energies",
        "charges",
        "dipole",
        "bec",
        "energy_uncertainty",
        "forces_uncertainty",
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
        inputs: tuple[str, ...] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.url = url
        self.model = model
        self.inputs = inputs
        self._outputs: tuple[str, ...] | None = None
        self.client = client or CACEClient(
            url, token, timeout=timeout, retries=retries, binary=binary, model=model
        )

    def _describe(self) -> None:
        """Ask ``GET /v1/models`` once what the model needs and what it computes."""
        listing = self.client.models()
        name = self.model or listing["default"]
        found = [m for m in listing["models"] if m["name"] == name]
        if self.inputs is None:
            self.inputs = tuple(found[0].get("required_inputs", ())) if found else ()
        self._outputs = tuple(found[0].get("outputs", ())) if found else ()

    def _inputs(self) -> tuple[str, ...]:
        """The per-atom inputs of the model."""
        if self.inputs is None:
            self._describe()
        assert self.inputs is not None
        return self.inputs

    def _offered(self) -> tuple[str, ...]:
        """What the model computes (its ``outputs``)."""
        if self._outputs is None:
            self._describe()
        assert self._outputs is not None
        return self._outputs

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
        wanted += [p for p in ("energies", "charges", "dipole", "bec") if p in properties]
        # A committee's uncertainties come with every evaluation (they cost little).
        wanted += [p for p in UNCERTAINTIES if p in properties or p in self._offered()]
        try:
            out = self.client.calculate(self.atoms, properties=wanted, inputs=self._inputs())
        except CACEServerError as exc:
            if exc.kind == "unsupported_property":
                raise PropertyNotImplementedError(exc.message) from exc
            raise
        self.results = {
            "energy": float(out["energy"]),
            "free_energy": float(out.get("free_energy", out["energy"])),
            "forces": out["forces"],
        }
        if out.get("stress") is not None:
            self.results["stress"] = out["stress"]
        for key in ("energies", "charges", "dipole", "bec", *UNCERTAINTIES):
            if out.get(key) is not None:
                self.results[key] = out[key]

    def close(self) -> None:
        self.client.close()
