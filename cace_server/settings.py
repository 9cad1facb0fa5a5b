"""Server settings: defaults, then a TOML file, then ``CACE_SERVER_*`` variables, then flags.

The server's settings are the sections of the components that read them
(:class:`ServerSettings`); each value is a field of one section, with its one default
and help text (:func:`cace_server.options.option`). Every such field has one name
used everywhere: the TOML key, the environment variable ``CACE_SERVER_<NAME>``
(upper case) and the flag ``--<name>`` (dashes). List fields take comma-separated
values from the environment.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from cace_server.capture import CaptureSettings
from cace_server.engine.settings import EngineSettings
from cace_server.http.settings import HttpSettings
from cace_server.ipi.settings import IpiSettings
from cace_server.jobs.settings import JobSettings
from cace_server.options import Setting, option, options_of

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

ENV_PREFIX = "CACE_SERVER_"


@dataclass(frozen=True)
class ModelSettings:
    """The model files the server loads."""

    # "PATH" or "NAME=PATH"; empty means the bundled default model. PATH may be a
    # committee: "a.safetensors,b.safetensors" (a flag or a TOML list item) or a
    # committee file "committee.toml" (also in CACE_SERVER_MODEL, whose commas
    # separate models).
    sources: tuple[str, ...] = option(
        (),
        name="model",
        show="bundled water model",
        aliases=("-m",),
        help="model file, or NAME=FILE; a committee: NAME=A,B,... or NAME=COMMITTEE.toml; "
        "repeat to serve several",
    )
    default_model: str | None = option(None, show="first model", help="name of the default model")

    def named_sources(self) -> dict[str, str]:
        """NAME -> PATH for the models to load (names default to the file stem)."""
        out: dict[str, str] = {}
        for spec in self.sources:
            name, sep, path = spec.partition("=")
            if not sep:
                name, path = Path(spec).stem, spec
            if not path.strip():
                raise ValueError(
                    f"model {name!r} has no file: give NAME=FILE, NAME=A,B,... (a committee) "
                    "or NAME=COMMITTEE.toml"
                )
            if name in out:
                raise ValueError(f"two models named {name!r}; use NAME=PATH to tell them apart")
            out[name] = path
        return out


@dataclass(frozen=True)
class LogSettings:
    level: str = option("info", name="log_level", help="debug, info, warning, error")
    json: bool = option(False, name="log_json", help="JSON-lines logs")


@dataclass(frozen=True)
class ServerSettings:
    """One server process: a section per component, nothing of its own."""

    model: ModelSettings = field(default_factory=ModelSettings)
    engine: EngineSettings = field(default_factory=EngineSettings)
    http: HttpSettings = field(default_factory=HttpSettings)
    ipi: IpiSettings = field(default_factory=IpiSettings)
    capture: CaptureSettings = field(default_factory=CaptureSettings)
    jobs: JobSettings = field(default_factory=JobSettings)
    log: LogSettings = field(default_factory=LogSettings)


def sections() -> dict[str, type]:
    """Section attribute of :class:`ServerSettings` -> its class."""
    return {f.name: f.default_factory for f in fields(ServerSettings)}  # type: ignore[misc]


def server_settings() -> dict[str, tuple[str, Setting]]:
    """Every user-facing setting name -> (its section, the setting), in flag order."""
    out: dict[str, tuple[str, Setting]] = {}
    for section, cls in sections().items():
        for setting in options_of(cls):
            if setting.name in out:
                raise TypeError(f"setting {setting.name!r} is declared twice")
            out[setting.name] = (section, setting)
    return out


def load_settings(
    toml_path: str | Path | None = None,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> ServerSettings:
    """Merge the layers; ``overrides`` (from flags) holds only what the user gave.

    Every layer gives values as users write them (strings, lists of strings, TOML
    values); each section validates its own on creation.
    """
    table = server_settings()
    values: dict[str, dict[str, Any]] = {section: {} for section in sections()}

    def give(name: str, value: Any) -> None:
        section, setting = table[name]
        values[section][setting.field.name] = setting.from_raw(value)

    if toml_path is not None:
        with open(toml_path, "rb") as f:
            data = tomllib.load(f)
        unknown = set(data) - set(table)
        if unknown:
            raise ValueError(f"{toml_path}: unknown settings {sorted(unknown)}")
        for name, value in data.items():
            give(name, value)
    env = os.environ if environ is None else environ
    for name in table:
        key = ENV_PREFIX + name.upper()
        if key in env:
            try:
                give(name, env[key])
            except ValueError as exc:
                raise ValueError(f"{key}: {exc}") from exc
    for name, value in (overrides or {}).items():
        if name not in table:
            raise ValueError(f"unknown setting {name!r}")
        give(name, value)
    return ServerSettings(**{s: cls(**values[s]) for s, cls in sections().items()})
