"""Errors of a model on labelled data, and the energy/force parity plot."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from cace_server.model.committee import Committee
from cace_server.model.potential import CACEPotential
from cace_server.train.data import LabelledStructure, check_elements
from cace_server.train.metrics import ErrorAccumulator


def dataset_errors(
    model: CACEPotential | Committee, data: Sequence[LabelledStructure], *, batch_size: int = 16
) -> ErrorAccumulator:
    """Energy, force and stress errors of ``model`` on ``data`` (kept for plotting)."""
    check_elements(data, model.elements, "the model's")
    errors = ErrorAccumulator(keep=True)
    for k in range(0, len(data), batch_size):
        chunk = data[k : k + batch_size]
        want_stress = any(d.stress is not None for d in chunk)
        predictions = model.predict(
            [d.structure for d in chunk],
            ["energy", "forces", "stress"] if want_stress else ["energy", "forces"],
        )
        for d, p in zip(chunk, predictions, strict=True):
            errors.add_energy(d.energy, p.energy, d.n_atoms)
            assert p.forces is not None
            errors.add_forces(d.forces, p.forces)
            if d.stress is not None and p.stress is not None:
                errors.add_stress(d.stress, p.stress)
    return errors


def parity_plot(errors: ErrorAccumulator, path: str | Path, title: str = "") -> Path:
    """Energies per atom and force components, reference against model (PNG)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise RuntimeError(
            "the parity plot needs matplotlib: pip install 'cace-server[train]'"
        ) from exc
    summary = errors.summary()
    energies = np.array(errors.energies)
    ref_f = np.concatenate([r.reshape(-1) for r, _ in errors.forces])
    pred_f = np.concatenate([p.reshape(-1) for _, p in errors.forces])

    fig, axes = plt.subplots(1, 2, figsize=(10, 4.6))
    panels = [
        (axes[0], energies[:, 0], energies[:, 1], "energy (eV/atom)",
         f"RMSE {summary['energy_rmse']:.2f} meV/atom"),
        (axes[1], ref_f, pred_f, "force component (eV/Å)",
         f"RMSE {summary['forces_rmse']:.1f} meV/Å"),
    ]  # fmt: skip
    for ax, ref, pred, label, note in panels:
        lo, hi = float(min(ref.min(), pred.min())), float(max(ref.max(), pred.max()))
        pad = 0.02 * (hi - lo or 1.0)
        ax.plot([lo - pad, hi + pad], [lo - pad, hi + pad], color="0.6", lw=1)
        ax.scatter(ref, pred, s=4, alpha=0.5, lw=0)
        ax.set_xlabel(f"reference {label}")
        ax.set_ylabel(f"model {label}")
        ax.set_title(note)
        ax.set_aspect("equal")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
