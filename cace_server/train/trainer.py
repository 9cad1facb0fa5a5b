"""Fitting a CACE model to energies, forces and stresses.

The model is the same :class:`CACEPotential` that serves: batches of structures
go through ``compute(..., create_graph=True)`` so the force and stress errors can
be differentiated with respect to the weights.  Validation uses an exponential
moving average (EMA) of the weights, which is also what gets written out.

Checkpoints are plain dictionaries of tensors and numbers, loaded back with
``torch.load(weights_only=True)``: resuming never unpickles code either.
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cace_server.host_memory import tune_host_allocator
from cace_server.model.build import build_model
from cace_server.model.config import ModelConfig, ReadoutConfig
from cace_server.model.io import save_model
from cace_server.model.neighbors import PreparedStructure, collate, prepare_structure
from cace_server.model.potential import CACEPotential
from cace_server.train.config import TrainConfig
from cace_server.train.data import LabelledStructure, check_elements, fit_reference_energies
from cace_server.train.finetune import prepare_initial
from cace_server.train.metrics import ErrorAccumulator, table_header, table_row

CHECKPOINT_FORMAT = "cace-server-training"
CHECKPOINT_VERSION = 1


@dataclass
class Example:
    """A labelled structure with its neighbour list, built once for all epochs."""

    prepared: PreparedStructure
    label: LabelledStructure


def model_config_for(config: TrainConfig, data: Sequence[LabelledStructure]) -> ModelConfig:
    """The architecture from the settings; elements, neighbour count and references from data."""
    elements = sorted({int(z) for d in data for z in d.structure.numbers})
    if config.atomic_energies:
        references = {int(k): float(v) for k, v in config.atomic_energies.items()}
        missing = [z for z in elements if z not in references]
        if missing:
            raise ValueError(f"atomic_energies lacks elements {missing}")
    else:
        references = fit_reference_energies(data, elements)
    sample = list(data)[:: max(1, len(data) // 50)]
    pairs = sum(prepare_structure(d.structure, elements, config.cutoff).n_pairs for d in sample)
    atoms = sum(d.n_atoms for d in sample)
    return ModelConfig(
        elements=elements,
        cutoff=config.cutoff,
        n_atom_basis=config.n_atom_basis,
        n_rbf=config.n_rbf,
        n_radial=config.n_radial,
        max_l=config.max_l,
        max_nu=config.max_nu,
        num_message_passing=config.num_message_passing,
        avg_num_neighbors=max(1.0, pairs / max(atoms, 1)),
        readouts=[ReadoutConfig(name="energy", hidden=list(config.hidden))],
        atomic_energies=references,
        dtype=config.dtype,
        source="cace-server train",
    )


class ExponentialMovingAverage:
    """EMA of the weights, with the usual warm-up so early epochs are not dominated by noise."""

    def __init__(self, model: CACEPotential, decay: float) -> None:
        self.decay = decay
        self.model = copy.deepcopy(model)
        self.updates = 0

    @torch.no_grad()
    def update(self, model: CACEPotential) -> None:
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for mine, theirs in zip(self.model.parameters(), model.parameters(), strict=True):
            mine.mul_(decay).add_(theirs.detach(), alpha=1.0 - decay)


class Trainer:
    def __init__(
        self,
        config: TrainConfig,
        train: Sequence[LabelledStructure],
        valid: Sequence[LabelledStructure],
        *,
        data_digest: str = "",
        log: Callable[[str], None] = print,
        progress: bool = False,
        initial: CACEPotential | None = None,
    ) -> None:
        """``initial``: start from this model's weights and architecture (a fine-tune;
        see :mod:`cace_server.train.finetune`); None: a new model from ``config``."""
        if not train or not valid:
            raise ValueError("training needs at least one training and one validation structure")
        tune_host_allocator()
        self.config = config
        self.log = log
        self.progress = progress
        self.data_digest = data_digest
        if config.threads > 0:
            torch.set_num_threads(config.threads)
        self.device = torch.device(config.device)
        self.dtype = torch.float32 if config.dtype == "float32" else torch.float64

        torch.manual_seed(config.seed)
        if initial is None:
            model = build_model(model_config_for(config, train), seed=config.seed)
        else:
            model = prepare_initial(initial, config, train, log)
        model = model.to(self.dtype).to(self.device)
        model.train()
        self.model = model
        self.ema = ExponentialMovingAverage(model, config.ema_decay) if config.ema_decay else None
        self.train_set = self._examples(train)
        self.valid_set = self._examples(valid)
        self.optimizer = torch.optim.AdamW(
            model.parameters(), lr=config.lr, weight_decay=config.weight_decay
        )
        self.scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
            self.optimizer,
            factor=config.lr_factor,
            patience=config.lr_patience,
            min_lr=config.min_lr,
        )
        self.shuffle = torch.Generator().manual_seed(config.seed)
        self.epoch = 0
        self.best_loss = math.inf
        self.best_epoch = 0
        self.history: list[dict[str, Any]] = []
        self.fine_tune = initial is not None
        # The starting model's validation errors (fine-tunes), before the first step.
        self.initial_errors: dict[str, float] | None = None

    # -- data ---------------------------------------------------------------------------------
    def _examples(self, data: Sequence[LabelledStructure]) -> list[Example]:
        check_elements(data, self.model.elements, "the model's")
        return [Example(self.model.prepare(d.structure), d) for d in data]

    def _batches(self, examples: list[Example], shuffle: bool) -> list[list[Example]]:
        order = (
            torch.randperm(len(examples), generator=self.shuffle).tolist()
            if shuffle
            else list(range(len(examples)))
        )
        size = self.config.batch_size
        return [[examples[i] for i in order[k : k + size]] for k in range(0, len(order), size)]

    # -- one batch ----------------------------------------------------------------------------
    def _loss(
        self, model: CACEPotential, batch: list[Example], errors: ErrorAccumulator, train: bool
    ) -> torch.Tensor:
        cfg = self.config
        graph = collate([e.prepared for e in batch], self.device, model.input_widths, model.dtype)
        want_stress = cfg.stress_weight > 0 and any(e.label.stress is not None for e in batch)
        out = model.compute(graph, forces=True, virial=want_stress, create_graph=train)
        assert out.forces is not None
        dtype = out.energy.dtype
        n_atoms = torch.tensor(graph.n_atoms, dtype=dtype, device=self.device)
        ref_energy = torch.tensor([e.label.energy for e in batch], dtype=dtype, device=self.device)
        ref_forces = torch.as_tensor(
            np.concatenate([e.label.forces for e in batch]), dtype=dtype, device=self.device
        )
        energy_term = (((out.energy - ref_energy) / n_atoms) ** 2).mean()
        forces_term = ((out.forces.to(dtype) - ref_forces) ** 2).mean()
        loss = cfg.energy_weight * energy_term + cfg.forces_weight * forces_term

        stress_pred: torch.Tensor | None = None
        if want_stress and out.virial is not None:
            rows = [i for i, e in enumerate(batch) if e.label.stress is not None]
            volumes = torch.tensor(
                [batch[i].label.structure.volume for i in rows],
                dtype=torch.float64,
                device=self.device,
            )
            # ASE sign: stress = -virial / volume.
            stress_pred = -out.virial[rows] / volumes[:, None, None]
            ref_stress = torch.as_tensor(
                np.stack([s for i in rows if (s := batch[i].label.stress) is not None]),
                device=self.device,
            )
            stress_term = ((stress_pred - ref_stress) ** 2).mean()
            loss = loss + cfg.stress_weight * stress_term.to(dtype)

        # Statistics, in float64 numpy.
        energies = out.energy.detach().double().cpu().numpy()
        forces = out.forces.detach().double().cpu().numpy()
        start = 0
        for i, e in enumerate(batch):
            n = e.label.n_atoms
            errors.add_energy(e.label.energy, float(energies[i]), n)
            errors.add_forces(e.label.forces, forces[start : start + n])
            start += n
        if stress_pred is not None:
            s = stress_pred.detach().cpu().numpy()
            for k, i in enumerate(i for i, e in enumerate(batch) if e.label.stress is not None):
                label = batch[i].label.stress
                assert label is not None
                errors.add_stress(label, s[k])
        errors.add_loss(float(loss.detach()), len(batch))
        return loss

    # -- epochs -------------------------------------------------------------------------------
    def train_epoch(self) -> dict[str, float]:
        self.model.train()
        errors = ErrorAccumulator()
        batches = self._batches(self.train_set, shuffle=True)
        with _progress(self.progress, len(batches), f"epoch {self.epoch + 1}") as advance:
            for batch in batches:
                self.optimizer.zero_grad(set_to_none=True)
                loss = self._loss(self.model, batch, errors, train=True)
                if not torch.isfinite(loss):
                    raise FloatingPointError(
                        f"loss became {float(loss)} in epoch {self.epoch + 1}; "
                        "lower the learning rate or check the data"
                    )
                loss.backward()
                if self.config.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
                self.optimizer.step()
                if self.ema is not None:
                    self.ema.update(self.model)
                advance()
        return errors.summary()

    @property
    def evaluation_model(self) -> CACEPotential:
        return self.ema.model if self.ema is not None else self.model

    def validate(self) -> dict[str, float]:
        model = self.evaluation_model
        model.eval()
        errors = ErrorAccumulator()
        for batch in self._batches(self.valid_set, shuffle=False):
            self._loss(model, batch, errors, train=False)
        return errors.summary()

    def run(self) -> dict[str, Any]:
        """Train until the epoch budget or early stopping; returns the best epoch's record."""
        cfg = self.config
        self.log(f"{len(self.train_set)} training and {len(self.valid_set)} validation structures")
        self.log(
            f"model: {self.model.n_parameters} parameters, elements {list(self.model.elements)}, "
            f"cutoff {self.model.cutoff} Å, {cfg.dtype} on {self.device}"
        )
        self.log(table_header())
        if self.fine_tune and self.epoch == 0:
            self.initial_errors = self.validate()
            not_run = {key: math.nan for key in self.initial_errors}
            self.log(table_row(0, 0.0, not_run, self.initial_errors, 0.0, False))
        while self.epoch < cfg.epochs:
            start = time.perf_counter()
            train = self.train_epoch()
            valid = self.validate()
            self.epoch += 1
            lr = self.optimizer.param_groups[0]["lr"]
            self.scheduler.step(valid["loss"])
            improved = valid["loss"] < self.best_loss
            if improved:
                self.best_loss = valid["loss"]
                self.best_epoch = self.epoch
            seconds = time.perf_counter() - start
            record = {
                "epoch": self.epoch,
                "lr": lr,
                "seconds": seconds,
                "train": train,
                "valid": valid,
            }
            self.history.append(record)
            self.log(table_row(self.epoch, lr, train, valid, seconds, improved))
            if improved:
                self.save_best(record)
            self.save_checkpoint()
            if cfg.early_stopping and self.epoch - self.best_epoch >= cfg.early_stopping:
                self.log(f"early stop: no improvement for {cfg.early_stopping} epochs")
                break
        best = self.history[self.best_epoch - 1] if self.best_epoch else {}
        self.log(f"best epoch {self.best_epoch}; model written to {cfg.output}")
        return best

    # -- files --------------------------------------------------------------------------------
    def save_best(self, record: dict[str, Any]) -> None:
        from cace_server import __version__

        metadata = {
            "training": {
                "data_sha256": self.data_digest,
                "train_files": self.config.train_files,
                "valid_files": self.config.valid_files,
                "n_train": len(self.train_set),
                "n_valid": len(self.valid_set),
                "epoch": record["epoch"],
                **(
                    {"init_from": self.config.init_from, "initial_errors": self.initial_errors}
                    if self.fine_tune
                    else {}
                ),
                "errors": {"train": record["train"], "valid": record["valid"]},
                "error_units": "meV/atom, meV/Å, meV/Å^3",
                "settings": self.config.to_dict(),
                "cace_server_version": __version__,
            }
        }
        _atomic_write(
            Path(self.config.output),
            lambda tmp: save_model(self.evaluation_model, tmp, extra_metadata=metadata),
        )

    def save_checkpoint(self) -> None:
        state = {
            "format": CHECKPOINT_FORMAT,
            "version": CHECKPOINT_VERSION,
            "epoch": self.epoch,
            "model": self.model.state_dict(),
            "ema": self.ema.model.state_dict() if self.ema is not None else {},
            "ema_updates": self.ema.updates if self.ema is not None else 0,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "shuffle": self.shuffle.get_state(),
            "best_loss": self.best_loss,
            "best_epoch": self.best_epoch,
            "history": json.dumps(self.history),
            "initial_errors": json.dumps(self.initial_errors),
            "model_config": json.dumps(self.model.config.to_dict(), sort_keys=True),
        }
        _atomic_write(self.config.checkpoint_path, lambda tmp: torch.save(state, tmp))

    def resume(self, path: str | Path | None = None) -> None:
        """Continue from a checkpoint written by :meth:`save_checkpoint`."""
        path = Path(path) if path else self.config.checkpoint_path
        if not path.is_file():
            raise FileNotFoundError(f"no checkpoint at {path}")
        state = torch.load(path, map_location=self.device, weights_only=True)
        if state.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"{path} is not a cace-server training checkpoint")
        saved = json.loads(state["model_config"])
        current = json.loads(json.dumps(self.model.config.to_dict(), sort_keys=True))
        if saved != current:
            changed = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
            raise ValueError(
                f"{path}: the checkpoint's model differs from these settings in {changed}"
            )
        self.model.load_state_dict(state["model"])
        if self.ema is not None and state["ema"]:
            self.ema.model.load_state_dict(state["ema"])
            self.ema.updates = int(state["ema_updates"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.shuffle.set_state(state["shuffle"])
        self.epoch = int(state["epoch"])
        self.best_loss = float(state["best_loss"])
        self.best_epoch = int(state["best_epoch"])
        self.history = json.loads(state["history"])
        self.initial_errors = json.loads(state.get("initial_errors", "null"))
        self.log(f"resumed from {path} after epoch {self.epoch}")


def _atomic_write(path: Path, write: Callable[[Path], Any]) -> None:
    """Write through a temporary file so an interrupted run never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{path.suffix}")
    write(tmp)
    os.replace(tmp, path)


class _progress:
    """A transient progress bar on a terminal; nothing in logs and tests."""

    def __init__(self, enabled: bool, total: int, title: str) -> None:
        self.enabled = enabled
        self.total = total
        self.title = title

    def __enter__(self) -> Callable[[], None]:
        if not self.enabled:
            return lambda: None
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

        self._bar = Progress(
            f"[bold]{self.title}",
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            transient=True,
        )
        self._bar.start()
        task = self._bar.add_task(self.title, total=self.total)
        return lambda: self._bar.advance(task)

    def __exit__(self, *exc: object) -> None:
        if self.enabled:
            self._bar.stop()
