"""The CACE potential in PyTorch: model maths, model files, and the importer."""

from cace_server.model.config import EwaldConfig, MessagePassingConfig, ModelConfig, ReadoutConfig
from cace_server.model.convert import convert_original
from cace_server.model.neighbors import PreparedStructure
from cace_server.model.potential import CACEPotential

__all__ = [
    "CACEPotential",
    "EwaldConfig",
    "MessagePassingConfig",
    "ModelConfig",
    "PreparedStructure",
    "ReadoutConfig",
    "convert_original",
]
