"""cace-server: serve CACE machine-learned interatomic potentials to i-PI and ASE."""

from __future__ import annotations

import importlib.metadata


def _installed_version() -> str:
    try:
        return importlib.metadata.version("cace-server")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - source checkout
        return "0+unknown"


__version__ = _installed_version()
