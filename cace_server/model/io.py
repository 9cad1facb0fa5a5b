"""Native model files: safetensors weights with the JSON config in the metadata.

Loading runs no pickle: safetensors holds only raw tensors and a string table. The
metadata carries the format name and version, the model config, a SHA-256 of the
weights and (format version 2) a SHA-256 over all of the metadata, the weights'
digest included: a damaged file, edited weights and an edited config (cutoff,
elements, anything that changes the maths) are all refused.

Files of format version 1 recorded the weights' digest only. They still load, with
the weights verified and the status ``legacy`` (their config is not covered);
re-saving one (``load_model`` then ``save_model``) makes it a version-2 file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from cace_server.model.config import FORMAT_NAME, FORMAT_VERSION, ModelConfig
from cace_server.model.convert import finalize
from cace_server.model.potential import CACEPotential

logger = logging.getLogger("cace_server.model")

#: the metadata key of the checksum over all the other metadata (format version 2).
CONTENT_KEY = "content_sha256"
#: format versions whose metadata carry no content checksum.
LEGACY_VERSIONS = frozenset({1})


class ModelFileError(ValueError):
    """A model file that cannot be loaded; the message says why."""


@dataclass(frozen=True)
class Integrity:
    """What a model file's checksums cover, once they were checked.

    ``status``: ``"verified"`` (weights and all metadata, config included) or
    ``"legacy"`` (format version 1: weights only, the config is not covered).
    """

    status: str
    format_version: int
    detail: str

    @property
    def covers_config(self) -> bool:
        return self.status == "verified"


def weights_digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def metadata_digest(metadata: dict[str, str]) -> str:
    """SHA-256 over every metadata entry but the checksum itself (the weights' digest in)."""
    h = hashlib.sha256()
    for key in sorted(k for k in metadata if k != CONTENT_KEY):
        for part in (key, metadata[key]):
            data = part.encode()
            h.update(len(data).to_bytes(8, "little"))
            h.update(data)
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
    metadata[CONTENT_KEY] = metadata_digest(metadata)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=metadata)
    # safetensors creates the file owner-only (0600); a model file is meant to be
    # shared (a container's non-root user, a models volume): honour the umask instead.
    umask = os.umask(0)
    os.umask(umask)
    path.chmod(0o666 & ~umask)
    return path


def _raw_metadata(path: str | Path) -> dict[str, str]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError) as exc:
        raise ModelFileError(f"{path}: not a readable safetensors file ({exc})") from exc


def read_metadata(path: str | Path) -> dict[str, Any]:
    """Format metadata of a model file, with ``config`` and ``extra`` parsed (not verified)."""
    meta = _raw_metadata(path)
    if meta.get("format") != FORMAT_NAME:
        raise ModelFileError(
            f"{path}: not a cace-server model (format {meta.get('format')!r}); "
            "convert original CACE checkpoints with `cace-server convert`"
        )
    try:
        version = int(meta.get("format_version", "0"))
    except ValueError:
        raise ModelFileError(
            f"{path}: format_version {meta.get('format_version')!r} is not a number"
        ) from None
    if version > FORMAT_VERSION:
        raise ModelFileError(
            f"{path}: model format version {version} is newer than this cace-server "
            f"supports ({FORMAT_VERSION}); upgrade cace-server"
        )
    out: dict[str, Any] = dict(meta)
    try:
        out["config"] = json.loads(meta["config"])
        out["extra"] = json.loads(meta.get("extra", "{}"))
    except (KeyError, ValueError) as exc:
        raise ModelFileError(f"{path}: unreadable config metadata ({exc})") from None
    return out


def check_integrity(
    path: str | Path,
    tensors: dict[str, torch.Tensor] | None = None,
) -> Integrity:
    """Check a model file's checksums; raise ModelFileError naming what does not match."""
    meta = _raw_metadata(path)
    version = int(read_metadata(path)["format_version"])
    if tensors is None:
        try:
            tensors = load_file(str(path), device="cpu")
        except (SafetensorError, OSError) as exc:
            raise ModelFileError(f"{path}: cannot read weights ({exc})") from exc
    if weights_digest(tensors) != meta.get("weights_sha256"):
        raise ModelFileError(f"{path}: weights checksum mismatch (file damaged or edited)")
    if version in LEGACY_VERSIONS:
        return Integrity(
            "legacy",
            version,
            f"format version {version}: weights verified, config not covered "
            "(re-save the model to cover it)",
        )
    recorded = meta.get(CONTENT_KEY)
    if recorded is None:
        raise ModelFileError(
            f"{path}: format version {version} but no {CONTENT_KEY} in the metadata "
            "(file damaged or edited)"
        )
    if metadata_digest(meta) != recorded:
        raise ModelFileError(
            f"{path}: metadata checksum mismatch: the config or other metadata was edited "
            "after the model was saved (cutoff, elements, ... would no longer match the "
            "weights); refusing to load it"
        )
    return Integrity("verified", version, "weights and metadata (config included) verified")


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
    integrity = check_integrity(path, tensors)
    if not integrity.covers_config:
        logger.warning("model file %s: %s", path, integrity.detail)
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
