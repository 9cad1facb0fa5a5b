"""Fine-tuning: training that starts from an existing model's weights.

The starting model is a native model file, an original CACE checkpoint (converted
as ``cace-server convert`` does), or a committee (member i starts member i). Its
architecture is kept: architecture settings the user gave must agree with it.
Unless given, the learning rate is :data:`FINE_TUNE_LR` (no warm-up; the same
plateau schedule and early stopping as training from scratch) and the dtype is the
starting model's.

Reference energies. A model's energy is its network's plus one offset per element.
Data labelled by another code or functional (or another pseudopotential set)
differs from the model's by roughly such offsets. With ``reference_energies =
"shift"`` (the default) the offsets are refitted before the first step: least
squares of the starting model's energy residuals on the training set over the
element counts, added to the model's offsets; the network's weights are untouched,
so data on the model's own reference shifts by about its mean error only. With
``"keep"`` they stay as they are; explicit ``atomic_energies`` replace them.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cace_server.model.potential import CACEPotential
from cace_server.train.config import TrainConfig
from cace_server.train.data import LabelledStructure, check_elements

#: fine-tuning's default initial learning rate (from scratch: 5e-3). Adam's first
#: steps move every weight by about the rate: on the bundled water model 5e-4 raised
#: the first epoch's energy error from 0.5 to 5 meV/atom, 1e-4 kept it at 1.
FINE_TUNE_LR = 1e-4

#: training settings that define the architecture -> how to read them off a model config
ARCHITECTURE: dict[str, Callable[[Any], Any]] = {
    "cutoff": lambda c: c.cutoff,
    "n_atom_basis": lambda c: c.n_atom_basis,
    "n_rbf": lambda c: c.n_rbf,
    "n_radial": lambda c: c.n_radial,
    "max_l": lambda c: c.max_l,
    "max_nu": lambda c: c.max_nu,
    "num_message_passing": lambda c: c.num_message_passing,
    "hidden": lambda c: [list(r.hidden) for r in c.readouts if r.kind == "energy"],
}


def initial_sources(init_from: str, members: int | None) -> list[Path]:
    """The starting file of each member: one file for all, or a committee's members
    (``members`` None: one file, or as many as the committee has)."""
    from cace_server.model.committee import committee_spec
    from cace_server.model.io import ModelFileError

    try:
        spec = committee_spec(init_from)
    except ModelFileError as exc:
        raise ValueError(f"--init-from: {exc}") from exc
    if spec is None:
        return [Path(init_from)] * (members or 1)
    if members is not None and members != len(spec.members):
        raise ValueError(
            f"--init-from {init_from} is a committee of {len(spec.members)} members: "
            f"train a committee of as many (--committee {len(spec.members)}), not {members}"
        )
    return list(spec.members)


def load_initial(source: str | Path) -> CACEPotential:
    """A native model file, or an original CACE checkpoint converted on the fly."""
    from cace_server.model import convert_original, load_model
    from cace_server.model.checkpoint import UnsafeCheckpointError, UnsupportedCheckpointError
    from cace_server.model.io import ModelFileError

    path = Path(source)
    if not path.is_file():
        raise ValueError(f"--init-from: model file {path} does not exist")
    with open(path, "rb") as f:
        head = f.read(16)
    try:
        # A safetensors file starts with its header's length and then "{".
        if len(head) > 8 and head[8:9] == b"{":
            return load_model(path)
        return convert_original(path)
    except (ModelFileError, UnsafeCheckpointError, UnsupportedCheckpointError) as exc:
        raise ValueError(f"--init-from {path}: {exc}") from exc


def fine_tune_settings(
    config: TrainConfig, initial: CACEPotential, given: set[str] | dict[str, Any]
) -> TrainConfig:
    """``config`` for fine-tuning ``initial``: architecture checked, lr and dtype defaulted."""
    model_config = initial.config
    clashes = []
    for name, read in ARCHITECTURE.items():
        if name not in given:
            continue
        asked, has = getattr(config, name), read(model_config)
        if name == "hidden":
            same = all(list(asked) == h for h in has)
        elif name == "cutoff":
            same = math.isclose(float(asked), float(has), rel_tol=1e-9)
        else:
            same = asked == has
        if not same:
            shown = has[0] if name == "hidden" and len(has) == 1 else has
            clashes.append(f"{name} {asked} was given, the model has {shown}")
    if clashes:
        raise ValueError(
            f"--init-from {config.init_from}: a fine-tune keeps the model's architecture, "
            f"but {'; '.join(clashes)}: drop these settings or start from scratch"
        )
    changes: dict[str, Any] = {}
    if "lr" not in given:
        changes["lr"] = FINE_TUNE_LR
    if "dtype" not in given:
        changes["dtype"] = "float64" if initial.dtype == torch.float64 else "float32"
    return replace(config, **changes)


def residual_offsets(
    model: CACEPotential, data: Sequence[LabelledStructure], batch_size: int = 16
) -> dict[int, float]:
    """Per-element offsets that best explain (reference - model) energies (least squares).

    Pure water fixes only the offset of one H2O unit; ``lstsq`` then returns the
    minimum-norm split, which changes no energy of any water structure.
    """
    elements = list(model.elements)
    index = {z: i for i, z in enumerate(elements)}
    counts = np.zeros((len(data), len(elements)))
    residuals = np.zeros(len(data))
    for start in range(0, len(data), batch_size):
        chunk = data[start : start + batch_size]
        predictions = model.predict([d.structure for d in chunk], ["energy"])
        for row, (d, p) in enumerate(zip(chunk, predictions, strict=True), start):
            residuals[row] = d.energy - float(p.energy)
            for z in d.structure.numbers:
                counts[row, index[int(z)]] += 1
    solution, *_ = np.linalg.lstsq(counts, residuals, rcond=None)
    return {z: float(solution[i]) for z, i in index.items()}


def prepare_initial(
    initial: CACEPotential,
    config: TrainConfig,
    train: Sequence[LabelledStructure],
    log: Callable[[str], None],
) -> CACEPotential:
    """A trainable copy of ``initial`` with its reference energies set as configured."""
    check_elements(train, initial.elements, "the starting model's")
    model = copy.deepcopy(initial)
    model.config = copy.deepcopy(initial.config)
    references = dict(model.config.atomic_energies)
    if config.atomic_energies:
        given = {int(k): float(v) for k, v in config.atomic_energies.items()}
        missing = [z for z in model.elements if z not in given]
        if missing:
            raise ValueError(f"atomic_energies lacks elements {missing}")
        references = given
        log(f"reference energies set to {references}")
    elif config.reference_energies == "shift":
        with torch.no_grad():
            offsets = residual_offsets(model, train)
        references = {z: references.get(z, 0.0) + offsets[z] for z in model.elements}
        shown = ", ".join(f"Z={z}: {offsets[z]:+.4g} eV" for z in model.elements)
        log(f"reference energies shifted to the training data ({shown})")
    model.config.atomic_energies = references
    with torch.no_grad():
        model.atomic_energies.copy_(
            torch.tensor([references.get(z, 0.0) for z in model.elements], dtype=torch.float64)
        )
    model.config.source = f"{initial.config.source or 'a model'}, fine-tuned by cace-server train"
    for p in model.parameters():
        p.requires_grad_(True)
    model.train()
    return model
