"""A committee of CACE models served as one model: the mean and the spread.

Active learning with a committee (Musil et al., JCTC 15, 906 (2019); i-PI's
``<ffcommittee>``) needs every member's energy, forces and virial for each
structure. :class:`Committee` evaluates all members in one call with one neighbour
list: the members must share elements and cutoff, and may differ in anything else.
The prediction is the members' mean; the uncertainty is the members' sample
standard deviation (``ddof=1``, as i-PI computes it) times the calibration factor
``alpha`` (i-PI's ``<alpha>``: the spread of a committee trained by subsampling
underestimates its error, and one factor fitted on held-out data corrects it).

A committee is given as ``a.safetensors,b.safetensors,...`` or as a committee file
(TOML) that lists its members and its calibration; see :func:`read_committee_file`.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cace_server.model.committee_pass import MemberNeeds, MemberResults, SharedEdgePass
from cace_server.model.io import DEFAULT_POLICY, ModelFileError, ModelFilePolicy, load_model
from cace_server.model.neighbors import PreparedStructure, VerletList
from cace_server.model.potential import CACEPotential
from cace_server.outputs import COMMITTEE_OUTPUTS, Outputs
from cace_server.structures import BatchCost, Prediction, Structure

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

#: What a committee averages over its members (when every member offers it).
AVERAGED = ("energy", "forces", "stress", "energies")


class CommitteeError(ModelFileError):
    """Members that cannot form a committee, or an invalid committee file."""


@dataclass(frozen=True)
class CommitteeSpec:
    """The members of a committee and its calibration, as a user gives them."""

    members: tuple[Path, ...]
    alpha: float = 1.0
    #: the committee file it was read from (None: a comma-separated list)
    source: Path | None = None
    #: how alpha was fitted (written by ``cace-server calibrate``), shown by /v1/models
    calibration: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        where = f"{self.source}: " if self.source is not None else ""
        if len(self.members) < 2:
            raise CommitteeError(
                f"{where}a committee needs at least two members, got {len(self.members)}"
            )
        check_alpha(self.alpha, where)


def check_alpha(alpha: float, where: str = "") -> None:
    if not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha <= 0:
        raise CommitteeError(f"{where}alpha must be a positive number, got {alpha!r}")


def committee_spec(source: str) -> CommitteeSpec | None:
    """The committee a model source names, or None for a single model file.

    ``a.safetensors,b.safetensors`` lists the members; a ``.toml`` file is a
    committee file.
    """
    if "," in source:
        members = [part.strip() for part in source.split(",")]
        if any(not m for m in members):
            raise CommitteeError(f"empty member in the committee list {source!r}")
        return CommitteeSpec(tuple(Path(m) for m in members))
    if source.endswith(".toml"):
        return read_committee_file(source)
    return None


def read_committee_file(path: str | Path) -> CommitteeSpec:
    """Read a committee file::

    members = ["seed1.safetensors", "seed2.safetensors"]  # relative to this file
    alpha = 1.0                                            # optional
    [calibration]                                          # optional, informative
    data = "valid.extxyz"
    """
    path = Path(path)
    if not path.is_file():
        raise CommitteeError(f"committee file {path} does not exist")
    try:
        with open(path, "rb") as f:
            table = tomllib.load(f)
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise CommitteeError(f"{path}: not a TOML committee file ({exc})") from exc
    unknown = set(table) - {"members", "alpha", "calibration"}
    if unknown:
        raise CommitteeError(f"{path}: unknown keys {sorted(unknown)}")
    members = table.get("members")
    if not isinstance(members, list) or not all(isinstance(m, str) and m for m in members):
        raise CommitteeError(f"{path}: 'members' must be a list of model file names")
    calibration = table.get("calibration", {})
    if not isinstance(calibration, dict):
        raise CommitteeError(f"{path}: 'calibration' must be a table")
    return CommitteeSpec(
        tuple(path.parent / m for m in members),
        alpha=table.get("alpha", 1.0),
        source=path,
        calibration=calibration,
    )


def write_committee_file(path: str | Path, spec: CommitteeSpec) -> None:
    """Write ``spec`` as a committee file (members relative to its folder where possible)."""
    path = Path(path)
    folder = path.parent.resolve()
    names = []
    for member in spec.members:
        resolved = member.resolve()
        names.append(
            str(resolved.relative_to(folder)) if resolved.is_relative_to(folder) else str(resolved)
        )
    lines = [
        "# A committee of CACE models, served as one: cace-server serve --model NAME=THIS_FILE",
        f"members = [{', '.join(json.dumps(n) for n in names)}]",
        f"alpha = {float(spec.alpha)!r}",
    ]
    if spec.calibration:
        lines.append("")
        lines.append("[calibration]")
        for key, value in spec.calibration.items():
            lines.append(f"{key} = {_toml_value(value)}")
    path.write_text("\n".join(lines) + "\n")


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(float(value)) if isinstance(value, float) else str(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(str(value))


def load_committee(
    spec: CommitteeSpec,
    *,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype | None = None,
    policy: ModelFilePolicy = DEFAULT_POLICY,
) -> Committee:
    """Load every member (in ``dtype``, else the first member's) and check they agree."""
    members = []
    for path in spec.members:
        if not path.is_file():
            raise CommitteeError(f"committee member {path} does not exist")
        members.append(load_model(path, device=device, dtype=dtype, policy=policy))
    if dtype is None:
        members = [m.to(dtype=members[0].dtype) for m in members]
    names = [p.stem for p in spec.members]
    return Committee(members, alpha=spec.alpha, names=names, calibration=spec.calibration)


class Committee(torch.nn.Module):
    """M CACE models evaluated together; a served model (``ServedModel``) itself.

    Members without message passing or a long-range term that share a cutoff
    function and angular order (their trained radial frequencies may differ) are
    evaluated by :class:`SharedEdgePass`: the edge work and its backward pass are
    done once for all of them, and off the CPU members of one architecture run their
    node-level work with a member axis (``cace_server.model.stacked``). Others are
    evaluated one after the other on the same prepared structures.
    """

    def __init__(
        self,
        members: Sequence[CACEPotential],
        *,
        alpha: float = 1.0,
        names: Sequence[str] | None = None,
        calibration: dict[str, Any] | None = None,
        shared: bool = True,
    ) -> None:
        """``shared=False`` evaluates members one after the other even where they
        could share the edge pass (for comparisons)."""
        super().__init__()
        names = list(names) if names is not None else [f"member{i}" for i in range(len(members))]
        if len(members) < 2:
            raise CommitteeError(f"a committee needs at least two members, got {len(members)}")
        check_alpha(alpha)
        check_compatible(members, names)
        self.members = torch.nn.ModuleList(members)
        self.names = names
        self.alpha = float(alpha)
        self.calibration = dict(calibration or {})
        self.shared = SharedEdgePass.for_members(members) if shared else None

    def _members(self) -> list[CACEPotential]:
        return [m for m in self.members if isinstance(m, CACEPotential)]

    @property
    def size(self) -> int:
        return len(self.members)

    # -- the ServedModel contract ----------------------------------------------------------
    @property
    def elements(self) -> tuple[int, ...]:
        return self._members()[0].elements

    @property
    def cutoff(self) -> float:
        return self._members()[0].cutoff

    @property
    def dtype(self) -> torch.dtype:
        return self._members()[0].dtype

    @property
    def device(self) -> torch.device:
        return self._members()[0].device

    @property
    def n_parameters(self) -> int:
        return sum(m.n_parameters for m in self._members())

    @property
    def outputs(self) -> tuple[str, ...]:
        common = set.intersection(*(set(m.outputs) for m in self._members()))
        return tuple(name for name in AVERAGED if name in common) + COMMITTEE_OUTPUTS

    @property
    def default_outputs(self) -> Outputs:
        return Outputs.default_for(self.outputs)

    @property
    def required_inputs(self) -> tuple[str, ...]:
        names: dict[str, None] = {}
        for m in self._members():
            names.update(dict.fromkeys(m.required_inputs))
        return tuple(names)

    def describe(self) -> dict[str, object]:
        members = self._members()
        descriptions = [m.describe() for m in members]
        long_range = next((d["long_range"] for d in descriptions if d["long_range"]), None)
        return {
            "family": ["committee"],
            "outputs": list(self.outputs),
            "required_inputs": list(self.required_inputs),
            "long_range": long_range,
            "elements": list(self.elements),
            "cutoff": self.cutoff,
            "committee": {
                "size": self.size,
                "alpha": self.alpha,
                "calibration": self.calibration,
                "evaluation": "shared edge pass" if self.shared is not None else "member loop",
                "members": [
                    {
                        "name": name,
                        "family": d["family"],
                        "n_parameters": m.n_parameters,
                        "long_range": d["long_range"] is not None,
                        "message_passing_layers": d["message_passing_layers"],
                        "max_l": d["max_l"],
                        "max_nu": d["max_nu"],
                    }
                    for name, m, d in zip(self.names, members, descriptions, strict=True)
                ],
            },
        }

    def prepare(self, structure: Structure) -> PreparedStructure:
        return self._members()[0].prepare(structure)

    def verlet_list(self, skin: float) -> VerletList:
        return self._members()[0].verlet_list(skin)

    def batch_cost(self, prepared: PreparedStructure) -> BatchCost:
        """Each member's pass reads every pair: M times the pairs of one member."""
        return BatchCost(prepared.n_atoms, prepared.n_pairs * self.size)

    def configure_long_range(self, **options: Any) -> None:
        for m in self._members():
            m.configure_long_range(**options)

    # -- evaluation ------------------------------------------------------------------------
    def predict(
        self,
        structures: Sequence[Structure | PreparedStructure],
        outputs: Iterable[str] | None = None,
    ) -> list[Prediction]:
        """The members' mean and spread, and what else of :data:`COMMITTEE_OUTPUTS` is asked."""
        chosen = self.default_outputs if outputs is None else Outputs(outputs)
        chosen.require(self.outputs, "the committee")
        prepared = [s if isinstance(s, PreparedStructure) else self.prepare(s) for s in structures]
        member_forces = bool({"forces_uncertainty", "committee_forces"} & chosen)
        need = MemberNeeds(
            forces="forces" in chosen or member_forces,
            virial="stress" in chosen or "committee_virials" in chosen,
            energies="energies" in chosen,
            per_member=member_forces or "committee_virials" in chosen,
        )
        predictions: list[Prediction] = []
        # Compiled members run their own compiled calls (one graph each), not the
        # eager pass that shares the edge work between them.
        compiled = any(m.compiled is not None and m.compiled.enabled for m in self._members())
        for group in self._members()[0]._groups(prepared):
            if self.shared is not None and not compiled and self.shared.applies_to(group):
                results = self.shared.run(group, need)
            else:
                results = self._member_loop(group, need)
            predictions.extend(combine(results, self.alpha, chosen))
        return predictions

    def _member_loop(self, group: list[PreparedStructure], need: MemberNeeds) -> MemberResults:
        """Members one after the other on the same prepared structures."""
        names = ["energy"]
        if need.forces:
            names.append("forces")
        if need.virial:
            names.append("stress")
        if need.energies:
            names.append("energies")
        asked = Outputs(names)
        runs = [m.predict(group, asked) for m in self._members()]
        results = MemberResults(group, np.array([[p.energy for p in run] for run in runs]))
        if need.forces:
            results.forces = _gathered(runs, "forces", np.concatenate)
        if need.virial:
            results.virial = _gathered(runs, "virial", np.stack)
        if need.energies:
            results.energies = _gathered(runs, "energies", np.concatenate)
        return results


def _gathered(runs: list[list[Prediction]], name: str, join: Any) -> np.ndarray:
    """[M, ...]: each member's ``name`` over the group, joined per member by ``join``."""
    return np.stack([join([np.asarray(getattr(p, name)) for p in run]) for run in runs])


def combine(results: MemberResults, alpha: float, chosen: Outputs) -> list[Prediction]:
    """Each structure's committee prediction (mean, spread, members) from its members'."""
    m = results.energy.shape[0]
    out = []
    start = 0
    for b, p in enumerate(results.prepared):
        atoms = slice(start, start + p.n_atoms)
        start += p.n_atoms
        energies = results.energy[:, b]
        pred = Prediction(energy=float(energies.mean()))
        pred.committee_energies = energies.copy()
        pred.energy_uncertainty = float(alpha * energies.std(ddof=1))
        if results.forces is not None:
            forces = results.forces[:, atoms]
            pred.forces = forces.mean(axis=0)
            if forces.shape[0] == m:
                pred.committee_forces = forces
                pred.forces_uncertainty = alpha * np.sqrt(forces.var(axis=0, ddof=1).sum(-1))
        if results.virial is not None:
            virials = results.virial[:, b]
            pred.virial = virials.mean(axis=0)
            if virials.shape[0] == m:
                pred.committee_virials = virials
            structure = p.structure
            if structure.is_periodic and structure.volume > 1e-8:
                pred.stress = -pred.virial / structure.volume
        if results.energies is not None:
            pred.energies = results.energies[:, atoms].mean(axis=0)
        out.append(pred.keep_only(chosen))
    return out


def check_compatible(members: Sequence[CACEPotential], names: Sequence[str]) -> None:
    """Members must read the same structures the same way: elements and cutoff."""
    first, first_name = members[0], names[0]
    for member, name in zip(members[1:], names[1:], strict=True):
        if member.elements != first.elements:
            raise CommitteeError(
                f"committee members differ in elements: {first_name} has "
                f"{list(first.elements)}, {name} has {list(member.elements)}"
            )
        if abs(member.cutoff - first.cutoff) > 1e-9:
            raise CommitteeError(
                f"committee members differ in cutoff: {first_name} has {first.cutoff} Å, "
                f"{name} has {member.cutoff} Å"
            )
        if not member.has_energy:
            raise CommitteeError(f"committee member {name} has no energy head")
    if not first.has_energy:
        raise CommitteeError(f"committee member {first_name} has no energy head")


def load_served(
    source: str | Path,
    *,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype | None = None,
    policy: ModelFilePolicy = DEFAULT_POLICY,
) -> CACEPotential | Committee:
    """A model file, a committee file, or a comma-separated list of member files."""
    spec = committee_spec(str(source))
    if spec is None:
        return load_model(source, device=device, dtype=dtype, policy=policy)
    return load_committee(spec, device=device, dtype=dtype, policy=policy)
