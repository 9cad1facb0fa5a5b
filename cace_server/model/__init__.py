"""The CACE potential in PyTorch: model maths, model files, and the importer."""

from cace_server.model.build import build_model, random_model
from cace_server.model.committee import Committee, CommitteeError, load_served
from cace_server.model.config import EwaldConfig, MessagePassingConfig, ModelConfig, ReadoutConfig
from cace_server.model.convert import convert_original
from cace_server.model.io import ModelFileError, load_model, read_metadata, save_model
from cace_server.model.neighbors import PreparedStructure
from cace_server.model.potential import CACEPotential

__all__ = [
    "CACEPotential",
    "Committee",
    "CommitteeError",
    "EwaldConfig",
    "MessagePassingConfig",
    "ModelConfig",
    "ModelFileError",
    "PreparedStructure",
    "ReadoutConfig",
    "build_model",
    "convert_original",
    "load_model",
    "load_served",
    "random_model",
    "read_metadata",
    "save_model",
]
