"""Training CACE models on energies, forces and stresses (``cace-server train``)."""

from cace_server.train.config import TrainConfig
from cace_server.train.data import (
    DataError,
    DataKeys,
    LabelledStructure,
    files_digest,
    fit_reference_energies,
    read_labelled,
    split,
)
from cace_server.train.trainer import Trainer

__all__ = [
    "DataError",
    "DataKeys",
    "LabelledStructure",
    "TrainConfig",
    "Trainer",
    "files_digest",
    "fit_reference_energies",
    "read_labelled",
    "split",
]
