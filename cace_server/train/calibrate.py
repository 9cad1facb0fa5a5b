"""Calibrating a committee's uncertainty on labelled data: the factor ``alpha``.

A committee's spread sigma (the members' sample standard deviation, ``ddof=1``)
is a relative measure; its scale is fitted on held-out data. If the committee
mean's error ``err_i`` is Gaussian with variance ``alpha^2 sigma_i^2``, the
maximum-likelihood ``alpha^2`` is ``mean(err_i^2 / sigma_i^2)`` (Musil et al.,
JCTC 15, 906 (2019); i-PI's ``<alpha>`` has this meaning). For energies,
``err`` and ``sigma`` are per atom; for forces, per atom as the norms of the
force error and of the per-component spread (``forces_uncertainty`` at alpha 1).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from cace_server.model.committee import Committee
from cace_server.train.data import LabelledStructure, check_elements

#: what can be calibrated -> (unit of the table, factor from eV-based values)
QUANTITIES = {"energy": ("meV/atom", 1000.0), "forces": ("meV/Å", 1000.0)}


class CalibrationError(ValueError):
    """Data that cannot calibrate the committee (no spread, nothing to compare)."""


@dataclass(frozen=True)
class Samples:
    """Observed errors of the committee mean and its raw (alpha = 1) spread."""

    quantity: str
    errors: npt.NDArray[np.float64]  # |reference - mean|, one per sample
    sigmas: npt.NDArray[np.float64]  # members' spread, one per sample
    structures: int


def committee_samples(
    committee: Committee,
    data: Sequence[LabelledStructure],
    quantity: str = "energy",
    *,
    batch_size: int = 16,
) -> Samples:
    """The committee mean's error and raw spread on ``data`` (energy per atom, or per
    atom force norms)."""
    if quantity not in QUANTITIES:
        raise CalibrationError(f"quantity must be one of {', '.join(QUANTITIES)}, got {quantity!r}")
    check_elements(data, committee.elements, "the committee's")
    outputs = ["energy", "committee_energies"]
    if quantity == "forces":
        outputs += ["forces", "committee_forces"]
    errors: list[np.ndarray] = []
    sigmas: list[np.ndarray] = []
    for k in range(0, len(data), batch_size):
        chunk = data[k : k + batch_size]
        for d, p in zip(
            chunk, committee.predict([d.structure for d in chunk], outputs), strict=True
        ):
            if quantity == "energy":
                assert p.committee_energies is not None
                n = d.n_atoms
                errors.append(np.array([abs(d.energy - p.energy) / n]))
                sigmas.append(np.array([np.std(p.committee_energies, ddof=1) / n]))
            else:
                assert p.forces is not None and p.committee_forces is not None
                errors.append(np.linalg.norm(d.forces - p.forces, axis=-1))
                spread = np.var(p.committee_forces, axis=0, ddof=1).sum(-1)
                sigmas.append(np.sqrt(spread))
    return Samples(quantity, np.concatenate(errors), np.concatenate(sigmas), len(data))


def fit_alpha(samples: Samples) -> float:
    """Maximum-likelihood alpha: sqrt(mean(err^2 / sigma^2)) over samples with a spread."""
    usable = samples.sigmas > 1e-12 * max(float(samples.sigmas.max(initial=0.0)), 1e-300)
    if not usable.any():
        raise CalibrationError("the committee's members agree exactly on the data: no spread")
    ratio = samples.errors[usable] ** 2 / samples.sigmas[usable] ** 2
    alpha = math.sqrt(float(ratio.mean()))
    if not math.isfinite(alpha) or alpha <= 0:
        raise CalibrationError(f"cannot fit alpha (got {alpha})")
    return alpha


def calibration_table(samples: Samples, alpha: float, bins: int = 5) -> str:
    """Bins of predicted uncertainty: count, predicted before/after and observed RMSE."""
    unit, scale = QUANTITIES[samples.quantity]
    order = np.argsort(samples.sigmas, kind="stable")
    groups = [g for g in np.array_split(order, max(1, min(bins, len(order)))) if len(g)]
    head = (
        f"{'predicted bin':>22}  {'count':>6}  {'predicted (alpha=1)':>19}  "
        f"{f'predicted (alpha={alpha:.3g})':>22}  {'observed RMSE':>13}"
    )
    lines = [f"{samples.quantity} ({unit}), {samples.structures} structures", head]

    def row(label: str, g: npt.NDArray[np.int64]) -> str:
        sigma = float(np.sqrt(np.mean(samples.sigmas[g] ** 2))) * scale
        rmse = float(np.sqrt(np.mean(samples.errors[g] ** 2))) * scale
        return f"{label:>22}  {len(g):>6}  {sigma:>19.4g}  {alpha * sigma:>22.4g}  {rmse:>13.4g}"

    for g in groups:
        low, high = samples.sigmas[g].min() * scale, samples.sigmas[g].max() * scale
        lines.append(row(f"{low:.3g} .. {high:.3g}", g))
    lines.append(row("all", order))
    lines.append("predicted: RMS of the uncertainty in the bin (bins by the alpha=1 uncertainty)")
    return "\n".join(lines)
