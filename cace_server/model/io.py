"""Native model files: safetensors weights with the JSON config in the metadata.

Loading runs no pickle: safetensors holds only raw tensors and a string table. The
metadata carries the format name and version, the model config, and a SHA-256 of
the weights so a damaged or edited file is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from cace_server.model.config import FORMAT_NAME, FORMAT_VERSION, ModelConfig
from cace_server.model.convert import finalize
from cace_server.model.potential import CACEPotential


class ModelFileError(ValueError):
    """A model file that cannot be loaded; the message says why."""


def weights_digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def file_digest(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def save_model(
    model: CACEPotential, path: str | Path, extra_metadata: dict[str, Any] | None = None
) -> Path:
    """Write ``model`` as a native model file; returns the path."""
    path = Path(path)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    config = model.config.to_dict()
    config["dtype"] = "float64" if model.dtype == torch.float64 else "float32"
    metadata = {
        "format": FORMAT_NAME,
        "format_version": str(FORMAT_VERSION),
        "config": json.dumps(config, sort_keys=True),
        "weights_sha256": weights_digest(tensors),
        "extra": json.dumps(extra_metadata or {}, sort_keys=True),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=metadata)
    # safetensors creates the file owner-only (0600); a model file is meant to be
    # shared (a container's non-root user, a models volume): honour the umask instead.
    umask = os.umask(0)
    os.umask(umask)
    path.chmod(0o666 & ~umask)
    return path


def read_metadata(path: str | Path) -> dict[str, Any]:
    """Format metadata of a model file, with ``config`` and ``extra`` parsed."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
    except (SafetensorError, OSError) as exc:
        raise ModelFileError(f"{path}: not a readable safetensors file ({exc})") from exc
    if meta.get("format") != FORMAT_NAME:
        raise ModelFileError(
            f"{path}: not a cace-server model (format {meta.get('format')!r}); "
            "convert original CACE checkpoints with `cace-server convert`"
        )
    version = int(meta.get("format_version", "0"))
    if version > FORMAT_VERSION:
        raise ModelFileError(
            f"{path}: model format version {version} is newer than this cace-server "
            f"supports ({FORMAT_VERSION}); upgrade cace-server"
        )
    out: dict[str, Any] = dict(meta)
    out["config"] = json.loads(meta["config"])
    out["extra"] = json.loads(meta.get("extra", "{}"))
    return out


def load_model(
    path: str | Path,
    *,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype | None = None,
) -> CACEPotential:
    """Load a native model file onto ``device`` in ``dtype`` (default: as saved)."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"model file {path} does not exist")
    meta = read_metadata(path)
    try:
        tensors = load_file(str(path), device="cpu")
    except (SafetensorError, OSError) as exc:
        raise ModelFileError(f"{path}: cannot read weights ({exc})") from exc
    if weights_digest(tensors) != meta.get("weights_sha256"):
        raise ModelFileError(f"{path}: weights checksum mismatch (file damaged or edited)")
    try:
        config = ModelConfig.from_dict(meta["config"])
    except (TypeError, ValueError) as exc:
        raise ModelFileError(f"{path}: invalid model config ({exc})") from exc
    with torch.device("cpu"):
        model = CACEPotential(config)
    model = model.to(dtype=tensors["representation.radial_mixing"].dtype)
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as exc:
        raise ModelFileError(f"{path}: weights do not match the config ({exc})") from exc
    return finalize(model, dtype=dtype, device=device)
