"""What a caller asks a model to compute: one set of output names, checked once.

Every output a served model can offer is described here, once: its name, where it
lives on a :class:`~cace_server.structures.Prediction`, its shape and unit, and
whether it costs extra work beyond the energy pass. A frontend turns its wire names
into an :class:`Outputs` (HTTP properties, i-PI's fixed request), the engine carries
it unchanged to the model, and the model declares the names it offers. Adding an
output is an entry in :data:`CATALOGUE`, the model computing it, and the frontends'
wire mapping.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class OutputSpec:
    """One output: the :class:`Prediction` fields it fills, its shape and its unit."""

    name: str
    #: ``Prediction`` attributes this output sets (stress also gives the virial).
    fields: tuple[str, ...]
    #: documented shape per structure; N is the number of atoms, k a model-defined width
    shape: str
    unit: str
    description: str
    #: whether asking for it costs model work beyond energy, forces and stress
    #: (extra backward passes); cheap outputs come free with the energy pass.
    extra_cost: bool = False
    #: whether the server offers it to its clients (descriptors are for the Python
    #: API and training, not served)
    served: bool = True


#: Every output a served model may offer, in the order they are listed everywhere.
CATALOGUE: dict[str, OutputSpec] = {
    spec.name: spec
    for spec in (
        OutputSpec("energy", ("energy",), "()", "eV", "total potential energy"),
        OutputSpec("forces", ("forces",), "(N, 3)", "eV/Å", "-dE/dR"),
        OutputSpec(
            "stress",
            ("stress", "virial"),
            "(3, 3)",
            "eV/Å^3 (virial: eV)",
            "stress of 3-D periodic structures (ASE sign); virial = -stress x volume",
        ),
        OutputSpec("energies", ("energies",), "(N,)", "eV", "per-atom energies"),
        OutputSpec(
            "charges",
            ("charges",),
            "(N,) or (N, k)",
            "e",
            "latent charges of long-range and dipole models",
        ),
        OutputSpec("dipole", ("dipole",), "(3,)", "e·Å", "electric dipole of dipole models"),
        OutputSpec(
            "bec",
            ("bec",),
            "(N, 3, 3)",
            "e",
            "Born effective charges, bec[i, a, b] = d dipole_b / d R_ia",
            extra_cost=True,
        ),
        OutputSpec(
            "energy_uncertainty",
            ("energy_uncertainty",),
            "()",
            "eV",
            "committee models: alpha x the members' sample standard deviation of the energy",
        ),
        OutputSpec(
            "forces_uncertainty",
            ("forces_uncertainty",),
            "(N,)",
            "eV/Å",
            "committee models: alpha x the norm of each atom's per-component force spread",
            extra_cost=True,
        ),
        OutputSpec(
            "committee_energies",
            ("committee_energies",),
            "(M,)",
            "eV",
            "committee models: each member's energy (M members, not rescaled)",
        ),
        OutputSpec(
            "committee_forces",
            ("committee_forces",),
            "(M, N, 3)",
            "eV/Å",
            "committee models: each member's forces (not rescaled)",
            extra_cost=True,
        ),
        OutputSpec(
            "committee_virials",
            ("committee_virials",),
            "(M, 3, 3)",
            "eV",
            "committee models: each member's virial, -dE/d(strain) (not rescaled)",
            extra_cost=True,
        ),
        OutputSpec(
            "descriptors",
            ("descriptors",),
            "(N, k)",
            "",
            "per-atom descriptors (the node features the heads read)",
            extra_cost=True,
            served=False,
        ),
    )
}

#: ``Prediction`` attributes set only when asked for (every field but the energy):
#: arrays, and the scalar ``energy_uncertainty`` (a float).
ARRAY_FIELDS: tuple[str, ...] = tuple(
    field for spec in CATALOGUE.values() for field in spec.fields if field != "energy"
)

#: Outputs only committee models compute (a plain model refuses them).
COMMITTEE_OUTPUTS: tuple[str, ...] = (
    "energy_uncertainty",
    "forces_uncertainty",
    "committee_energies",
    "committee_forces",
    "committee_virials",
)


class UnknownOutput(ValueError):
    """A name that is not an output of any model."""


class OutputNotOffered(ValueError):
    """An output was asked of a model that does not compute it."""


class Outputs(frozenset[str]):
    """A validated, immutable set of output names (see :data:`CATALOGUE`).

    ``Outputs()`` is energy, forces and stress, what MD engines ask for;
    ``Outputs(["energy"])`` only the energy. Iteration follows the catalogue order.
    A :class:`~cace_server.structures.Prediction` always carries its energy (NaN for
    a model without one); the set says what else is computed and returned.
    """

    def __new__(cls, names: Iterable[str] | None = None) -> Outputs:
        chosen = DEFAULT_NAMES if names is None else tuple(names)
        unknown = [name for name in chosen if name not in CATALOGUE]
        if unknown:
            raise UnknownOutput(
                f"unknown output(s) {', '.join(map(repr, unknown))}; "
                f"outputs are {', '.join(CATALOGUE)}"
            )
        return super().__new__(cls, chosen)

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter([name for name in CATALOGUE if name in self])

    def __or__(self, other: Iterable[str]) -> Outputs:  # type: ignore[override]
        return Outputs([*frozenset.__iter__(self), *other])

    def __repr__(self) -> str:
        return f"Outputs({list(self)!r})"

    def not_in(self, offered: Iterable[str]) -> tuple[str, ...]:
        """The names of this set that ``offered`` lacks, in catalogue order."""
        available = set(offered)
        return tuple(name for name in self if name not in available)

    def require(self, offered: Sequence[str], who: str = "the model") -> None:
        """Raise :class:`OutputNotOffered` naming what of this set ``offered`` lacks."""
        missing = self.not_in(offered)
        if missing:
            raise OutputNotOffered(
                f"{who} does not compute {', '.join(missing)} (it offers {', '.join(offered)})"
            )

    @property
    def fields(self) -> frozenset[str]:
        """The ``Prediction`` attributes these outputs fill."""
        return frozenset(field for name in self for field in CATALOGUE[name].fields)

    @staticmethod
    def default_for(offered: Iterable[str]) -> Outputs:
        """What a caller that names nothing gets from a model offering ``offered``:
        every output that comes with the energy pass (all of them if none does)."""
        names = tuple(offered)
        cheap = [name for name in names if not CATALOGUE[name].extra_cost]
        return Outputs(cheap or names)

    @staticmethod
    def combined(sets: Iterable[Outputs]) -> Outputs:
        """Everything any of ``sets`` asks for (what one batch computes)."""
        names: set[str] = set()
        for chosen in sets:
            names.update(frozenset.__iter__(chosen))
        return Outputs(names)


DEFAULT_NAMES = ("energy", "forces", "stress")


#: The outputs the server offers its clients, in catalogue order.
SERVED = tuple(name for name, spec in CATALOGUE.items() if spec.served)
