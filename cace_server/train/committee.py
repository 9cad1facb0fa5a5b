"""Training a committee: M members on bootstrap resamples, then calibrating alpha.

Member i trains with seed ``seed + i`` on a bootstrap resample of the training set
(n draws with replacement). Its early stopping watches its out-of-bag structures
(those its resample missed), or the common held-out set when there are none. The
common held-out set (``--valid`` files, or the split of the training files) is seen
by no member's optimiser or early stopping: alpha is fitted on it alone.

Files: ``OUTPUT_member{i}.safetensors`` and the committee file ``OUTPUT.toml`` next
to them (OUTPUT is ``--output`` without its suffix).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cace_server.model.potential import CACEPotential
from cace_server.train.config import TrainConfig
from cace_server.train.data import LabelledStructure


@dataclass(frozen=True)
class CommitteeResult:
    path: Path  # the committee file
    members: tuple[Path, ...]
    alpha: float
    table: str  # the calibration table (empty when alpha could not be fitted)


def committee_paths(output: str | Path, members: int) -> tuple[Path, list[Path]]:
    """The committee file and the member files for ``--output``."""
    stem = Path(output).with_suffix("")
    return stem.with_suffix(".toml"), [
        stem.with_name(f"{stem.name}_member{i}.safetensors") for i in range(members)
    ]


def bootstrap(
    data: Sequence[LabelledStructure], seed: int
) -> tuple[list[LabelledStructure], list[LabelledStructure]]:
    """A resample of ``data`` (same size, with replacement) and what it left out."""
    picks = np.random.default_rng(seed).integers(0, len(data), len(data))
    left_out = sorted(set(range(len(data))) - {int(i) for i in picks})
    return [data[int(i)] for i in picks], [data[i] for i in left_out]


def held_out_name(config: TrainConfig) -> str:
    if config.valid_files:
        return ", ".join(Path(f).name for f in config.valid_files)
    names = ", ".join(Path(f).name for f in config.train_files)
    return f"{config.valid_fraction:g} of {names} (seed {config.seed}), held out"


def train_committee(
    config: TrainConfig,
    train: Sequence[LabelledStructure],
    valid: Sequence[LabelledStructure],
    *,
    initial: Sequence[CACEPotential | None] | None = None,
    resume: bool = False,
    data_digest: str = "",
    log: Callable[[str], None] = print,
    progress: bool = False,
) -> CommitteeResult:
    """Train ``config.committee`` members one after the other; write and calibrate."""
    from cace_server.model.committee import CommitteeSpec, load_committee, write_committee_file
    from cace_server.train.calibrate import (
        CalibrationError,
        calibration_table,
        committee_samples,
        fit_alpha,
    )
    from cace_server.train.trainer import Trainer

    size = config.committee
    if size < 2:
        raise ValueError(f"a committee needs at least two members, got {size}")
    starts: list[CACEPotential | None] = list(initial) if initial else [None] * size
    if len(starts) != size:
        raise ValueError(f"{len(starts)} starting models for {size} members")
    target, member_files = committee_paths(config.output, size)
    checkpoint = Path(config.checkpoint) if config.checkpoint else None
    for i, (member_file, start) in enumerate(zip(member_files, starts, strict=True)):
        resample, out_of_bag = bootstrap(train, config.seed + i)
        watched = out_of_bag or list(valid)
        member_config = dataclasses.replace(
            config,
            output=str(member_file),
            checkpoint=(
                str(checkpoint.with_name(f"{checkpoint.stem}_member{i}{checkpoint.suffix}"))
                if checkpoint is not None
                else ""
            ),
            seed=config.seed + i,
        )
        log(
            f"member {i + 1}/{size}: {len(set(map(id, resample)))} distinct structures "
            f"resampled, early stopping on {len(watched)} "
            f"{'out-of-bag' if out_of_bag else 'held-out'}"
        )
        trainer = Trainer(
            member_config,
            resample,
            watched,
            data_digest=data_digest,
            log=log,
            progress=progress,
            initial=start,
        )
        if resume and member_config.checkpoint_path.is_file():
            trainer.resume()
        trainer.run()

    spec = CommitteeSpec(tuple(member_files), alpha=1.0)
    committee = load_committee(spec, device=config.device)
    table = ""
    calibration: dict[str, Any]
    try:
        samples = committee_samples(committee, list(valid), "energy")
        alpha = fit_alpha(samples)
        table = calibration_table(samples, alpha)
        calibration = {
            "data": held_out_name(config),
            "structures": samples.structures,
            "quantity": "energy",
            "alpha": alpha,
            "observed_rmse": float(np.sqrt(np.mean(samples.errors**2))),
            "unit": "eV/atom",
        }
        log(f"alpha = {alpha:.6g}, fitted on the energies of {len(valid)} held-out structures")
        log(table)
    except CalibrationError as exc:
        alpha = 1.0
        calibration = {"data": "none", "note": f"not calibrated: {exc}"}
        log(f"warning: alpha not calibrated ({exc}); alpha = 1")
    write_committee_file(target, dataclasses.replace(spec, alpha=alpha, calibration=calibration))
    log(f"wrote committee {target} ({size} members)")
    return CommitteeResult(target, tuple(member_files), alpha, table)
