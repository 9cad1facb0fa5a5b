"""What a served model reports about itself, as one JSON-ready dict.

``GET /v1/models`` lists these dicts (its pydantic schema ``ModelOut`` is their
OpenAPI contract) and ``cace-server info`` prints from one; neither needs FastAPI.
"""

from __future__ import annotations

from typing import Any

from ase.data import chemical_symbols

from cace_server.engine.models import ModelInfo


def info_dict(info: ModelInfo, *, sha256: str | None) -> dict[str, Any]:
    """``info`` in the wire layout; ``sha256`` is the model file's digest, if known."""
    return {
        "name": info.name,
        "default": info.default,
        "elements": list(info.elements),
        "symbols": [chemical_symbols[z] for z in info.elements],
        "cutoff": info.cutoff,
        "dtype": info.dtype,
        "device": info.device,
        "n_parameters": info.n_parameters,
        "has_charges": info.has_charges,
        # whether it splits its energy into atoms (long-range models do not)
        "per_atom_energies": "energies" in info.outputs,
        "family": info.family,
        "long_range": info.long_range,
        "outputs": list(info.outputs),
        "required_inputs": list(info.required_inputs),
        "description": info.description,
        "source": info.source,
        "sha256": sha256,
        "model_sha": info.sha,
        "committee": committee_dict(info.description.get("committee")),
    }


def committee_dict(described: Any) -> dict[str, Any] | None:
    """A committee's members and calibration, from its ``describe()`` entry."""
    if not isinstance(described, dict):
        return None
    return {
        "size": described["size"],
        "alpha": described["alpha"],
        "calibration": dict(described.get("calibration") or {}),
        "evaluation": described.get("evaluation"),
        "members": [
            {"name": m["name"], "family": m["family"], "n_parameters": m["n_parameters"]}
            for m in described["members"]
        ],
    }
