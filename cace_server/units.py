"""The one place where atomic units (i-PI: Bohr, Hartree) meet ASE units (Å, eV).

The two base factors are exactly the ones i-PI 3.x uses in its unit table
(``ipi.utils.units.UnitMap``: ``length/angstrom`` and ``energy/electronvolt``), so a
position that i-PI read from an Å input file and converted to Bohr comes back here as
the same Å value (to the last bit but one), and an energy we return in eV reads in
i-PI's output in ``electronvolt`` as the value we computed.

Derived factors are built from the base two, never taken from another table:
i-PI's own table rounds ``force/ev/ang`` to 0.019446904, 1.1e-7 off the ratio
``HARTREE_PER_EV / BOHR_PER_ANGSTROM``; we keep the ratio so that the forces i-PI
receives stay the exact gradient of the energy it receives (energy conservation does
not depend on a rounding of the unit table). ASE's own constants (CODATA 2014) differ
from these by ~1e-8 relative; ASE's ``SocketIOCalculator`` converts with those.
"""

from __future__ import annotations

#: Bohr per Ångström (i-PI: ``unit_to_internal("length", "angstrom", 1.0)``).
BOHR_PER_ANGSTROM: float = 1.8897261
#: Ångström per Bohr.
ANGSTROM_PER_BOHR: float = 1.0 / BOHR_PER_ANGSTROM
#: Hartree per electronvolt (i-PI: ``unit_to_internal("energy", "electronvolt", 1.0)``).
HARTREE_PER_EV: float = 0.036749326
#: Electronvolt per Hartree.
EV_PER_HARTREE: float = 1.0 / HARTREE_PER_EV
#: (Hartree/Bohr) per (eV/Å): forces from ASE units to atomic units.
FORCE_AU_PER_EV_ANGSTROM: float = HARTREE_PER_EV / BOHR_PER_ANGSTROM
#: (Hartree/Bohr^3) per (eV/Å^3): stress/pressure from ASE units to atomic units.
PRESSURE_AU_PER_EV_ANGSTROM3: float = HARTREE_PER_EV / BOHR_PER_ANGSTROM**3

__all__ = [
    "ANGSTROM_PER_BOHR",
    "BOHR_PER_ANGSTROM",
    "EV_PER_HARTREE",
    "FORCE_AU_PER_EV_ANGSTROM",
    "HARTREE_PER_EV",
    "PRESSURE_AU_PER_EV_ANGSTROM3",
]
