"""Error statistics of energies, forces and stresses, and their printed table."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt


@dataclass
class ErrorAccumulator:
    """Running sums; energies per atom, forces per component, stresses per component."""

    e_abs: float = 0.0
    e_sq: float = 0.0
    e_n: int = 0
    f_abs: float = 0.0
    f_sq: float = 0.0
    f_n: int = 0
    s_sq: float = 0.0
    s_n: int = 0
    loss_sum: float = 0.0
    loss_n: int = 0
    # Kept for parity plots only when asked for.
    keep: bool = False
    energies: list[tuple[float, float]] = field(default_factory=list)  # (ref, pred) eV/atom
    forces: list[tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]] = field(
        default_factory=list
    )

    def add_energy(self, reference: float, predicted: float, n_atoms: int) -> None:
        d = (predicted - reference) / n_atoms
        self.e_abs += abs(d)
        self.e_sq += d * d
        self.e_n += 1
        if self.keep:
            self.energies.append((reference / n_atoms, predicted / n_atoms))

    def add_forces(
        self, reference: npt.NDArray[np.float64], predicted: npt.NDArray[np.float64]
    ) -> None:
        d = predicted - reference
        self.f_abs += float(np.abs(d).sum())
        self.f_sq += float((d * d).sum())
        self.f_n += d.size
        if self.keep:
            self.forces.append((reference, predicted))

    def add_stress(
        self, reference: npt.NDArray[np.float64], predicted: npt.NDArray[np.float64]
    ) -> None:
        d = predicted - reference
        self.s_sq += float((d * d).sum())
        self.s_n += d.size

    def add_loss(self, loss: float, weight: int = 1) -> None:
        self.loss_sum += loss * weight
        self.loss_n += weight

    def summary(self) -> dict[str, float]:
        """Errors in meV/atom, meV/Å and meV/Å^3 (NaN where nothing was labelled)."""

        def ratio(a: float, n: int) -> float:
            return a / n if n else math.nan

        return {
            "loss": ratio(self.loss_sum, self.loss_n),
            "energy_mae": 1e3 * ratio(self.e_abs, self.e_n),
            "energy_rmse": 1e3 * math.sqrt(ratio(self.e_sq, self.e_n)) if self.e_n else math.nan,
            "forces_mae": 1e3 * ratio(self.f_abs, self.f_n),
            "forces_rmse": 1e3 * math.sqrt(ratio(self.f_sq, self.f_n)) if self.f_n else math.nan,
            "stress_rmse": 1e3 * math.sqrt(ratio(self.s_sq, self.s_n)) if self.s_n else math.nan,
        }


COLUMNS = [
    ("energy_mae", "E MAE"),
    ("energy_rmse", "E RMSE"),
    ("forces_mae", "F MAE"),
    ("forces_rmse", "F RMSE"),
    ("stress_rmse", "S RMSE"),
]


def _pair(a: float, b: float) -> str:
    def fmt(x: float) -> str:
        return "-" if math.isnan(x) else f"{x:.1f}" if x < 1000 else f"{x:.0f}"

    return f"{fmt(a)}/{fmt(b)}"


def table_header() -> str:
    cells = [f"{'epoch':>5}", f"{'lr':>8}", f"{'loss':>19}"]
    cells += [f"{title:>13}" for _, title in COLUMNS]
    cells.append(f"{'time':>6}")
    return " ".join(cells)


def table_row(
    epoch: int,
    lr: float,
    train: dict[str, float],
    valid: dict[str, float],
    seconds: float,
    best: bool,
) -> str:
    cells = [f"{epoch:>5}", f"{lr:>8.1e}", f"{train['loss']:>9.3g}/{valid['loss']:<9.3g}"]
    cells += [f"{_pair(train[key], valid[key]):>13}" for key, _ in COLUMNS]
    cells.append(f"{seconds:>5.1f}s")
    return " ".join(cells) + (" *" if best else "")


def error_table(rows: dict[str, dict[str, float]]) -> str:
    """A small table of errors for named data sets (``cace-server evaluate``)."""
    lines = [f"{'data':<12}" + "".join(f"{title:>10}" for _, title in COLUMNS)]
    for name, summary in rows.items():
        values = "".join(
            f"{'-' if math.isnan(summary[k]) else format(summary[k], '.2f'):>10}"
            for k, _ in COLUMNS
        )
        lines.append(f"{name:<12}" + values)
    lines.append("E: meV/atom, F: meV/Å, S: meV/Å^3")
    return "\n".join(lines)
