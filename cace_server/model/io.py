"""Native model files: safetensors weights with the JSON config in the metadata.

Loading runs no pickle: safetensors holds only raw tensors and a string table. The
metadata carries the format name and version, the model config, a SHA-256 of the
weights and (format version 2) a SHA-256 over all of the metadata, the weights'
digest included: a damaged file, edited weights and an edited config (cutoff,
elements, anything that changes the maths) are all refused.

The checksums detect damage, not tampering: whoever can edit a file can recompute
them. An operator who needs to know who made a file signs it (:func:`reseal` with a
key; ``cace-server resave --signing-key-file``): an HMAC-SHA256 of the metadata digest
under a shared secret key, stored in the metadata (``signature``), checked at load
when a key is given (:class:`ModelFilePolicy`): an unsigned file, or one whose
signature does not verify, is then refused.

Files of format version 1 recorded the weights' digest only; their config is not
covered. They are refused unless the policy allows them (``allow_legacy_model_files``);
:func:`reseal` (``cace-server resave FILE``) rewrites one as version 2.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
from dataclasses import dataclass, field
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
#: the metadata key of the signature (of the other metadata but the checksum).
SIGNATURE_KEY = "signature"
#: how a signature value starts: the algorithm, then the hex digest.
SIGNATURE_SCHEME = "hmac-sha256:"
#: format versions whose metadata carry no content checksum.
LEGACY_VERSIONS = frozenset({1})
#: shortest signing key accepted (bytes of the key file, surrounding whitespace removed).
MIN_KEY_BYTES = 16


class ModelFileError(ValueError):
    """A model file that cannot be loaded; the message says why."""


@dataclass(frozen=True)
class ModelFilePolicy:
    """What a model file must show to be loaded, beyond intact checksums.

    ``allow_legacy``: format-version-1 files (config not covered) load, with a
    warning. ``signing_key``: every file must carry a signature made with this key.
    """

    allow_legacy: bool = False
    signing_key: bytes | None = field(default=None, repr=False)

    @classmethod
    def from_settings(cls, allow_legacy: bool, signing_key_file: str | None) -> ModelFilePolicy:
        key = None if signing_key_file is None else read_signing_key(signing_key_file)
        return cls(allow_legacy=allow_legacy, signing_key=key)


#: the default: version-2 files only, no signature asked for.
DEFAULT_POLICY = ModelFilePolicy()


def read_signing_key(path: str | Path) -> bytes:
    """The key in a key file (its bytes, surrounding whitespace removed)."""
    try:
        key = Path(path).read_bytes().strip()
    except OSError as exc:
        raise ValueError(f"cannot read the model signing key file {path}: {exc}") from None
    if len(key) < MIN_KEY_BYTES:
        raise ValueError(
            f"model signing key file {path} holds {len(key)} bytes; use at least "
            f"{MIN_KEY_BYTES} (e.g. `openssl rand -hex 32 > {path}`)"
        )
    return key


def signature(metadata: dict[str, str], key: bytes) -> str:
    """The signature under ``key`` of a file's metadata but the checksum and the
    signature itself (the weights' digest in). The content checksum is taken after
    it, over the signature too: servers that know no signatures load signed files."""
    unsigned = {k: v for k, v in metadata.items() if k != SIGNATURE_KEY}
    mac = hmac.new(key, metadata_digest(unsigned).encode(), hashlib.sha256)
    return SIGNATURE_SCHEME + mac.hexdigest()


@dataclass(frozen=True)
class Integrity:
    """What a model file's checksums cover, once they were checked.

    ``status``: ``"verified"`` (weights and all metadata, config included) or
    ``"legacy"`` (format version 1: weights only, the config is not covered).
    ``signed``: a signature was checked against the policy's key and holds.
    """

    status: str
    format_version: int
    detail: str
    signed: bool = False

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
    """SHA-256 over every metadata entry but the checksum itself (the weights' digest
    and the signature in)."""
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
    model: CACEPotential,
    path: str | Path,
    extra_metadata: dict[str, Any] | None = None,
    *,
    signing_key: bytes | None = None,
) -> Path:
    """Write ``model`` as a native model file (signed with ``signing_key`` if given);
    returns the path."""
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
    if signing_key is not None:
        metadata[SIGNATURE_KEY] = signature(metadata, signing_key)
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
    policy: ModelFilePolicy = DEFAULT_POLICY,
) -> Integrity:
    """Check a model file's checksums (and signature, if ``policy`` has a key); raise
    ModelFileError naming what does not match or what ``policy`` refuses."""
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
        if not policy.allow_legacy or policy.signing_key is not None:
            why = (
                "it cannot carry a signature (model_signing_key_file is set)"
                if policy.signing_key is not None
                else "pass --allow-legacy-model-files to load it anyway"
            )
            raise ModelFileError(
                f"{path}: model format version {version}: its config (cutoff, elements, ...) "
                f"is not covered by a checksum, so an edit would go unnoticed; re-save it as "
                f"version 2 with `cace-server resave {path}`, or {why}"
            )
        return Integrity(
            "legacy",
            version,
            f"format version {version}: weights verified, config not covered; served only "
            f"with --allow-legacy-model-files (re-save it: cace-server resave {path})",
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
    detail = "weights and metadata (config included) verified"
    if policy.signing_key is None:
        return Integrity("verified", version, detail)
    signed = meta.get(SIGNATURE_KEY)
    if signed is None:
        raise ModelFileError(
            f"{path}: not signed, and model_signing_key_file is set: sign it with "
            f"`cace-server resave {path} --signing-key-file KEY`"
        )
    if not hmac.compare_digest(signed.encode(), signature(meta, policy.signing_key).encode()):
        raise ModelFileError(
            f"{path}: signature does not verify with the model signing key: the file was "
            "changed after it was signed, or signed with another key; refusing to load it"
        )
    return Integrity("verified", version, detail + "; signature verified", signed=True)


def reseal(
    path: str | Path,
    output: str | Path | None = None,
    *,
    signing_key: bytes | None = None,
) -> Path:
    """Rewrite a model file in the current format version, signed with ``signing_key``
    if given; in place unless ``output``. The weights and the config are kept as they
    are; a file whose checksums fail is refused (version 1: its weights' checksum).
    """
    path = Path(path)
    target = path if output is None else Path(output)
    read_metadata(path)
    try:
        tensors = load_file(str(path), device="cpu")
    except (SafetensorError, OSError) as exc:
        raise ModelFileError(f"{path}: cannot read weights ({exc})") from exc
    check_integrity(path, tensors, ModelFilePolicy(allow_legacy=True))
    meta = _raw_metadata(path)
    meta.pop(SIGNATURE_KEY, None)
    meta["format_version"] = str(FORMAT_VERSION)
    if signing_key is not None:
        meta[SIGNATURE_KEY] = signature(meta, signing_key)
    meta[CONTENT_KEY] = metadata_digest(meta)
    mode = path.stat().st_mode & 0o777
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.partial")
    save_file(tensors, str(partial), metadata=meta)
    partial.chmod(mode)
    os.replace(partial, target)
    return target


def load_model(
    path: str | Path,
    *,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype | None = None,
    policy: ModelFilePolicy = DEFAULT_POLICY,
    compile: bool | str = False,
) -> CACEPotential:
    """Load a native model file onto ``device`` in ``dtype`` (default: as saved), if its
    checksums hold and ``policy`` accepts it. ``compile`` (True, or a mode of
    :data:`~cace_server.model.compiled.MODES`) gives it a compiled call
    (:mod:`cace_server.model.compiled`); shapes compile on their first call."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"model file {path} does not exist")
    meta = read_metadata(path)
    try:
        tensors = load_file(str(path), device="cpu")
    except (SafetensorError, OSError) as exc:
        raise ModelFileError(f"{path}: cannot read weights ({exc})") from exc
    integrity = check_integrity(path, tensors, policy)
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
    model = finalize(model, dtype=dtype, device=device)
    if compile:
        from cace_server.model.compiled import compile_model

        compile_model(model, "default" if compile is True else compile)
    return model
