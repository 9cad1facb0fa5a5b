"""Training settings: defaults that fit a first model, then a TOML file, then flags.

The TOML file is flat, with the same names as the fields below (and as the
``cace-server train`` flags, dashes for underscores), e.g.::

    train_files = ["data/water_gfn2_train.extxyz.gz"]
    cutoff = 5.0
    epochs = 300
"""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


@dataclass
class TrainConfig:
    # data
    train_files: list[str] = field(default_factory=list)
    valid_files: list[str] = field(default_factory=list)
    valid_fraction: float = 0.1  # used when no valid_files are given
    energy_key: str = "energy"
    forces_key: str = "forces"
    stress_key: str = "stress"
    # output
    output: str = "model.safetensors"
    checkpoint: str = ""  # default: <output>.checkpoint.pt
    # model
    cutoff: float = 5.0
    n_atom_basis: int = 3
    n_rbf: int = 6
    n_radial: int = 12
    max_l: int = 3
    max_nu: int = 3
    num_message_passing: int = 0
    hidden: list[int] = field(default_factory=lambda: [32, 16])
    atomic_energies: dict[str, float] = field(default_factory=dict)  # empty: least squares
    # fine-tuning and committees
    init_from: str = ""  # a native model, an original CACE checkpoint, or a committee
    reference_energies: str = "shift"  # with init_from: "shift" (refit offsets) or "keep"
    committee: int = 1  # members to train (bootstrap resamples, seeds seed..seed+M-1)
    # optimisation
    epochs: int = 200
    batch_size: int = 4
    lr: float = 5e-3
    min_lr: float = 1e-5
    lr_factor: float = 0.5  # ReduceLROnPlateau factor on the validation loss
    lr_patience: int = 8  # epochs without improvement before the rate drops
    weight_decay: float = 0.0
    ema_decay: float = 0.99  # 0 disables the moving average
    grad_clip: float = 10.0
    early_stopping: int = 30  # epochs without improvement before stopping (0: never)
    energy_weight: float = 100.0  # on (eV/atom)^2
    forces_weight: float = 1.0  # on (eV/Å)^2
    stress_weight: float = 1000.0  # on (eV/Å^3)^2
    # run
    seed: int = 0
    device: str = "cpu"
    dtype: str = "float32"
    threads: int = 0  # 0: torch's default

    def __post_init__(self) -> None:
        if self.dtype not in ("float32", "float64"):
            raise ValueError(f"dtype must be float32 or float64, got {self.dtype!r}")
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError("ema_decay must be in [0, 1)")
        if self.cutoff <= 0:
            raise ValueError("cutoff must be positive")
        if self.reference_energies not in ("shift", "keep"):
            raise ValueError(
                f"reference_energies must be shift or keep, got {self.reference_energies!r}"
            )
        if self.committee < 1:
            raise ValueError(f"committee must be at least 1, got {self.committee}")

    @property
    def checkpoint_path(self) -> Path:
        if self.checkpoint:
            return Path(self.checkpoint)
        out = Path(self.output)
        return out.with_name(out.stem + ".checkpoint.pt")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def load(cls, toml_path: str | Path | None = None, **overrides: Any) -> TrainConfig:
        """Defaults, updated by the TOML file, updated by the non-None ``overrides``."""
        values = cls.given(toml_path, **overrides)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown training settings: {', '.join(unknown)}")
        return cls(**values)

    @staticmethod
    def given(toml_path: str | Path | None = None, **overrides: Any) -> dict[str, Any]:
        """The settings the user gave (TOML file, then non-None ``overrides``), no defaults."""
        values: dict[str, Any] = {}
        if toml_path is not None:
            with open(toml_path, "rb") as f:
                values.update(tomllib.load(f))
        values.update({k: v for k, v in overrides.items() if v is not None})
        return values
